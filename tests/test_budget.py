"""The memory budget (LAYERPRUNE_MEMORY): a model that does not fit is read layer by layer from its safetensors files,
with the same numbers to the bit, and a budget too small says in one line how much it needs."""
import numpy as np
import pytest
import torch
from layerprune.tiny_models import VOCAB, build, tiny_llama, word_tokenizer
from transformers import FalconConfig

from layerprune.budget import ENV_VAR, Workload, gib, memory_budget, plan
from layerprune.errors import UserError
from layerprune.forward import tokenize
from layerprune.models import load_model
from layerprune.perplexity import evaluate_perplexity
from layerprune.search import LossSearch
from layerprune.similarity import layer_distances

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [" ".join(f"w{(7 * i + j) % (VOCAB - 3) + 3}" for j in range(9 + 5 * i)) for i in range(6)]
WORKLOAD = Workload(tokens=2 * 40, length=40, kept_states=7)


@pytest.mark.parametrize("text, expected", [("10GiB", 10 * 2**30), ("12GB", 12 * 10**9), ("800MiB", 800 * 2**20),
                                            ("1.5 gib", 3 * 2**29), ("123456", 123456), ("64k", 64000)])
def test_budget_is_read_in_any_usual_unit(monkeypatch, text, expected):
    monkeypatch.setenv(ENV_VAR, text)
    assert memory_budget() == expected


@pytest.mark.parametrize("text", ["ten gigs", "10 GiB of it", "0", "-1GB"])
def test_a_budget_that_is_not_an_amount_is_one_line(monkeypatch, text):
    monkeypatch.setenv(ENV_VAR, text)
    with pytest.raises(UserError, match=rf"^{ENV_VAR}='{text}': expected an amount of memory such as 10GiB"):
        memory_budget()


def test_no_budget_means_none(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert memory_budget() is None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 6-layer model of Falcon-11B's layout (one norm, parallel attention, untied head), wide enough that a layer
    outweighs a batch's activations, in bf16 safetensors shards, with its tokenizer."""
    folder = tmp_path_factory.mktemp("falcon")
    config = FalconConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                          num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True,
                          num_ln_in_parallel_attn=1, bias=False, alibi=False, tie_word_embeddings=False)
    build(config, seed=3).to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    word_tokenizer(VOCAB).save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def budget_keeping(model_dir, layers: int) -> int:
    """A budget that holds the resident parts, `layers` decoder layers, one layer streaming in (1.5 layers: bf16 as
    read and fp32) and WORKLOAD's activations, with half a layer to spare (the head streams: it does not fit)."""
    model, _ = load_model(model_dir, "cpu")
    resident = sum(p.numel() * 4 for p in (*model.transformer.word_embeddings.parameters(),
                                             *model.transformer.ln_f.parameters()))
    layer = sum(p.numel() * 4 for p in model.transformer.h[0].parameters())
    return resident + (layers + 2) * layer + WORKLOAD.activation_bytes(model.config, 4)


@pytest.fixture
def budgeted(monkeypatch, model_dir):
    """Two of six decoder layers stay, the others are read for each pass."""
    monkeypatch.setenv(ENV_VAR, str(int(budget_keeping(model_dir, 2))))


def test_the_budget_keeps_embedding_rotary_and_norm_and_streams_the_rest(model_dir, budgeted):
    model, _ = load_model(model_dir, "cpu", workload=WORKLOAD)
    where = model.hf_device_map
    resident = ("transformer.word_embeddings", "transformer.rotary_emb", "transformer.ln_f")
    assert {where[name] for name in resident} == {"cpu"}
    assert [where[f"transformer.h.{i}"] for i in range(6)] == ["cpu"] * 2 + ["disk"] * 4  # the first ones stay
    assert model.device.type == "cpu"  # not meta: lm-eval and our batches read it
    # every layer hands what its pass freed back to the OS (budget.return_freed_memory)
    assert all(len(layer._forward_hooks) == 1 for layer in model.transformer.h)


