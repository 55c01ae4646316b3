"""Stage `frontier` in-process on a tiny Llama with planted cheap layers, read back from its outputs: each strategy's
column holds that strategy's pick (worked out by hand from the planted layers and hand-written distances), and
every distinct set of dropped layers is scored once. The stage runs once per module, with real lm-eval behind a spy
that records which layers each scored model lacks and what lm-eval said of it; the calibration losses are checked
against a naive reference."""
import csv
import importlib.util
import json

import pytest
import torch
from layerprune.tiny_models import VOCAB, tiny_llama, word_tokenizer

from conftest import REPO
from test_search import mean_nll, removed_by_hand
from layerprune.params import load_params
from layerprune.files import significant

NUM_LAYERS = 8
# Planted: layer 5 adds exactly nothing (its output projections are zero), layers 2 and 4 are scaled down.
# On the texts below (the model's own greedy continuations) that makes, by the naive reference (checked in
# test_premise_of_the_planted_model): layer 2 the cheapest single layer to drop (5 next: it costs exactly 0),
# {2, 5} the cheapest pair for the greedy search, and 4..5 the cheapest block of 2.
PLANTED_SCALES = {2: 0.3, 4: 0.6, 5: 0.0}
SIZES = (1, 2)
LOSS = {1: (2,), 2: (4, 5)}
ITERATIVE = {1: (2,), 2: (2, 5)}
# Hand-written distances: the block each similarity metric picks, by n (block_influence from its per-layer values)
ANGULAR_LAST = {1: (0,), 2: (2, 3)}
ANGULAR_MEAN = {1: (1,), 2: (4, 5)}  # at n=2 the same layers as `loss`: scored once
BLOCK_INFLUENCE = [0.9, 0.8, 0.7, 0.1, 0.6, 0.5, 0.4, 1.0]  # n=1: layer 3; n=2: 3..4 (0.7, the lowest pair sum)
BLOCK_INFLUENCE_PICK = {1: (3,), 2: (3, 4)}
DEEPEST = {1: (6,), 2: (5, 6)}  # the final layer is kept (prune.keep_last: 1)
EXPECTED = {"angular_last": ANGULAR_LAST, "angular_mean": ANGULAR_MEAN, "block_influence": BLOCK_INFLUENCE_PICK,
            "deepest": DEEPEST, "loss": LOSS, "iterative": ITERATIVE}
# 5 distinct sets at n=1 (loss = iterative), 5 at n=2 (angular_mean = loss)
DISTINCT = {(0,), (1,), (3,), (6,), (2,), (2, 3), (4, 5), (3, 4), (5, 6), (2, 5)}


def planted_model(scales=PLANTED_SCALES, num_layers=NUM_LAYERS, num_texts=4, seed=1):
    """A tiny Llama with the given layers' output projections scaled (0: the layer passes its input through), and
    texts it predicts well (its own greedy continuations, never the tokenizer's special ids 0..2), as token ids."""
    model = tiny_llama(num_layers=num_layers, seed=seed)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.lm_head.weight *= 30  # peaked predictions: its own continuations are far from chance
        for i, scale in scales.items():
            model.model.layers[i].self_attn.o_proj.weight *= scale
            model.model.layers[i].mlp.down_proj.weight *= scale
        texts = []
        for _ in range(num_texts):
            ids = torch.randint(3, VOCAB, (3,), generator=generator).tolist()
            while len(ids) < 16:
                logits = model(torch.tensor([ids])).logits[0, -1]
                logits[:3] = -float("inf")
                ids.append(int(logits.argmax()))
            texts.append(ids)
    return model, texts


def reference_nll(model, texts, dropped=()):
    """Mean next-token NLL of a copy with the layers deleted, one text at a time: independent of layerprune."""
    return mean_nll(removed_by_hand(model, dropped), texts)


def words(ids):
    return " ".join(f"w{i}" for i in ids)  # word_tokenizer: w<i> is token i for i >= 3


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": str(i), "text": text}) + "\n" for i, text in enumerate(texts)))
    return path


