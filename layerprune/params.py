"""params.yaml as one typed, validated object. Every stage parses the whole file first, so a bad value
anywhere stops the run before any work starts, with one line naming the key and what is allowed."""
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerprune.bundled import BUNDLED_MODELS, NOT_TEXT, bundled_languages
from layerprune.errors import UserError
from layerprune.strategies import STRATEGIES


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _as_text(value):
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# A string that may be written unquoted as digits: YAML reads `snapshot: 20231101` or `revision: 1234` as an int.
DigitsOrText = Annotated[str, BeforeValidator(_as_text)]


class ModelParams(Section):
    id: str = Field(description="bundled:gemma3-270m, bundled:smollm2-135m, a local model folder, or a hub id")
    revision: DigitsOrText = Field("main", description="hub branch, tag or commit; ignored for other models")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    license: Optional[str] = Field(None, description="the model card's license where the base model's card has none")

    @field_validator("id")
    @classmethod
    def _known_model(cls, value):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        allowed = f"allowed: {', '.join(sorted(BUNDLED_MODELS))}, a local model folder or a hub id like org/name"
        if value.startswith("bundled:"):
            if value not in BUNDLED_MODELS:
                raise ValueError(f"unknown bundled model; {allowed}")
            return value
        if Path(value).is_dir():  # an existing folder wins over a hub id of the same spelling, as in transformers
            return value
        if value.startswith((".", "/", "~")) or value.count("/") > 1:
            raise ValueError("no such folder")
        try:
            validate_repo_id(value)
        except HFValidationError:
            raise ValueError(f"not a bundled model, a local folder or a hub id; {allowed}") from None
        return value


class DataParams(Section):
    source: Literal["bundled", "hub"] = "bundled"
    dataset: str = Field("wikimedia/wikipedia", description="hub dataset id or a local folder in its layout")
    snapshot: DigitsOrText = Field("20231101", description="wikimedia/wikipedia dump date: config <snapshot>.<lang>")
    config: Optional[str] = Field(None, description="the dataset's config; null means <snapshot>.<lang>")
    text_column: str = "text"
    id_column: str = Field("id", description="rows without it get a hash of their text as id")
    max_articles: int = Field(5000, gt=0)
    shuffle_buffer: int = Field(10000, gt=0, description="rows the hub stream is shuffled within")
    seed: int = 0


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
    processes: int = Field(1, gt=0, description="torchrun processes that share the texts (one per GPU on CUDA)")


class PruneParams(Section):
    strategy: Literal[tuple(STRATEGIES)] = Field("similarity", description="how the layers are picked: "
                                                 "strategies.STRATEGIES")
    layers: Optional[int] = Field(None, description="block size n; or set fraction")
    fraction: Optional[float] = Field(None, gt=0, lt=1, description="block size as a fraction of the layers")
    keep_first: int = Field(0, ge=0, description="never drop the first k layers")
    keep_last: int = Field(1, ge=0, description="never drop the last k layers (1 keeps the final layer)")
    search_texts: int = Field(4, gt=0, description="calibration texts (the first ones) that the loss and iterative "
                              "searches score; each candidate runs the head over every token of them")

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
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names scored beside perplexity")
    include_path: Optional[str] = Field(None, description="a folder of extra lm-eval task YAMLs")


class HealLoss(Section):
    """Weights of the training objective's terms; any mix of them."""

    lm: float = Field(0.0, ge=0, description="next-token cross-entropy on the text")
    kl: float = Field(0.0, ge=0, description="KL divergence to the base model's next-token distribution")
    hidden: float = Field(0.0, ge=0, description="relative squared error to the base model's last hidden state")

    @model_validator(mode="after")
    def _some(self):
        if not (self.lm or self.kl or self.hidden):
            raise ValueError("heal.loss: give at least one of lm, kl, hidden a weight above 0")
        return self


class HealCorpusParams(Section):
    """The heal's own text (stage heal-corpus), apart from the texts calibration and evaluation are drawn from."""

    source: Literal["corpus", "hub"] = Field("corpus", description="corpus: the fetched articles minus the held-out "
                                             "ones; hub: a dataset (or a local folder in its layout), streamed")
    dataset: str = Field("wikimedia/wikipedia", description="hub only: dataset id or local folder")
    config: Optional[str] = Field(None, description="hub only: the dataset's config; null means <data.snapshot>.<lang>")
    revision: DigitsOrText = Field("main", description="hub only: branch, tag or commit; the resolved commit is recorded")
    split: str = "train"
    text_column: str = "text"
    id_column: str = Field("id", description="held-out texts are excluded by this id and by a hash of their text")
    tokens: Optional[int] = Field(None, gt=0, description="training tokens to prepare; null: all of the source")
    validation_texts: int = Field(16, gt=0, description="texts at the start of the stream for the validation loss")
    validation_tokens: int = Field(1024, gt=0, description="and at least this many tokens of them")
    shard_tokens: int = Field(1 << 24, gt=0, description="tokens per shard file")
    seed: int = Field(0, description="the order of the source's files (corpus: of its rows)")