def test_similarity_is_the_same_to_the_bit_within_a_budget(model_dir, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    model, tokenizer = load_model(model_dir, "cpu")
    ids, _ = tokenize(tokenizer, TEXTS, 40)
    free = layer_distances(model, ids, batch_size=2, progress=False)
    monkeypatch.setenv(ENV_VAR, str(int(budget_keeping(model_dir, 2))))
    streamed, _ = load_model(model_dir, "cpu", workload=WORKLOAD)
    assert "disk" in streamed.hf_device_map.values()
    budget = layer_distances(streamed, ids, batch_size=2, progress=False)
    for metric in ("angular_last", "angular_mean"):
        np.testing.assert_array_equal(getattr(budget, metric), getattr(free, metric))
    np.testing.assert_array_equal(budget.block_influence, free.block_influence)


def test_perplexity_and_search_are_the_same_to_the_bit_within_a_budget(model_dir, monkeypatch, tmp_path):
    import json

    texts = tmp_path / "eval.jsonl"
    texts.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))

    def measure():
        scored = evaluate_perplexity(model_dir, texts, max_length=16, batch_size=2, work_dir=tmp_path / "lm_eval")
        model, tokenizer = load_model(model_dir, "cpu", workload=WORKLOAD)
        search = LossSearch(model, tokenize(tokenizer, TEXTS, 40)[0], batch_size=2, progress=False)
        losses = search.block_losses((), [(1, 2), (3,)]) + [search.full_loss((2, 3))]
        return scored["word_perplexity"], scored["bits_per_byte"], losses, model

    monkeypatch.delenv(ENV_VAR, raising=False)
    free = measure()
    monkeypatch.setenv(ENV_VAR, str(int(budget_keeping(model_dir, 2))))
    budget = measure()
    assert "disk" in budget[3].hf_device_map.values()
    assert budget[:3] == free[:3]


def test_a_budget_too_small_says_how_much_it_needs(model_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1KiB")
    with pytest.raises(UserError) as error:
        load_model(model_dir, "cpu", workload=WORKLOAD)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{ENV_VAR}=1 KiB cannot hold this model's resident parts")
    assert "it needs at least" in message


def test_what_the_budget_needs_is_enough():
    """The least a budget may be (what the error names) is accepted, and streams every layer; a byte less is not."""
    with torch.device("meta"):
        model = tiny_llama(num_layers=4)
    with pytest.raises(UserError, match=r"it needs at least"):
        plan(model, 1, (WORKLOAD,), device="cpu", element_bytes=4)
    # the same sum the error reports, from the parts: resident (embedding, norm, rotary), 1.5 layers, activations
    resident = sum(t.numel() * 4 for t in (*model.model.embed_tokens.parameters(), *model.model.norm.parameters(),
                                           *model.model.rotary_emb.buffers()))
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    activations = WORKLOAD.activation_bytes(model.config, 4)
    needed = resident + 3 * layer // 2 + activations
    placement = plan(model, needed, (WORKLOAD,), device="cpu", element_bytes=4)
    assert placement.resident_layers == 0 and set(placement.device_map.values()) == {"cpu", "disk"}
    with pytest.raises(UserError):
        plan(model, needed - 1, (WORKLOAD,), device="cpu", element_bytes=4)


def test_a_heal_beyond_the_budget_is_one_line_before_a_weight_is_read(model_dir, monkeypatch):
    import yaml

    from conftest import REPO
    from layerprune.heal import check_budget
    from layerprune.params import parse_params

    heal = parse_params(yaml.safe_load((REPO / "params.yaml").read_text())).heal  # trainable: cut, 2 per side
    model, _ = load_model(model_dir, "cpu")
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for i in (1, 2, 3, 4) for p in model.transformer.h[i].parameters())
    # fp32 weights, and gradients and two Adam moments of the 4 layers around a cut at 3: a floor under the estimate
    floor = 4 * parameters + 12 * trainable
    monkeypatch.setenv(ENV_VAR, str(floor))
    with pytest.raises(UserError) as error:
        check_budget(heal, model_dir, cut=[1, 2, 3, 4], batch_per_process=2)
    message = str(error.value)
    assert "\n" not in message and message.startswith("heal: training this ")
    assert message.endswith(f"more than {ENV_VAR}={gib(floor)}; heal.tokens: 0 releases the pruned model unhealed")
    monkeypatch.setenv(ENV_VAR, "1GiB")
    assert check_budget(heal, model_dir, cut=[1, 2, 3, 4], batch_per_process=2) > floor
    monkeypatch.delenv(ENV_VAR)
    assert check_budget(heal, model_dir, cut=[1, 2, 3, 4], batch_per_process=2) == 0  # no budget, nothing to check