def write_distances(path, num_layers, picks, block_influence):
    """metric,n,start,distance rows: 0.5 + 0.01 * start + 0.001 * n (all different), 0.1 for the picked block;
    block_influence: the block's sum of per-layer values (what the stage recomputes from the n=1 rows)."""
    rows = []
    for n in range(1, num_layers):
        for start in range(num_layers - n + 1):
            for metric in ("angular_last", "angular_mean"):
                picked = picks.get(metric, {}).get(n) == tuple(range(start, start + n))
                rows.append(f"{metric},{n},{start},{0.1 if picked else 0.5 + 0.01 * start + 0.001 * n}")
            rows.append(f"block_influence,{n},{start},{sum(block_influence[start:start + n])}")
    path.write_text("metric,n,start,distance\n" + "\n".join(rows) + "\n")
    return path


def workspace(tmp_path, model, texts, changes=()):
    """Model folder (with a word tokenizer), model info, calibration and held-out texts, params, in tmp_path."""
    from test_errors import write_model_info, write_params

    model.save_pretrained(tmp_path / "base")
    word_tokenizer(VOCAB).save_pretrained(tmp_path / "base")
    write_model_info(tmp_path / "base.json", len(model.model.layers), "bundled:smollm2-135m", "LlamaForCausalLM",
                     tmp_path / "base")
    write_jsonl(tmp_path / "calibration.jsonl", [words(ids) for ids in texts])
    write_jsonl(tmp_path / "eval.jsonl", ["w5 w6 w7", "w8 w9"])
    return load_params(write_params(tmp_path / "params.yaml", {
        "model.device": "cpu", "similarity.max_length": 64, "similarity.batch_size": 3, "prune.keep_first": 0,
        "prune.keep_last": 1, "prune.search_texts": len(texts), "eval.max_length": 48, "eval.batch_size": 5,
        "slice.dtype": "float32", **dict(changes)}))


