import csv
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from layerprune.tiny_models import ALL_LAYOUTS, VOCAB, tiny_llama, word_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config

from layerprune.errors import UserError
from layerprune.forward import tokenize
from layerprune.layers import decoder_layers
from layerprune.similarity import Distances, angular, cosines, layer_distances

LENGTHS = [2, 5, 9, 17, 3, 12, 30, 7, 20, 11]
FINAL_NORM = {
    "llama": ("model", "norm"), "gemma3": ("model", "norm"), "falcon": ("transformer", "ln_f"), "gpt2": ("transformer", "ln_f"),
}


def tiny_gpt2():
    # Absolute position embeddings: with left padding, the position ids must count real tokens only.
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def build(layout):
    """A tiny model with random norm weights: at init they are all ones, and an RMSNorm with unit weights keeps
    every direction, so a final norm wrongly applied to x_L would not change any angle."""
    model = tiny_gpt2() if layout == "gpt2" else ALL_LAYOUTS[layout]()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norm weights and biases
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    return model


LAYOUTS = sorted(FINAL_NORM)


pytestmark = pytest.mark.usefixtures("one_thread")


def samples(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in LENGTHS]


def reference(model, layout, token_ids):
    """Independent of the library: batch size 1, HF hidden_states, per-pair cosine_similarity, plain loops.

    With the final norm swapped for Identity, HF's last hidden state is the last layer's raw output x_L.
    """
    owner_name, norm_name = FINAL_NORM[layout]
    owner = getattr(model, owner_name)
    norm = getattr(owner, norm_name)
    setattr(owner, norm_name, torch.nn.Identity())
    try:
        with torch.no_grad():
            states = [
                torch.stack(model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states)[:, 0].double()
                for ids in token_ids
            ]  # per sample: (L+1, tokens, D)
    finally:
        setattr(owner, norm_name, norm)
    num_layers = len(states[0]) - 1

    def angles(x, i, j):  # (tokens,) angular distance between x_i and x_j at every token
        return torch.arccos(torch.nn.functional.cosine_similarity(x[i], x[j], dim=-1).clamp(-1, 1)) / math.pi

    last = np.full((num_layers, num_layers), np.nan)
    mean = np.full((num_layers, num_layers), np.nan)
    for n in range(1, num_layers):
        for start in range(num_layers - n + 1):
            last[n, start] = np.mean([angles(x, start, start + n)[-1].item() for x in states])
            mean[n, start] = np.mean([angles(x, start, start + n).mean().item() for x in states])
    influence = np.array([
        1 - torch.cat([torch.nn.functional.cosine_similarity(x[i], x[i + 1], dim=-1) for x in states]).mean().item()
        for i in range(num_layers)
    ])
    return last, mean, influence


