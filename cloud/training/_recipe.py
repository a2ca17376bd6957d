"""Training recipes: YAML files validated once into frozen pydantic models.

    recipe = load_recipe("configs/recipes/digits-mlp.yaml")   # InvalidRecipe names the bad key
    recipe.training.seed, recipe.model.hidden, recipe.quantization.margin

A data source is ``"sklearn:digits"`` (a dataset that ships inside scikit-learn),
``{type: sensor, rows: N, drift: D}`` (the synthetic sensor stream of
:mod:`edgeml._testing.sensor`), or a mapping ``{type: fleet, fleet: F, model: N, ...}``:
labeled samples captured on devices (feedback records that carry inputs, or feedback
joined to its sample record by ``prediction_id``, else to the sample just before it on
the same device). configs/recipes/digits-mlp.yaml documents every key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .._exceptions import ConfigError

__all__ = [
    "DEFAULT_MARGIN",
    "DataSettings",
    "FleetSource",
    "InvalidRecipe",
    "ModelSettings",
    "QuantizationSettings",
    "Recipe",
    "SensorSource",
    "SklearnSource",
    "TrainingSettings",
    "load_recipe",
]

#: Largest accuracy loss of an int8 artifact against its float twin: one accuracy point.
DEFAULT_MARGIN = 0.01
SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")


class InvalidRecipe(ConfigError):
    """A recipe is invalid; ``key`` names the bad key (dotted)."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid recipe key {key!r}: {reason}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSettings(_Frozen):
    type: Literal["mlp"] = "mlp"
    hidden: tuple[int, ...] = Field((64, 32), description="Hidden layer widths (ReLU after each).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(n < 1 for n in v):
            raise ValueError("hidden must list at least one positive width")
        return v


class SklearnSource(_Frozen):
    type: Literal["sklearn"] = "sklearn"
    dataset: Literal["digits", "iris", "wine", "breast_cancer"] = "digits"


class FleetSource(_Frozen):
    """Labeled samples from the store: feedback records, with inputs or joined to samples."""

    type: Literal["fleet"] = "fleet"
    fleet: str = "default"
    model: str | None = Field(None, description="Only records of this model name.")
    input: str | None = Field(None, description="Input tensor name; None: the record's only input.")
    devices: tuple[str, ...] = Field((), description="Only these devices; empty: every device of the fleet.")
    since: float | None = None
    until: float | None = None
    join_window_s: float = Field(60.0, gt=0, description="Feedback without inputs takes the sample at most this much older.")
    max_rows: int = Field(1_000_000, ge=1)


class SensorSource(_Frozen):
    """Rows of the synthetic sensor stream (edgeml._testing.sensor), labeled with its ground truth."""

    type: Literal["sensor"] = "sensor"
    rows: int = Field(2000, ge=10, le=10_000_000)
    drift: float = Field(0.0, description="Drift of the generated readings (0: the undrifted stream).")
    features: int = Field(8, ge=1, le=4096)
    classes: int = Field(3, ge=2, le=1000)
    seed: int = Field(0, ge=0, description="Seed of the stream (its class means and drift direction).")
    sample_seed: int = Field(1, ge=0, description="Seed of the rows drawn from it.")


Source = Annotated[SklearnSource | FleetSource | SensorSource, Field(discriminator="type")]


class DataSettings(_Frozen):
    sources: tuple[Source, ...] = Field(default_factory=lambda: (SklearnSource(),))
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Held-out share (stratified by the seed).")

    @field_validator("sources", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str | dict):
            v = [v]
        out = []
        for item in v:
            if isinstance(item, str):
                kind, _, name = item.partition(":")
                if item == "sensor":
                    item = {"type": "sensor"}
                    out.append(item)
                    continue
                if kind != "sklearn" or name not in SKLEARN_DATASETS:
                    raise ValueError(f"{item!r}: a string source is sensor, or sklearn:NAME with NAME in {SKLEARN_DATASETS}")
                item = {"type": "sklearn", "dataset": name}
            out.append(item)
        if not out:
            raise ValueError("at least one data source is needed")
        return out


class PreprocessingSettings(_Frozen):
    standardize: bool = Field(True, description="(x - mean) / std from the training split, as the graph's first layer.")
    min_std: float = Field(1e-6, gt=0, description="Features with a smaller std are only centred (constant pixels).")


class TrainingSettings(_Frozen):
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = Field(0, ge=0)


class QuantizationSettings(_Frozen):
    enabled: bool = True
    margin: float = Field(DEFAULT_MARGIN, ge=0.0, le=1.0, description="Largest accuracy loss allowed (0.01 = 1 point).")
    min_speedup: float = Field(1.0, gt=0, description="int8 must be at least this many times faster than float.")
    methods: tuple[Literal["static_qdq", "dynamic"], ...] = ("static_qdq", "dynamic")
    calibration_rows: int = Field(512, ge=1)
    latency_repeats: int = Field(30, ge=3)


class ExportSettings(_Frozen):
    opset: int = Field(17, ge=13, le=21)
    tflite: bool = Field(True, description="Try TFLite float/int8 (needs litert-torch; skipped with the reason otherwise).")


class Recipe(_Frozen):
    name: str = Field(description="Registry model name of the result.")
    description: str = ""
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    preprocessing: PreprocessingSettings = Field(default_factory=PreprocessingSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    quantization: QuantizationSettings = Field(default_factory=QuantizationSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    parent: str | None = Field(None, description="name@version this model derives from (lineage).")

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """sha256 of the canonical JSON of the recipe (key order independent)."""
        return hashlib.sha256(orjson.dumps(self.as_json(), option=orjson.OPT_SORT_KEYS)).hexdigest()


def load_recipe(source: str | os.PathLike[str] | dict[str, Any]) -> Recipe:
    """A recipe from a YAML file (or a mapping); :class:`InvalidRecipe` names the bad key."""
    if isinstance(source, dict):
        doc: Any = source
    else:
        path = Path(source)
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read recipe {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRecipe("<root>", "a recipe is a YAML mapping")
    try:
        return Recipe.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise InvalidRecipe(key, err["msg"]) from None
