"""Real mergekit on real (tiny, random) models: the slice must compute exactly what the original model computes
with the same layers removed in memory."""
import copy
import json

import mergekit.merge
import pytest
import torch
from mergekit.architecture.json_definitions import NAME_TO_ARCH
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from layerprune.tiny_models import ALL_LAYOUTS, VOCAB, build, tiny_falcon11b, tiny_gemma3
from transformers import AutoModelForCausalLM, AutoTokenizer, FalconConfig, OPTConfig, PreTrainedTokenizerFast

import layerprune.slicing
from layerprune.errors import UserError
from layerprune.ranges import kept_ranges, passthrough_config
from layerprune.slicing import slice_model
from layerprune.strategies import Block

BLOCK = Block(1, 2)  # of 6 layers: keeps 0, 3, 4, 5; moves Gemma 3's full-attention layer 5 to position 3


def _config(base_dir, block=BLOCK, num_layers=6):
    return passthrough_config(str(base_dir), kept_ranges(num_layers, block), "float32")


def _drop_in_memory(model, block):
    """The reference: the same model object with the block's layers deleted."""
    model = copy.deepcopy(model)
    config = model.config
    kept = [i for i in range(config.num_hidden_layers) if not block.start <= i < block.stop]
    owner = model.transformer if hasattr(model, "transformer") else model.model
    name = "h" if hasattr(model, "transformer") else "layers"
    setattr(owner, name, torch.nn.ModuleList(getattr(owner, name)[i] for i in kept))
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    return model


def _assert_same_logits(model, out_dir, block=BLOCK):
    sliced = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    reference = _drop_in_memory(model, block)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        want = reference(ids, use_cache=False).logits
        got = sliced(ids, use_cache=False).logits
        whole = model(ids, use_cache=False).logits
    assert not torch.allclose(whole, want, atol=1e-3)  # the block matters, so the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", sorted(ALL_LAYOUTS))
def test_slice_equals_dropping_layers_in_memory(layout, tmp_path):
    model = ALL_LAYOUTS[layout]()
    model.save_pretrained(tmp_path / "base")
    slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    _assert_same_logits(model, tmp_path / "out")


def _falcon(**kwargs):
    config = FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, alibi=False, **kwargs
    )
    return build(config, seed=0)


FALCON_VARIANTS = {
    "11b-bias": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, bias=True),
    "7b": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
    # the two-norm 40B layout keeps mergekit's built-in definition (which needs an untied lm_head)
    "40b": dict(new_decoder_architecture=True, num_kv_heads=2, bias=False, tie_word_embeddings=False),
}


@pytest.mark.parametrize("variant", sorted(FALCON_VARIANTS))
def test_falcon_variants(variant, tmp_path):
    builtin = NAME_TO_ARCH["FalconForCausalLM"]
    model = _falcon(**FALCON_VARIANTS[variant])
    model.save_pretrained(tmp_path / "base")
    uses_ours = layerprune.slicing.project_architecture(model.config) is not None
    assert uses_ours == (variant != "40b")
    slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    _assert_same_logits(model, tmp_path / "out")
    assert NAME_TO_ARCH["FalconForCausalLM"] is builtin  # the registry is only borrowed


def test_gemma3_layer_types_follow_the_kept_layers(tmp_path):
    tiny_gemma3().save_pretrained(tmp_path / "base")
    original = json.loads((tmp_path / "base" / "config.json").read_text())["layer_types"]
    builder = mergekit.merge._model_out_config
    slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    want = [t for i, t in enumerate(original) if i not in (1, 2)]
    assert written["num_hidden_layers"] == 4 and written["layer_types"] == want
    assert want != original[:4]  # plain truncation would be wrong here
    assert mergekit.merge._model_out_config is builder