def test_angular_on_hand_made_vectors():
    third = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    vectors = torch.stack([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([-1.0, 0.0]), third])
    expected = torch.tensor([
        [0, 1 / 2, 1, 1 / 3],
        [1 / 2, 0, 1 / 2, 1 / 6],
        [1, 1 / 2, 0, 2 / 3],
        [1 / 3, 1 / 6, 2 / 3, 0],
    ], dtype=torch.float64)
    torch.testing.assert_close(angular(cosines(vectors)), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(layout):
    model = build(layout)
    token_ids = samples()
    got = layer_distances(model, token_ids, batch_size=4, progress=False)
    last, mean, influence = reference(model, layout, token_ids)
    assert (got.num_layers, got.num_samples, got.num_tokens) == (6, len(LENGTHS), sum(LENGTHS))
    np.testing.assert_allclose(got.angular_last, last, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.angular_mean, mean, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.block_influence, influence, atol=1e-5, rtol=0)
    # The first and last token differ, so the two variants must too: guards against swapping them.
    assert np.nanmax(np.abs(got.angular_last - got.angular_mean)) > 1e-3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_for_any_batch_size_and_padding_side(layout):
    model = build(layout)
    token_ids = samples()
    alone = layer_distances(model, token_ids, batch_size=1, progress=False)
    for padding_side in ("right", "left"):
        batched = layer_distances(model, token_ids, batch_size=8, padding_side=padding_side, pad_id=3, progress=False)
        for metric in ("angular_last", "angular_mean", "block_influence"):
            np.testing.assert_allclose(batched.scores(metric), alone.scores(metric), atol=1e-5, rtol=0, err_msg=f"{padding_side} {metric}")


def test_identity_layers_score_zero():
    model = tiny_llama(num_layers=6)
    for i in (2, 3):  # residual + 0: these layers pass their input through unchanged
        model.model.layers[i].self_attn.o_proj.weight.data.zero_()
        model.model.layers[i].mlp.down_proj.weight.data.zero_()
    got = layer_distances(model, samples(), batch_size=4, progress=False)
    inside = {(1, 2), (1, 3), (2, 2)}
    for metric in ("angular_last", "angular_mean", "block_influence"):
        matrix = got.scores(metric)
        for n in range(1, 6):
            for start in range(6 - n + 1):
                if (n, start) in inside:
                    assert abs(matrix[n, start]) < 1e-6, (metric, n, start)
                else:
                    assert matrix[n, start] > 1e-3, (metric, n, start)
        assert got.best_starts(metric)[2][0] == 2
    np.testing.assert_array_less(np.abs(got.block_influence[[2, 3]]), 1e-6)


def test_matrix_layout_and_block_influence_sums():
    got = layer_distances(tiny_llama(num_layers=5), samples(), batch_size=3, progress=False)
    for metric in ("angular_last", "angular_mean", "block_influence"):
        matrix = got.scores(metric)
        assert matrix.shape == (5, 5)
        valid = np.array([[n >= 1 and start + n <= 5 for start in range(5)] for n in range(5)])
        assert np.isnan(matrix[~valid]).all() and not np.isnan(matrix[valid]).any()
    summed = got.scores("block_influence")
    for n in range(1, 5):
        for start in range(5 - n + 1):
            assert summed[n, start] == pytest.approx(got.block_influence[start : start + n].sum(), abs=1e-12)


def test_rows_round_trip_through_csv():
    got = layer_distances(tiny_llama(num_layers=4), samples(), batch_size=4, progress=False)
    rows = got.to_rows()
    assert len(rows) == 3 * sum(4 - n + 1 for n in range(1, 4))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["metric", "n", "start", "distance"])
    writer.writeheader()
    writer.writerows(rows)
    back = Distances.from_rows(csv.DictReader(io.StringIO(buffer.getvalue())), num_samples=got.num_samples, num_tokens=got.num_tokens)
    assert back.num_layers == 4  # the CSV keeps 6 significant digits
    np.testing.assert_allclose(back.angular_last, got.angular_last, rtol=5e-6, atol=0)
    np.testing.assert_allclose(back.angular_mean, got.angular_mean, rtol=5e-6, atol=0)
    np.testing.assert_allclose(back.block_influence, got.block_influence, rtol=5e-6, atol=0)
    assert back.to_rows() == rows  # and reads back to the same rows
    assert back.best_starts("block_influence").keys() == got.best_starts("block_influence").keys()
    for n, (start, value) in got.best_starts("block_influence").items():
        assert back.best_starts("block_influence")[n] == (start, pytest.approx(value, rel=5e-6))


def test_tokenize_keeps_the_first_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["El río Amazonas es el más caudaloso del mundo. " * 20, "", "hola mundo"]
    full = tokenizer(texts)["input_ids"]
    assert len(full[0]) > 16 and len(full[1]) < 2 and 2 <= len(full[2]) <= 16
    ids, dropped = tokenize(tokenizer, texts, max_length=16)
    assert ids == [full[0][:16], full[2]]
    assert dropped == 1


def test_hooks_are_removed_and_finder_names_the_model():
    model = tiny_llama()
    layer_distances(model, samples(), batch_size=4, progress=False)
    assert decoder_layers(model) is model.model.layers
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.model.layers)
    model.config.num_hidden_layers = 7
    with pytest.raises(UserError, match="LlamaForCausalLM"):
        decoder_layers(model)


