"""Model registry: register model files, list and show versions, move aliases.

    registry = ModelRegistry(store, ArtifactStore("/var/lib/edgeml/artifacts"), signing_key="fleet.key")
    model = registry.register("mlp.onnx", name="mlp", version="1.2.0", metrics={"acc": 0.93})
    registry.set_alias("mlp", "champion", "1.2.0")
    registry.resolve("mlp@champion")          # -> ModelRecord of mlp 1.2.0

Registering inspects the file (:func:`~cloud.registry.inspect.inspect_model`: format,
signature, quantization; :class:`InvalidModel` if it is not a model), stores it in the
content-addressed :class:`~cloud.artifacts.ArtifactStore`, signs its sha256 with the
fleet key (the ``.sig`` beside it) and only then writes the registry row, so a row
always points at a stored, signed artifact. The same bytes registered under two
versions are stored once.

A reference is ``name@version`` or ``name@alias``; a version wins over an alias of the
same spelling, and an alias may not be named like an existing version of its model.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from .._exceptions import Conflict, InvalidInput, NotFound
from ..artifacts import CHUNK_SIZE, ArtifactStore
from ..store import ModelRecord, Store
from .inspect import inspect_model

__all__ = ["InvalidInput", "ModelRegistry", "check_name", "model_json", "parse_ref"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
_HASH = re.compile(r"^[A-Za-z0-9:._-]{1,200}$")


def _check(pattern: re.Pattern[str], value: Any, what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidInput(f"{what} must be {rule}, got {value!r}")
    return value


def check_name(name: Any) -> str:
    return _check(_NAME, name, "model name", "1-64 of [A-Za-z0-9._-] starting with a letter or digit")


def check_version(version: Any) -> str:
    return _check(_VERSION, version, "version", "1-64 of [A-Za-z0-9._+-] starting with a letter or digit")


def check_alias(alias: Any) -> str:
    return _check(_ALIAS, alias, "alias", "1-64 of [A-Za-z0-9._-] starting with a letter")


def parse_ref(ref: str) -> tuple[str, str]:
    """``"name@version"`` (or ``name@alias``) -> ``(name, version_or_alias)``; InvalidInput otherwise."""
    name, sep, tag = ref.partition("@")
    if not sep or not tag:
        raise InvalidInput(f"expected name@version or name@alias, got {ref!r}")
    check_name(name)
    if not (_VERSION.match(tag) or _ALIAS.match(tag)):
        raise InvalidInput(f"bad version or alias in {ref!r}")
    return name, tag


class ModelRegistry:
    """Registered model versions over a :class:`Store` and an :class:`ArtifactStore`.

    ``signing_key``: the fleet's ed25519 private key (key object, PEM bytes or a file
    path). Without one, artifacts are stored unsigned (``signature_key_id`` None) and
    devices that require signatures will refuse them.
    """

    def __init__(self, store: Store, artifacts: ArtifactStore, signing_key: Any = None) -> None:
        self.store = store
        self.artifacts = artifacts
        self._key = None
        self.key_id: str | None = None
        if signing_key is not None:
            from edgeml.protocol.signing import key_id, load_private_key

            self._key = load_private_key(signing_key)
            self.key_id = key_id(self._key.public_key())

    def register(
        self, source: str | os.PathLike[str] | IO[bytes], *, name: str, version: str,
        metrics: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
        parent: str | None = None, dataset_hash: str | None = None, filename: str | None = None,
    ) -> ModelRecord:
        """Inspect, store, sign and record a model file (a path or a binary stream).

        :class:`InvalidInput` for a bad name, version, parent or hash; :class:`Conflict` if
        ``name@version`` exists; :class:`NotFound` if ``parent`` is not registered;
        :class:`InvalidModel` if the file is not a valid ONNX or TFLite model.
        """
        check_name(name)
        check_version(version)
        for label, value in (("metrics", metrics), ("params", params)):
            if value is not None and not isinstance(value, Mapping):
                raise InvalidInput(f"{label} must be a JSON object, got {type(value).__name__}")
        if dataset_hash is not None:
            _check(_HASH, dataset_hash, "dataset_hash", "1-200 of [A-Za-z0-9:._-]")
        if parent is not None:
            parent_name, parent_version = parse_ref(parent)
            self.store.get_model(parent_name, parent_version)  # NotFound: lineage must point at a model
        self._check_free(name, version)
        if isinstance(source, str | os.PathLike):
            return self._register_file(Path(source), name, version, metrics, params, parent, dataset_hash)
        suffix = Path(filename or "").suffix.lower()
        fd, tmp_name = tempfile.mkstemp(dir=self.artifacts.root / "tmp", prefix="upload-", suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK_SIZE):
                    out.write(chunk)
            return self._register_file(Path(tmp_name), name, version, metrics, params, parent, dataset_hash)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def _check_free(self, name: str, version: str) -> None:
        """Fail early (before hashing and signing) when the version or its spelling is taken."""
        with self.store.transaction() as tx:
            if tx.find_model(name, version) is not None:
                raise Conflict(f"model {name}@{version} is already registered; register a new version")
            if version in tx.model_aliases(name):
                raise Conflict(f"{name}@{version} is an alias; choose another version string")

    def _register_file(
        self, path: Path, name: str, version: str, metrics: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None, parent: str | None, dataset_hash: str | None,
    ) -> ModelRecord:
        facts = inspect_model(path)
        artifact = self.artifacts.put(path)
        if self._key is not None:
            self.artifacts.sign(artifact.sha256, self._key)
        record = ModelRecord(
            name=name, version=version, format=facts.format, runtime=facts.runtime,
            quantization=facts.quantization, size=artifact.size, sha256=artifact.sha256,
            inputs=[t.model_dump() for t in facts.inputs], outputs=[t.model_dump() for t in facts.outputs],
            metrics=dict(metrics or {}), params=dict(params or {}), metadata=dict(facts.metadata),
            parent=parent, dataset_hash=dataset_hash, signature_key_id=self.key_id, created_at=time.time(),
        )
        return self.store.insert_model(record)

    def list(self, name: str | None = None) -> list[ModelRecord]:
        if name is not None:
            check_name(name)
        return self.store.list_models(name)

    def get(self, name: str, version: str) -> ModelRecord:
        return self.store.get_model(check_name(name), version)

    def resolve(self, ref: str) -> ModelRecord:
        """``name@version`` or ``name@alias`` -> the model version; :class:`NotFound` if neither."""
        name, tag = parse_ref(ref)
        with self.store.transaction() as tx:
            model = tx.find_model(name, tag)
            if model is not None:
                return model
            try:
                return tx.resolve_alias(name, tag)
            except NotFound:
                raise NotFound(f"no model {ref} (neither a version nor an alias of {name})") from None

    def set_alias(self, name: str, alias: str, version: str) -> str | None:
        """Create or move ``name@alias`` to ``version``; return the version it pointed at before."""
        check_name(name)
        check_alias(alias)
        check_version(version)
        with self.store.transaction(write=True) as tx:
            if tx.find_model(name, alias) is not None:
                raise Conflict(f"{name}@{alias} is a version; an alias cannot take its name")
            return tx.set_alias(name, alias, version)

    def aliases(self, name: str) -> dict[str, str]:
        return self.store.model_aliases(check_name(name))


def model_json(model: ModelRecord) -> dict[str, Any]:
    """The JSON form of a model version (API and CLI), with its download URLs."""
    doc = dataclasses.asdict(model)
    doc["aliases"] = list(model.aliases)
    doc["ref"] = model.ref
    doc["signed"] = model.signature_key_id is not None
    doc["artifact_url"] = f"/v1/artifacts/{model.sha256}"
    doc["signature_url"] = f"/v1/artifacts/{model.sha256}.sig" if doc["signed"] else None
    return doc