# UPSTREAM CHECK. These pin the two mergekit 0.1.5 failures that layerprune/slicing.py works around, by calling
# mergekit's own run_merge without our fixes. When one starts failing, mergekit has fixed the bug: drop the
# workaround in slicing.py (the project-owned falcon definition, or the per-layer-list hook).
@pytest.mark.parametrize(
    "make, error",
    [
        (tiny_falcon11b, r"Tensor transformer\.h\.\d+\.ln_attn\.bias required but not present"),
        (tiny_gemma3, r"`num_hidden_layers` \(4\) must be equal to the number of `layer_types` \(6\)"),
    ],
    ids=["falcon11b", "gemma3"],
)
def test_upstream_mergekit_still_fails_without_our_fixes(make, error, tmp_path):
    make().save_pretrained(tmp_path / "base")
    merge_config = MergeConfiguration.model_validate(_config(tmp_path / "base"))
    with pytest.raises(Exception, match=error):
        run_merge(merge_config, str(tmp_path / "out"), MergeOptions(copy_tokenizer=False, quiet=True))


def _save_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 20)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)


def test_tokenizer_comes_along(tmp_path):
    tiny_gemma3().save_pretrained(tmp_path / "base")
    _save_tokenizer(tmp_path / "base")
    slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("w3 w7 xx")["input_ids"] == [3, 7, 0]

    _save_tokenizer(tmp_path / "elsewhere")
    tiny_gemma3().save_pretrained(tmp_path / "bare")
    slice_model(_config(tmp_path / "bare"), tmp_path / "out2", copy_tokenizer_from=tmp_path / "elsewhere")
    assert AutoTokenizer.from_pretrained(tmp_path / "out2")("w5")["input_ids"] == [5]


def test_no_tokenizer_to_copy(tmp_path):
    tiny_gemma3().save_pretrained(tmp_path / "base")
    slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    assert not any((tmp_path / "out" / name).exists() for name in layerprune.slicing.TOKENIZER_FILES)
    with pytest.raises(UserError, match="no tokenizer to copy"):
        slice_model(_config(tmp_path / "base"), tmp_path / "out2", copy_tokenizer_from=tmp_path / "base")
    assert not (tmp_path / "out2").exists()


def test_killed_run_leaves_no_half_written_output(tmp_path, monkeypatch):
    tiny_gemma3().save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("old")

    def merge_then_die(*args, **kwargs):
        run_merge(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(layerprune.slicing, "run_merge", merge_then_die)
    with pytest.raises(KeyboardInterrupt):
        slice_model(_config(tmp_path / "base"), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]
    assert [p.name for p in out.iterdir()] == ["previous"]

    monkeypatch.undo()
    slice_model(_config(tmp_path / "base"), out, progress=False)
    assert not (out / "previous").exists() and (out / "model.safetensors").exists()


def test_architecture_mergekit_does_not_know(tmp_path):
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=6, num_attention_heads=4, word_embed_proj_dim=32
    )
    build(config, seed=0).save_pretrained(tmp_path / "base")
    with pytest.raises(UserError, match="no architecture definition for OPTForCausalLM") as err:
        slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_output_that_does_not_load_is_refused(tmp_path, monkeypatch):
    # a definition that forgets a tensor: mergekit writes the slice without it, the load check must catch it
    definition = json.loads((layerprune.slicing.ARCHITECTURES / "falcon_one_norm.json").read_text())
    templates = definition["layer_templates"]["weights"]
    definition["layer_templates"]["weights"] = [w for w in templates if "dense_4h_to_h.weight" not in w["name"]]
    (tmp_path / "architectures").mkdir()
    (tmp_path / "architectures" / "falcon_one_norm.json").write_text(json.dumps(definition))
    monkeypatch.setattr(layerprune.slicing, "ARCHITECTURES", tmp_path / "architectures")
    tiny_falcon11b().save_pretrained(tmp_path / "base")
    with pytest.raises(UserError, match=r"FalconForCausalLM does not load with transformers: 4 missing_keys"):
        slice_model(_config(tmp_path / "base"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_merge_config_round_trips_through_its_yaml(tmp_path):
    """choose-range writes mergekit's own YAML (MergeConfiguration.to_yaml); the slice stage reads the same config."""
    from layerprune.slicing import load_merge_config

    config = passthrough_config("org/name@0123abc", kept_ranges(60, Block(24, 31)), "bfloat16")
    (tmp_path / "slice.yaml").write_text(config.to_yaml() + "\n")
    back = load_merge_config(tmp_path / "slice.yaml")
    assert back == config and [s.sources[0].layer_range for s in back.slices] == [(0, 24), (55, 60)]
    assert str(back.slices[0].sources[0].model) == "org/name@0123abc"  # the commit pin survives