def load_stage(name):
    """stages/<name>.py as a module (its main() callable in this process)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    return planted_model()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_premise_of_the_planted_model(planted):
    """The hand-written LOSS and ITERATIVE picks, with clear margins, by the naive reference."""
    model, texts = planted
    base = reference_nll(model, texts)
    single = {i: reference_nll(model, texts, (i,)) - base for i in range(NUM_LAYERS - 1)}
    assert single[5] == pytest.approx(0, abs=1e-6)
    assert min(single, key=single.get) == 2 and all(single[i] > single[2] + 0.02 for i in single if i != 2)
    pairs = {s: reference_nll(model, texts, (s, s + 1)) - base for s in range(NUM_LAYERS - 2)}
    assert min(pairs, key=pairs.get) == 4 and all(pairs[s] > pairs[4] + 0.02 for s in pairs if s != 4)
    after_2 = {i: reference_nll(model, texts, (2, i)) - base for i in range(NUM_LAYERS - 1) if i != 2}
    assert min(after_2, key=after_2.get) == 5 and all(after_2[i] > after_2[5] + 0.02 for i in after_2 if i != 5)


def run_frontier(tmp_path, monkeypatch, planted):
    """Run the frontier stage's main() with a spy on lm-eval that records what each call scores.
    Returns (frontier.json, frontier.csv rows, the dropped sets scored in call order, the kwargs of each call,
    {dropped set: what lm-eval returned for it})."""
    model, texts = planted
    monkeypatch.chdir(tmp_path)  # write_timing writes logs/ under the working directory
    params = workspace(tmp_path, model, texts, {"frontier.layers": list(SIZES)})
    write_distances(tmp_path / "distances.csv", NUM_LAYERS,
                    {"angular_last": ANGULAR_LAST, "angular_mean": ANGULAR_MEAN}, BLOCK_INFLUENCE)
    (tmp_path / "base_metrics.json").write_text(json.dumps({"bits_per_byte": 1.5, "word_perplexity": 99.0}))
    # Each saved layer is recognised by one of its weights, whatever position it has in the pruned model
    fingerprints = {layer.self_attn.q_proj.weight[0, 0].item(): i for i, layer in enumerate(model.model.layers)}
    scored, arguments, results = [], [], {}
    stage = load_stage("frontier")
    real = stage.evaluate_perplexity

    def spy(pruned, eval_texts, **kwargs):
        kept = [fingerprints[layer.self_attn.q_proj.weight[0, 0].item()] for layer in pruned.model.layers]
        assert pruned.config.num_hidden_layers == len(kept)
        dropped = tuple(i for i in range(NUM_LAYERS) if i not in kept)
        scored.append(dropped)
        arguments.append({key: kwargs[key] for key in ("max_length", "batch_size", "device")})
        results[dropped] = real(pruned, eval_texts, **kwargs)
        return results[dropped]

    monkeypatch.setattr(stage, "evaluate_perplexity", spy)
    stage.main(params, model_info="base.json", distances="distances.csv", calibration="calibration.jsonl",
               eval_texts="eval.jsonl", base_metrics="base_metrics.json", plot="frontier.csv",
               metrics="frontier.json")
    with open(tmp_path / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads((tmp_path / "frontier.json").read_text()), rows, scored, arguments, results


@pytest.fixture(scope="module")
def frontier(tmp_path_factory, planted):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_frontier(tmp_path_factory.mktemp("frontier"), monkeypatch, planted)


def test_every_distinct_layer_set_is_scored_once(frontier):
    metrics, _, scored, arguments, _ = frontier
    assert sorted(scored) == sorted(DISTINCT), f"scored {scored}"  # each one, and none twice
    assert metrics["models_evaluated"] == len(DISTINCT) == 10
    assert arguments == [{"max_length": 48, "batch_size": 5, "device": "cpu"}] * len(scored)  # the eval.* params


def label(dropped):
    return ", ".join(str(i) for i in dropped) if len(dropped) == 1 or dropped[-1] - dropped[0] != len(dropped) - 1 \
        else f"{dropped[0]}..{dropped[-1]}"


def test_each_strategy_column_holds_its_own_pick(frontier, planted):
    model, texts = planted
    metrics, rows, _, _, results = frontier
    # lm-eval tells the scored sets apart, so a column holding another strategy's pick shows; only sets that differ
    # by layer 5 alone score the same (it adds nothing), and the dropped_layers labels tell those apart
    without_5 = {tuple(i for i in dropped if i != 5) for dropped in results}
    assert len({round(r["bits_per_byte"], 3) for r in results.values()}) == len(without_5) == 8
    bits = lambda dropped: significant(results[dropped]["bits_per_byte"])  # noqa: E731 (as the stage rounds)
    perplexity = lambda dropped: significant(results[dropped]["word_perplexity"])  # noqa: E731
    strategies = list(EXPECTED)
    for n in SIZES:
        key = str(n)
        assert metrics["dropped_layers"][key] == {s: label(EXPECTED[s][n]) for s in strategies}, n
        assert metrics["bits_per_byte"][key] == {s: bits(EXPECTED[s][n]) for s in strategies}, n
        assert metrics["word_perplexity"][key] == {s: perplexity(EXPECTED[s][n]) for s in strategies}
        for s in strategies:  # the real calibration loss of that strategy's pick, four significant digits
            assert metrics["calibration_loss"][key][s] == pytest.approx(
                reference_nll(model, texts, EXPECTED[s][n]), abs=6e-4), (n, s)
    assert metrics["base"] == {"bits_per_byte": 1.5, "word_perplexity": 99.0,
                               "calibration_loss": pytest.approx(reference_nll(model, texts), abs=6e-4)}
    # the plot: one row per n (0: the base model), one column per strategy
    assert [row["layers_removed"] for row in rows] == ["0", "1", "2"]
    assert all(float(rows[0][s]) == 1.5 for s in strategies)
    for row, n in zip(rows[1:], SIZES):
        assert {s: float(row[s]) for s in strategies} == {s: bits(EXPECTED[s][n]) for s in strategies}, n


def spearman(xs, ys):
    """Spearman's rho without ties: 1 - 6 * sum(d^2) / (m (m^2 - 1))."""
    rank = lambda values: {v: r for r, v in enumerate(sorted(values))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    m = len(xs)
    return 1 - 6 * sum((rx[x] - ry[y]) ** 2 for x, y in zip(xs, ys)) / (m * (m * m - 1))


def test_rank_correlations_against_the_block_losses(frontier, planted):
    model, texts = planted
    metrics = frontier[0]
    losses = [reference_nll(model, texts, (s, s + 1)) for s in range(NUM_LAYERS - 2)]  # n=2, starts 0..5
    last = [0.1 if s == 2 else 0.5 + 0.01 * s + 0.002 for s in range(6)]
    mean = [0.1 if s == 4 else 0.5 + 0.01 * s + 0.002 for s in range(6)]
    influence = [sum(BLOCK_INFLUENCE[s:s + 2]) for s in range(6)]
    assert metrics["spearman_vs_calibration_loss"]["2"] == pytest.approx(
        {"angular_last": spearman(last, losses), "angular_mean": spearman(mean, losses),
         "block_influence": spearman(influence, losses)}, abs=1e-4)
