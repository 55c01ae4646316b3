"""Cut layers out of a model with mergekit's passthrough merge.

mergekit stays the engine; this module only changes how we drive it, for the two things mergekit 0.1.5 gets wrong
on our architectures (DESIGN.md, "mergekit 0.1.5 on our architectures"):

- Falcon-7B/11B put one `input_layernorm` in front of the parallel attention + MLP; mergekit's built-in falcon
  definition describes the two-norm Falcon-40B/180B layout (`ln_attn`, `ln_mlp`) and fails on the others. We ship
  a definition for the one-norm layout (architectures/falcon_one_norm.json) and let mergekit's registry answer
  with it while it slices such a model.
- mergekit sets num_hidden_layers on the output config but leaves per-layer lists at the old length; transformers 5
  refuses to save such a config (Gemma 3's `layer_types`), so mergekit aborts before writing config.json. The
  generic rule: every list-valued entry of the text config with one item per original layer keeps the items of
  the kept layers, in order. We apply it to the config mergekit is about to save.

Every output is then loaded with transformers on the meta device (no weights read) and must match its config
exactly: no missing, unexpected or mis-shaped tensors.
"""
import logging
import shutil
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import mergekit.merge
import yaml
from mergekit.architecture import ModelArchitecture, ModuleDefinition, arch_info_for_config
from mergekit.architecture.json_definitions import NAME_TO_ARCH, JsonModuleArchDef, JsonModuleArchitecture
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.utils import logging as transformers_logging

from layerprune.errors import UserError
from layerprune.files import atomic_dir
from layerprune.layers import slice_per_layer_lists

ARCHITECTURES = Path(__file__).parent / "architectures"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
# mergekit holds one output shard in memory. A tensor kept in its stored dtype is a view of the memory-mapped input
# (file pages, which the kernel can drop: 0.3 GB of anonymous memory for an 11B slice); a converted one is new memory,
# a whole shard of it. So: the hub's 5 GB shards when the dtype stays, 500 MB ones when it changes.
SHARD_BYTES, CONVERTED_SHARD_BYTES = 5 * 10**9, 5 * 10**8
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab.*", "merges.txt")


def load_merge_config(path) -> MergeConfiguration:
    """The mergekit YAML that choose-range wrote (ranges.passthrough_config), validated by mergekit."""
    return MergeConfiguration.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def slice_model(config: MergeConfiguration, out_dir: Path, *, copy_tokenizer_from: Path | None = None,
                extra_files: dict[str, bytes] | None = None, progress: bool = True) -> None:
    """Run the mergekit passthrough `config` (see ranges.passthrough_config) into out_dir, atomically.

    The tokenizer comes from copy_tokenizer_from, or from the base model's folder when that has one.
    extra_files (name -> content, e.g. the model card README.md) are written into the same atomic folder.
    """
    merge_config = _with_local_sources(config)
    models = set(merge_config.referenced_models())
    if merge_config.merge_method != "passthrough" or not merge_config.slices or len(models) != 1:
        raise ValueError("slice_model runs passthrough merges of slices of one model")
    (base,) = models
    base_config = base.config()
    check_sliceable(base_config)
    kept = [i for s in merge_config.slices for i in range(*s.sources[0].layer_range)]
    base_dir = Path(base.local_path())
    tokenizer_dir = copy_tokenizer_from or (base_dir if _has_tokenizer(base_dir) else None)
    if tokenizer_dir is not None and not _has_tokenizer(Path(tokenizer_dir)):
        raise UserError(f"{tokenizer_dir}: no tokenizer to copy (none of {', '.join(TOKENIZER_FILES)})")

    # We copy the tokenizer ourselves: mergekit's copy falls back to an ERROR traceback when the base has none.
    # The model card is ours too: mergekit's asks the hub whether a local "org/name"-shaped path is a hub repo.
    same_dtype = merge_config.dtype in (None, stored_dtype(base_dir))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=not progress,
                           out_shard_size=SHARD_BYTES if same_dtype else CONVERTED_SHARD_BYTES)
    with atomic_dir(out_dir) as work:
        with _registered(project_architecture(base_config)), _slicing_per_layer_lists(kept, _num_layers(base_config)):
            run_merge(merge_config, str(work), options)
        if tokenizer_dir is not None:  # copied as files: parsing a 33 MB tokenizer.json was 2/3 of a slice
            for pattern in TOKENIZER_PATTERNS:
                for file in Path(tokenizer_dir).glob(pattern):
                    shutil.copy2(file, work)
        if (base_dir / "generation_config.json").exists():  # eos ids and sampling defaults go with the weights
            shutil.copy(base_dir / "generation_config.json", work)
        _check_loads(work, base_config, len(kept))
        for name, content in (extra_files or {}).items():
            (work / name).write_bytes(content)


def stored_dtype(model_dir: Path) -> str | None:
    """The dtype of the first floating-point tensor in a model folder's safetensors ("bfloat16"), from the header."""
    from safetensors import safe_open

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                dtype = SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype:
                    return dtype
    return None