class HealLaunchParams(Section):
    """How the heal runs, not what it computes: none of these is a DVC param of the stage or enters the checkpoint
    fingerprint, so changing them keeps a finished heal and resumes an unfinished one."""

    processes: int = Field(1, gt=0, description="processes on this machine (the stage relaunches itself under torchrun)")
    fsdp: bool = Field(False, description="shard weights, gradients and optimizer state over the processes (FSDP2)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% "
                                         "more compute")
    save_every: int = Field(8, gt=0, description="optimizer steps between checkpoints")


class HealParams(Section):
    tokens: int = Field(ge=0, description="training budget in tokens; 0 skips training (healed = pruned)")
    repeat: bool = Field(False, description="a budget beyond the text: read it again (true) or train one pass and "
                         "record the shortfall (false)")
    seq_len: int = Field(gt=0, description="tokens per packed block")
    batch_size: int = Field(gt=0, description="blocks per optimizer step over all processes (before accumulation)")
    accumulation: int = Field(1, gt=0)
    learning_rate: float = Field(gt=0)
    schedule: Literal["constant", "linear", "cosine", "constant_with_warmup", "warmup_stable_decay"] = "cosine"
    warmup: float = Field(0.0, ge=0, description="a fraction of the steps (below 1) or a number of steps")
    decay: float = Field(0.2, gt=0, lt=1, description="warmup_stable_decay: the fraction of the steps that decays; a "
                         "larger heal.tokens continues from the step before the decay")
    seed: int = 0
    loss: HealLoss
    head_every: int = Field(1, gt=0, description="lm and kl use every k-th position (the head is most of a step)")
    trainable: Literal["all", "cut", "lora"] = "cut"
    cut_layers: int = Field(2, gt=0, description="cut and lora: layers trained on either side of each cut")
    lora_rank: Optional[int] = Field(None, gt=0)
    lora_alpha: Optional[float] = Field(None, gt=0)
    eval_every: int = Field(gt=0, description="steps between validation losses")

    @model_validator(mode="after")
    def _lora_options(self):
        if self.trainable != "lora":
            for key in ("lora_rank", "lora_alpha"):
                if getattr(self, key) is not None:
                    raise ValueError(f"heal.{key} is set but heal.trainable={self.trainable!r}; "
                                     "LoRA options need heal.trainable: lora")
        else:
            self.lora_rank = self.lora_rank or 8
            self.lora_alpha = self.lora_alpha or 2.0 * self.lora_rank
        return self


class FrontierParams(Section):
    layers: list[int] = Field(description="block sizes n at which the frontier stage compares every strategy")

    @field_validator("layers")
    @classmethod
    def _sizes(cls, value):
        if not value:
            raise ValueError("list at least one number of layers to remove")
        if min(value) < 1:
            raise ValueError("every number of layers to remove must be at least 1")
        return sorted(set(value))


class Params(Section):
    lang: str = Field(description="Wikipedia language code, e.g. es, de, fr")
    model: ModelParams
    data: DataParams
    sample: SampleParams
    similarity: SimilarityParams
    prune: PruneParams
    slice: SliceParams
    eval: EvalParams
    frontier: FrontierParams
    heal_corpus: HealCorpusParams
    heal: HealParams
    heal_launch: HealLaunchParams

    @field_validator("lang", mode="before")
    @classmethod
    def _lang_code(cls, value):
        if isinstance(value, bool):
            raise ValueError('YAML reads it as a boolean; quote the language code, e.g. lang: "no"')
        if not isinstance(value, str) or not value.isascii() or not value.replace("-", "").isalpha():
            raise ValueError(f"must be a language code like es or de, got {value!r}")
        return value.lower()

    @model_validator(mode="after")
    def _fsdp_without_lora(self):
        if self.heal_launch.fsdp and self.heal.trainable == "lora":
            raise ValueError("heal_launch.fsdp with heal.trainable: lora is not supported (the adapters are merged on "
                             "one process); LoRA's few trainable weights need no sharding: set heal_launch.fsdp: false")
        return self

    @model_validator(mode="after")
    def _bundled_lang(self):
        if self.data.source == "bundled" and self.lang in NOT_TEXT:
            raise ValueError(f"lang={self.lang!r}: {NOT_TEXT[self.lang]}; use data.source=hub for its Wikipedia")
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