def test_several_chunks_per_batch_match_the_reference(monkeypatch):
    import layerprune.similarity as similarity

    model = build("llama")
    token_ids = samples()
    width = (len(model.model.layers) + 1) * model.config.hidden_size
    monkeypatch.setattr(similarity, "CHUNK_ELEMENTS", 3 * width)  # 3 tokens per chunk: a batch spans many chunks
    chunks = []
    monkeypatch.setattr(similarity, "cosines", lambda vectors: chunks.append(len(vectors)) or cosines(vectors))
    got = layer_distances(model, token_ids, batch_size=4, progress=False)
    assert max(chunks) == 3 and len(chunks) >= sum(LENGTHS) / 3
    last, mean, influence = reference(model, "llama", token_ids)
    np.testing.assert_allclose(got.angular_last, last, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.angular_mean, mean, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.block_influence, influence, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_head_is_never_called(layout):
    model = build(layout)

    def fail(*args):
        raise AssertionError("lm_head called: logits are unused")

    model.get_output_embeddings().register_forward_pre_hook(fail)
    with pytest.raises(AssertionError, match="lm_head called"):  # the hook does fire on a full forward
        model(input_ids=torch.tensor([[1, 2, 3]]))
    layer_distances(model, samples(), batch_size=4, progress=False)


def test_tokenize_keeps_bos_and_needs_a_token_after_it():
    tokenizer = word_tokenizer(VOCAB, bos=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("w5")["input_ids"] == [bos, 5]  # this tokenizer adds BOS, as Gemma's does
    ids, dropped = tokenize(tokenizer, ["", "w5", "w7 w8 w9 w10 w11", "w12 w13"], max_length=4)
    # "" is BOS alone: dropped. BOS + one token is kept. Truncation keeps BOS and the first max_length - 1 words.
    assert ids == [[bos, 5], [bos, 7, 8, 9], [bos, 12, 13]]
    assert dropped == 1


def write_word_model(folder):
    """A tiny Llama and a word-level tokenizer over its 128 ids, saved as a model folder."""
    tiny_llama().save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("num_texts", [2, 4, 10])
def test_two_processes_give_the_matrix_of_one(tmp_path, num_texts):
    """The stage under torchrun with 2 gloo processes, against one process in this one. 2 texts in batches of 2:
    one batch, so process 1 scores nothing and must still join the sums (with zeros). 4 texts: each process
    scores one whole batch, and the sums are bit-identical, so the CSVs (6 significant digits) are too. 10 texts: 3
    and 2 batches; only the order of the float64 additions differs (~1e-16), which the 6th digit may show only
    when a value lies on a rounding boundary."""
    from test_errors import write_model_info, write_params

    from layerprune.files import read_csv
    from layerprune.models import load_model

    model_dir = write_word_model(tmp_path / "model")
    info = write_model_info(tmp_path / "base.json", 6, "bundled:smollm2-135m", "LlamaForCausalLM", model_dir)
    generator = torch.Generator().manual_seed(3)
    texts = [" ".join(f"w{i}" for i in torch.randint(3, VOCAB, (n,), generator=generator).tolist())
             for n in LENGTHS[:num_texts]]
    rows = [json.dumps({"id": str(i), "text": text}) + "\n" for i, text in enumerate(texts)]
    (tmp_path / "cal.jsonl").write_text("".join(rows))
    params = write_params(tmp_path / "params.yaml", {"similarity.batch_size": 2, "similarity.processes": 2,
                                                      "model.device": "cpu"})
    result = subprocess.run(
        # as dvc.yaml runs it: similarity.processes=2 makes the stage relaunch itself under torchrun
        [sys.executable, REPO / "stages/layer_similarity.py", "--params", params, "--model-info", info, "--calibration", "cal.jsonl",
         "--distances", "distances.csv", "--metrics", "similarity.json", "--checkpoints", "checkpoints"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "checkpoints").iterdir()) == []  # each rank removed its own sums at the end
    metrics = json.loads((tmp_path / "similarity.json").read_text())
    assert (metrics["samples"], metrics["tokens"]) == (num_texts, sum(LENGTHS[:num_texts]))
    got = Distances.from_rows(read_csv(tmp_path / "distances.csv"), num_samples=0, num_tokens=0)

    model, tokenizer = load_model(model_dir, "cpu")
    one = layer_distances(model, tokenize(tokenizer, texts, 128)[0], batch_size=2, progress=False)
    one = one.as_written()  # as the CSV keeps it: 6 significant digits
    for metric in ("angular_last", "angular_mean", "block_influence"):
        if num_texts <= 4:
            np.testing.assert_array_equal(got.scores(metric), one.scores(metric), err_msg=metric)
        else:
            np.testing.assert_allclose(got.scores(metric), one.scores(metric), atol=0, rtol=1e-5, err_msg=metric)


def test_processes_must_be_positive():
    import yaml

    from layerprune.params import parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(raw).similarity.processes == 1
    raw["similarity"]["processes"] = 0
    with pytest.raises(UserError, match=r"^params.yaml: similarity.processes=0: Input should be greater than 0$"):
        parse_params(raw)


def test_the_csv_is_the_same_at_any_thread_count_and_batch_size(tmp_path):
    """plots/layer_distances.csv is in git: a rerun with other threads or batches must rewrite it unchanged, though
    the float32 sums behind it differ in the last digits (checked first, so the test is not vacuous)."""
    import torch

    from layerprune.files import write_csv

    model, token_ids = build("llama"), samples()
    runs = {}
    for threads, batch_size in ((1, 4), (2, 8)):
        torch.set_num_threads(threads)
        runs[threads, batch_size] = layer_distances(model, token_ids, batch_size=batch_size, progress=False)
        write_csv(tmp_path / f"{threads}-{batch_size}.csv", runs[threads, batch_size].to_rows())
    torch.set_num_threads(1)
    one, other = runs.values()
    assert not np.array_equal(one.angular_mean, other.angular_mean, equal_nan=True)
    assert (tmp_path / "1-4.csv").read_bytes() == (tmp_path / "2-8.csv").read_bytes()