def _with_local_sources(config: MergeConfiguration) -> MergeConfiguration:
    """Replace hub references ("org/name@revision") by their folder in the HF cache, downloading if needed.

    mergekit lists a hub repo's files online even when the snapshot is cached, so offline it cannot read a hub
    id at all; a local folder it reads anywhere."""
    from layerprune.models import resolve_hub_model

    data = config.model_dump(mode="json", exclude_defaults=True)
    for part in data.get("slices") or []:
        for source in part["sources"]:
            if not Path(source["model"]).exists():
                repo_id, _, revision = source["model"].partition("@")
                source["model"], _ = resolve_hub_model(repo_id, revision or "main")
    return MergeConfiguration.model_validate(data)


def project_architecture(config: PretrainedConfig) -> ModelArchitecture | None:
    """The project-owned mergekit definition for this model, or None where mergekit's own is right."""
    if config.architectures == ["FalconForCausalLM"] and _falcon_one_norm(config):
        return _load_architecture("falcon_one_norm.json")
    return None


def _falcon_one_norm(config: PretrainedConfig) -> bool:
    # As FalconDecoderLayer decides: parallel attention gets ln_attn + ln_mlp when num_ln_in_parallel_attn is 2 (the
    # default with new_decoder_architecture: 40B, 180B), else one input_layernorm (7B; 11B sets it to 1).
    norms = config.num_ln_in_parallel_attn or (2 if config.new_decoder_architecture else 1)
    return config.parallel_attn and norms == 1


def _load_architecture(name: str) -> ModelArchitecture:
    definition = JsonModuleArchDef.model_validate_json((ARCHITECTURES / name).read_text())
    module = JsonModuleArchitecture(definition=definition)
    return ModelArchitecture(
        modules={"default": ModuleDefinition(architecture=module)},
        architectures=definition.architectures,
        model_type=definition.expected_model_type,
    )


@contextmanager
def _registered(arch: ModelArchitecture | None):
    """While mergekit runs, answer registry lookups of arch's names with arch alone.

    mergekit keys its registry by config.json's `architectures` name, then picks among same-name definitions by
    model_type. Ours shares both with the built-in falcon, so we swap the entry for one merge instead of
    registering it for good: the built-in still serves the two-norm layout."""
    if arch is None:
        yield
        return
    saved = {name: NAME_TO_ARCH[name] for name in arch.architectures}
    NAME_TO_ARCH.update({name: [arch] for name in arch.architectures})
    try:
        yield
    finally:
        NAME_TO_ARCH.update(saved)


@contextmanager
def _slicing_per_layer_lists(kept: list[int], num_layers: int):
    """Slice the per-layer lists of the config mergekit builds for the output, before it saves it.

    mergekit.merge.run_merge looks up _model_out_config at call time; there is no other hook between building the
    config and saving it, and saving is where transformers 5 rejects the unsliced lists."""
    build = mergekit.merge._model_out_config

    def build_sliced(*args, **kwargs):
        config = build(*args, **kwargs)
        slice_per_layer_lists(config.get_text_config(), kept, num_layers)
        return config

    mergekit.merge._model_out_config = build_sliced
    try:
        yield
    finally:
        mergekit.merge._model_out_config = build


def check_sliceable(config: PretrainedConfig) -> None:
    """UserError unless mergekit (with our definitions) knows this architecture.

    Without a definition mergekit infers the layout from tensor names, but then it cannot set the layer count of
    the output, and the slice does not load."""
    names = config.architectures or []
    mergekit_log = logging.getLogger("mergekit.architecture")
    level = mergekit_log.level
    mergekit_log.setLevel(logging.ERROR)  # its "No JSON architecture found" line would precede our one-line error
    try:
        with _registered(project_architecture(config)):
            known = len(names) == 1 and arch_info_for_config(config) is not None
    finally:
        mergekit_log.setLevel(level)
    if not known:
        name = ", ".join(names) or config.model_type
        raise UserError(f"mergekit {version('mergekit')} has no architecture definition for {name}; cannot slice it")


def _num_layers(config: PretrainedConfig) -> int:
    return config.get_text_config().num_hidden_layers


def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).exists() for name in TOKENIZER_FILES)


def _check_loads(model_dir: Path, base_config: PretrainedConfig, num_layers: int) -> None:
    # device_map="meta" builds the model and matches tensor names and shapes without reading a weight; its
    # "Loading weights" bar would only flash, so it stays off.
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, device_map="meta", output_loading_info=True)
    finally:
        if bar:
            transformers_logging.enable_progress_bar()
    problems = [f"{len(keys)} {kind} (e.g. {min(map(str, keys))})" for kind, keys in info.items() if keys]
    if _num_layers(model.config) != num_layers:
        problems.append(f"{_num_layers(model.config)} layers instead of {num_layers}")
    if problems:
        arch = (base_config.architectures or [base_config.model_type])[0]
        raise UserError(f"mergekit's slice of {arch} does not load with transformers: {'; '.join(problems)}")
