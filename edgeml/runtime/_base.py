"""The Runtime interface every inference engine implements."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._exceptions import InputError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape (``None`` for a dynamic dimension) and dtype of a model input or output.

    ``dtype`` is what callers pass and receive. ``quantized`` marks a tensor that the
    engine stores as integers; the runtime converts at the boundary.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    quantized: bool = False
    #: False when the model does not declare the tensor's rank (``shape`` is then ``()``;
    #: ONNX Runtime describes a scalar the same way).
    rank_known: bool = True
    #: Names of the dynamic dimensions (``"N"``) where the model gives them; inputs that
    #: share a name must agree on its size.
    dim_names: tuple[str | None, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name, "quantized": self.quantized}

    def example(self) -> np.ndarray:
        """A zero-filled input of this spec (dynamic dimensions set to 1)."""
        return np.zeros([d if d is not None else 1 for d in self.shape], dtype=self.dtype)


def is_ort_head(head: bytes) -> bool:
    """True when a model file's first 8 bytes are those of ONNX Runtime's own format."""
    return head[4:8] == b"ORTM"


def is_ort_format(path: Any) -> bool:
    """True for ONNX Runtime's own format (an ``.ort`` file, whatever its name now)."""
    try:
        with open(path, "rb") as fh:
            return is_ort_head(fh.read(8))
    except OSError:
        return False


class Runtime(abc.ABC):
    """One loaded model in one inference engine.

    ``run`` takes arrays already checked by :meth:`prepare` and returns every output by
    name. Implementations must be safe to call from several threads.
    """

    engine: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: Mapping[str, str]

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources."""

    def warm_up(self, runs: int) -> None:
        if not all(spec.rank_known for spec in self.inputs):
            return  # no input can be made up for a tensor of unknown rank: the first request warms it
        feeds = {spec.name: spec.example() for spec in self.inputs}
        for _ in range(runs):
            self.run(feeds)

    #: (name, dtype, rank, leading dynamic dims, fixed tail) of a single input, or None;
    #: False until the first call (subclasses set ``inputs`` after construction)
    _fast: tuple[str, np.dtype, int, int, tuple[int, ...]] | None | bool = False
    #: named dynamic dimensions shared by several inputs (None until the first full check)
    _shared: list[tuple[str, list[tuple[str, int]]]] | None = None

    def prepare(self, raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check and convert caller inputs; :class:`InputError` says what is wrong."""
        fast = self._fast
        if fast is False:
            fast = self._fast = _fast_spec(self.inputs)
        if fast is not None and type(raw) is dict and len(raw) == 1:  # the common case, checked cheaply
            name, dtype, rank, lead, tail = fast  # type: ignore[misc]
            value = raw.get(name)
            if type(value) is np.ndarray and value.dtype is dtype and value.ndim == rank and value.shape[lead:] == tail:
                return raw
        if not isinstance(raw, Mapping):
            raise InputError('"inputs" must be an object mapping input names to arrays')
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            try:
                value = raw[spec.name]
            except KeyError:
                expected = ", ".join(s.name for s in self.inputs)
                raise InputError(f"missing input {spec.name!r} (model inputs: {expected})") from None
            feeds[spec.name] = _convert(spec, value)
        if len(raw) != len(feeds):
            unknown = sorted(set(raw) - set(feeds))
            raise InputError(f"unknown input(s) {unknown} (model inputs: {', '.join(feeds)})")
        shared = self._shared
        if shared is None:
            shared = self._shared = _shared_dims(self.inputs)
        for dim, places in shared:
            sizes = {f"{name}[{axis}]": feeds[name].shape[axis] for name, axis in places if feeds[name].ndim > axis}
            if len(set(sizes.values())) > 1:
                got = ", ".join(f"{where} = {size}" for where, size in sizes.items())
                raise InputError(f"inputs must agree on dimension {dim!r}: {got}")
        return feeds


def _shared_dims(inputs: tuple[TensorSpec, ...]) -> list[tuple[str, list[tuple[str, int]]]]:
    """Named dynamic dimensions that appear more than once among the inputs."""
    places: dict[str, list[tuple[str, int]]] = {}
    for spec in inputs:
        for axis, name in enumerate(spec.dim_names):
            if name:
                places.setdefault(name, []).append((spec.name, axis))
    return [(name, where) for name, where in places.items() if len(where) > 1]


def _fast_spec(inputs: tuple[TensorSpec, ...]) -> tuple[str, np.dtype, int, int, tuple[int, ...]] | None:
    """What a valid array for a model with one input looks like, when its dynamic
    dimensions (if any) lead: ``(None, 4)`` -> one leading, tail ``(4,)``."""
    if len(inputs) != 1 or not inputs[0].rank_known:
        return None
    spec = inputs[0]
    lead = 0
    while lead < len(spec.shape) and spec.shape[lead] is None:
        lead += 1
    tail = spec.shape[lead:]
    if None in tail:
        return None
    return (spec.name, spec.dtype, len(spec.shape), lead, tail)  # type: ignore[return-value]


def _convert(spec: TensorSpec, value: Any) -> np.ndarray:
    if type(value) is np.ndarray and value.dtype == spec.dtype:
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {spec.name!r}: not a rectangular array ({exc})") from None
        if arr.dtype.kind not in "biuf":
            raise InputError(f"input {spec.name!r}: expected numbers of type {spec.dtype.name}, got {arr.dtype.kind!r} data")
        want = spec.dtype.kind
        if arr.dtype.kind == "b" and want != "b":
            raise InputError(f"input {spec.name!r}: expected numbers of type {spec.dtype.name}, got booleans")
        if arr.dtype.kind == "f" and want in "iu":
            info = np.iinfo(spec.dtype)
            whole = arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
            if whole and (arr.min() < info.min or arr.max() >= info.max + 1):  # e.g. 2**63, which numpy made a float
                raise InputError(f"input {spec.name!r}: {spec.dtype.name} values out of range "
                                 f"{info.min}..{info.max}")
            raise InputError(f"input {spec.name!r}: expected integers ({spec.dtype.name}), got floats")
        if want in "iu" and arr.size and arr.dtype != spec.dtype:
            info = np.iinfo(spec.dtype)
            if arr.min() < info.min or arr.max() > info.max:  # astype would wrap around silently
                raise InputError(f"input {spec.name!r}: {spec.dtype.name} values out of range {info.min}..{info.max}")
        if want == "b" and arr.dtype.kind != "b" and arr.size and not np.all((arr == 0) | (arr == 1)):
            raise InputError(f"input {spec.name!r}: expected booleans (true/false or 0/1)")
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
            converted = arr.astype(spec.dtype, copy=False)
        if want == "f" and arr.dtype.kind == "f" and arr.size and np.any(np.isfinite(arr) & ~np.isfinite(converted)):
            raise InputError(f"input {spec.name!r}: values out of range of {spec.dtype.name}")
        arr = converted
    if not spec.rank_known:
        return arr  # the model does not say: the engine checks
    if arr.ndim != len(spec.shape):
        raise InputError(
            f"input {spec.name!r}: expected {len(spec.shape)} dimensions {_shape_text(spec.shape)}, got shape {list(arr.shape)}"
        )
    for have, want in zip(arr.shape, spec.shape, strict=True):
        if want is not None and have != want:
            raise InputError(f"input {spec.name!r}: expected shape {_shape_text(spec.shape)}, got {list(arr.shape)}")
    return arr


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"
