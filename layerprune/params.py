"""params.yaml as one typed, validated object. Every stage parses the whole file first, so a bad value
anywhere stops the run before any work starts, with one line naming the key and what is allowed."""
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerprune.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _as_text(value):
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# A string that may be written unquoted as digits: YAML reads `snapshot: 20231101` or `revision: 1234` as an int.
DigitsOrText = Annotated[str, BeforeValidator(_as_text)]


class ModelParams(Section):
    id: str = Field(description="bundled:gemma3-270m, bundled:smollm2-135m, or a Hugging Face hub id")
    revision: DigitsOrText = Field("main", description="hub branch, tag or commit; ignored for bundled models")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("id")
    @classmethod
    def _known_bundled(cls, value):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        from layerprune.models import BUNDLED_MODELS  # late import: models pulls in torch

        allowed = f"allowed: {', '.join(sorted(BUNDLED_MODELS))} or a hub id like org/name"
        if value.startswith("bundled:"):
            if value not in BUNDLED_MODELS:
                raise ValueError(f"unknown bundled model; {allowed}")
            return value
        try:
            validate_repo_id(value)
        except HFValidationError:
            raise ValueError(f"not a bundled model or a hub id; {allowed}") from None
        return value


class DataParams(Section):
    source: Literal["bundled", "hub"] = "bundled"
    snapshot: DigitsOrText = Field("20231101", description="wikimedia/wikipedia dump date, for source: hub")
    dataset: str = Field("wikimedia/wikipedia", description="hub dataset id or a local folder in its layout")
    max_articles: int = Field(5000, gt=0)


class SampleParams(Section):
    calibration: int = Field(gt=0, description="texts for the layer-similarity stage")
    eval: int = Field(gt=0, description="held-out texts for perplexity, disjoint from calibration")
    min_chars: int = Field(50, ge=1, description="shorter texts are dropped")
    max_chars: int = Field(2000, gt=0, description="longer texts are cut at a word boundary")
    seed: int = 0

    @model_validator(mode="after")
    def _chars_range(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"sample.min_chars={self.min_chars} is above sample.max_chars={self.max_chars}; "
                             "every text would be dropped")
        return self


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
            raise ValueError(f"prune.layers={self.layers}: must be at least 1")
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
        if isinstance(value, bool):
            raise ValueError('YAML reads it as a boolean; quote the language code, e.g. lang: "no"')
        if not isinstance(value, str) or not value.isascii() or not value.replace("-", "").isalpha():
            raise ValueError(f"must be a language code like es or de, got {value!r}")
        return value.lower()

    @model_validator(mode="after")
    def _bundled_lang(self):
        from layerprune.texts import bundled_languages  # late import; reads eld's ~1 MB sentence file

        if self.data.source == "bundled" and self.lang not in (available := bundled_languages()):
            raise ValueError(f"lang={self.lang!r} is not in the bundled corpora (data.source=bundled); "
                             f"available: {', '.join(available)}")
        return self


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans and integers. YAML 1.1 (PyYAML's default) reads the language codes no, on, off, yes
    as booleans and a commit like 0123456 as an octal number; here they stay strings, as DVC reads them."""


_BOOL, _INT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))


def load_params(path="params.yaml") -> Params:
    try:
        raw = yaml.load(Path(path).read_text(), Loader=_Loader)
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {err}".splitlines()[0]) from None
    return parse_params(raw, path)


def parse_params(raw, source="params.yaml") -> Params:
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise UserError(f"{source}: expected a mapping of sections (lang, model, data, ...), got {got}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        value = first.get("input")
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            raise UserError(f"{source}: {key} is missing") from None
        if first["type"] == "extra_forbidden":
            raise UserError(f"{source}: {key}: unknown key (a typo?)") from None
        if first["type"] == "model_type":  # a section given as a single value
            raise UserError(f"{source}: {key}={value!r}: must be a section of keys") from None
        if not first["loc"] or isinstance(value, dict):
            # a rule across keys (lang vs data.source, prune.layers vs prune.fraction): its message names them
            raise UserError(f"{source}: {message}") from None
        raise UserError(f"{source}: {key}={value!r}: {message}") from None
