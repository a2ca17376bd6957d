"""The agent's model store: the active model, kept in the data dir across restarts.

Layout::

    {data_dir}/models/{sha256}{suffix}   content-addressed model files
    {data_dir}/models/active.json        which one is active (written atomically)

A model given at start-up (``model_path``) is loaded and warmed up first; only a model
that loads is copied into the store and made active. A model that fails leaves the
active one in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import ModelLoadError
from .runtime import Runtime, load_runtime
from .runtime._base import is_ort_format, is_ort_head

log = logging.getLogger(__name__)
#: File suffixes of the models in a store (content-addressed: ``{sha256}{suffix}``).
MODEL_SUFFIXES = (".onnx", ".tflite", ".ort")


def model_suffix(head: bytes) -> str:
    """The store's suffix for a model file that starts with ``head`` (its first 8 bytes)."""
    return ".tflite" if head[4:8] == b"TFL3" else ".ort" if is_ort_head(head) else ".onnx"


def copied(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """Copies of a model's inputs or outputs, kept past the call (the application may reuse its arrays)."""
    return {name: value.copy() if hasattr(value, "copy") else value for name, value in arrays.items()}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    size: int
    engine: str
    file: str
    loaded_at: float

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to serve: the runtime plus what telemetry says about it."""

    info: ModelInfo
    runtime: Runtime
    first_output: str
    # copies of info.name / info.version: plain attributes are cheaper on the predict path
    name: str = field(init=False)
    version: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.info.name)
        object.__setattr__(self, "version", self.info.version)

    def signature(self) -> dict[str, Any]:
        return {
            "inputs": [s.to_json() for s in self.runtime.inputs],
            "outputs": [s.to_json() for s in self.runtime.outputs],
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename, fsync the directory: the file is old or new, never partial."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    durable_replace(tmp, path)


def durable_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` (already fsynced) to ``dst`` and fsync the directory, so the rename
    itself survives a power cut."""
    os.replace(src, dst)
    _fsync_dir(dst.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelStore:
    """Content-addressed model files plus an A/B pointer: the *active* model and the
    *previous* one (the rollback target). The pointer (``active.json``) is replaced
    atomically, so a power cut leaves either the old or the new pair, never a mix.
    Only a model that loaded and passed its checks is ever written into it."""

    def __init__(self, root: Path, *, engine: str = "auto", threads: int = 1, warmup_runs: int = 3) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._engine = engine
        self._threads = threads
        self._warmup = warmup_runs
        self._lock = threading.RLock()  # install() holds it across keep() and switch()

    @property
    def _pointer(self) -> Path:
        return self.root / "active.json"

    def _read_pointer(self, *, unreadable: Any = None) -> dict[str, Any]:
        """The pointer's slots ({} for an empty store); ``unreadable`` when it cannot be
        read or parsed (default: {} as well, after logging why)."""
        fallback = {} if unreadable is None else unreadable
        try:
            doc = json.loads(self._pointer.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s: %s", self._pointer, exc)
            return fallback
        if not isinstance(doc, dict):
            log.error("ignoring %s: not a JSON object", self._pointer)
            return fallback
        if "sha256" in doc:  # the first layout: the active model's info alone
            return {"active": doc, "previous": None}
        return doc

    @staticmethod
    def _info(doc: dict[str, Any] | None) -> ModelInfo | None:
        if not doc:
            return None
        try:
            return ModelInfo(**doc)
        except TypeError as exc:
            log.error("ignoring malformed model record %s: %s", doc, exc)
            return None

    def active_info(self) -> ModelInfo | None:
        return self._info(self._read_pointer().get("active"))

    def previous_info(self) -> ModelInfo | None:
        return self._info(self._read_pointer().get("previous"))

    def path_of(self, info: ModelInfo) -> Path:
        return self.root / info.file

    def load(self, path: Path, *, name: str | None = None, version: str | None = None) -> LoadedModel:
        """Load and warm up a model file (not yet made active). ModelLoadError on failure."""
        runtime = load_runtime(path, engine=self._engine, threads=self._threads, warmup_runs=self._warmup)
        digest = sha256_file(path)
        info = ModelInfo(
            name=name or runtime.metadata.get("edgeml.name") or path.stem,
            version=version or runtime.metadata.get("edgeml.version") or digest[:12],
            sha256=digest,
            size=path.stat().st_size,
            engine=runtime.engine,
            file=path.name,
            loaded_at=time.time(),
        )
        if not runtime.outputs:
            raise ModelLoadError(f"model {path} has no outputs")
        return LoadedModel(info, runtime, runtime.outputs[0].name)

    def load_info(self, info: ModelInfo) -> LoadedModel:
        """Load a stored model and check it is byte for byte the one recorded."""
        path = self.path_of(info)
        loaded = self.load(path, name=info.name, version=info.version)
        if loaded.info.sha256 != info.sha256:
            raise ModelLoadError(f"stored model {path} does not match its recorded sha256")
        return LoadedModel(info, loaded.runtime, loaded.first_output)

    def keep(self, source: Path, loaded: LoadedModel) -> ModelInfo:
        """Copy a loaded model file into the store (write, fsync, rename); its info there."""
        suffix = ".tflite" if loaded.info.engine == "litert" else ".ort" if is_ort_format(source) else ".onnx"
        stored = self.root / f"{loaded.info.sha256}{suffix}"
        with self._lock:
            if stored.resolve() != source.resolve() and not stored.exists():
                tmp = stored.with_name(f".{stored.name}.tmp")
                shutil.copyfile(source, tmp)
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
                durable_replace(tmp, stored)
        return ModelInfo(**{**loaded.info.to_json(), "file": stored.name})

    def seed(self) -> str | None:
        """sha256 of the last start-up model (``model_path``) that was installed."""
        return self._read_pointer().get("seed")

    def _write(self, doc: dict[str, Any]) -> None:
        atomic_write(self._pointer, json.dumps(doc, indent=2).encode())

    def switch(self, new: ModelInfo, *, seed: bool = False) -> None:
        """Make ``new`` active; the active one becomes the rollback target (atomic)."""
        with self._lock:
            current = self._read_pointer()
            active = current.get("active")
            previous = active if active and active.get("sha256") != new.sha256 else current.get("previous")
            self._write({**current, "active": new.to_json(), "previous": previous,
                         **({"seed": new.sha256} if seed else {})})

    def rollback(self) -> ModelInfo | None:
        """Make the previous model active again (atomic); returns it, or None if there is none."""
        with self._lock:
            current = self._read_pointer()
            previous = current.get("previous")
            if not previous:
                return None
            self._write({**current, "active": previous, "previous": None})
            return ModelInfo(**previous)

    def install(self, source: Path, *, seed: bool = False) -> LoadedModel:
        """Load ``source``; if it works, keep it in the store and make it active
        (``seed``: it is the start-up model, remembered so it is installed only once)."""
        candidate = self.load(source)
        with self._lock:  # keep and switch as one step for collect_garbage
            info = self.keep(source, candidate)
            self.switch(info, seed=seed)
        return LoadedModel(info, candidate.runtime, candidate.first_output)

    def load_active(self) -> LoadedModel | None:
        """Load the active model of the store, or None if there is none."""
        info = self.active_info()
        return None if info is None else self.load_info(info)

    def collect_garbage(self, keep: set[str] = frozenset()) -> int:  # type: ignore[assignment]
        """Delete model files that neither slot (nor ``keep``, sha256s) refers to. Nothing
        is deleted while the pointer cannot be read (it would look as if none were wanted)."""
        with self._lock:  # not between keep() and switch() of an install
            pointer = self._read_pointer(unreadable=False)
            if pointer is False:
                log.error("not cleaning the model store: %s cannot be read", self._pointer)
                return 0
            wanted = {d["sha256"] for d in (pointer.get("active"), pointer.get("previous")) if d} | set(keep)
            removed = 0
            for path in self.root.iterdir():
                if path.suffix in MODEL_SUFFIXES and path.stem not in wanted:
                    path.unlink(missing_ok=True)
                    removed += 1
            return removed
