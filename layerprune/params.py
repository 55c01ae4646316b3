"""params.yaml as one typed, validated object. Every stage parses the whole file first, so a bad value
anywhere stops the run before any work starts, with one line naming the key and what is allowed."""
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerprune.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelParams(Section):
    id: str = Field(description="bundled:gemma3-270m, bundled:smollm2-135m, or a Hugging Face hub id")
    revision: str = Field("main", description="hub branch, tag or commit; ignored for bundled models")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("id")
    @classmethod
    def _known_bundled(cls, value):
        from layerprune.models import BUNDLED_MODELS  # late import: models pulls in torch

        if value.startswith("bundled:") and value not in BUNDLED_MODELS:
            raise ValueError(f"unknown bundled model; allowed: {', '.join(sorted(BUNDLED_MODELS))} or a hub id")
        return value


class DataParams(Section):
    source: Literal["bundled", "hub"] = "bundled"
    snapshot: str = Field("20231101", description="wikimedia/wikipedia dump date, for source: hub")
    dataset: str = Field("wikimedia/wikipedia", description="hub dataset id or a local folder in its layout")
    max_articles: int = Field(5000, gt=0)


class SampleParams(Section):
    calibration: int = Field(gt=0, description="texts for the layer-similarity stage")
    eval: int = Field(gt=0, description="held-out texts for perplexity, disjoint from calibration")
    min_chars: int = Field(50, ge=1, description="shorter texts are dropped")
    max_chars: int = Field(2000, gt=0, description="longer texts are cut at a word boundary")
    seed: int = 0


class SimilarityParams(Section):
    metric: Literal["angular_last", "angular_mean", "block_influence"] = "angular_last"
    max_length: int = Field(gt=0, description="tokens kept per text; longer texts are truncated")
    batch_size: int = Field(gt=0)


class PruneParams(Section):
    strategy: Literal["similarity", "deepest"] = "similarity"
    layers: Optional[int] = Field(None, description="block size n; or set fraction")
    fraction: Optional[float] = Field(None, gt=0, lt=1, description="block size as a fraction of the layers")
    keep_first: int = Field(0, ge=0, description="never drop the first k layers")
    keep_last: int = Field(1, ge=0, description="never drop the last k layers (1 keeps the final layer)")

    @model_validator(mode="after")
    def _one_size(self):
        if (self.layers is None) == (self.fraction is None):
            raise ValueError("set exactly one of prune.layers and prune.fraction")
        if self.layers is not None and self.layers <= 0:
            raise ValueError(f"prune.layers must be at least 1, got {self.layers}")
        return self


class SliceParams(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class EvalParams(Section):
    max_length: int = Field(gt=0, description="rolling window of the perplexity evaluation, in tokens")
    batch_size: int = Field(gt=0)


class Params(Section):
    lang: str = Field(description="Wikipedia language code, e.g. es, de, fr")
    model: ModelParams
    data: DataParams
    sample: SampleParams
    similarity: SimilarityParams
    prune: PruneParams
    slice: SliceParams
    eval: EvalParams

    @field_validator("lang", mode="before")
    @classmethod
    def _lang_code(cls, value):
        # YAML 1.1 reads the bare code `no` (Norwegian) as False; accept it rather than fail on it.
        if value is False:
            return "no"
        if not isinstance(value, str) or not value.isascii() or not value.replace("-", "").isalpha():
            raise ValueError(f"must be a language code like es or de, got {value!r}")
        return value.lower()


def load_params(path="params.yaml") -> Params:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {err}".splitlines()[0]) from None
    return parse_params(raw, path)


def parse_params(raw, source="params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        value = first.get("input")
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            raise UserError(f"{source}: {key} is missing") from None
        if isinstance(value, dict):  # a rule across keys (e.g. prune.layers vs prune.fraction): the message names them
            raise UserError(f"{source}: {key}: {message}") from None
        raise UserError(f"{source}: {key}={value!r}: {message}") from None
