"""Stage `choose-range` with prune.strategy=loss, in-process on the tiny Llama of test_frontier_stage with planted
cheap layers: it must drop the planted block (not the block the distances favour), scored on the first
prune.search_texts calibration texts only; and the loss search's error paths."""
import csv
import json

import pytest
import yaml
from test_frontier_stage import load_stage, planted_model, reference_nll, workspace, write_distances, write_jsonl

from layerprune.errors import UserError
from layerprune.search import LossSearch

NUM_LAYERS = 8
PLANTED_BLOCK = (4, 5)  # layer 5 adds exactly nothing, layer 4 is scaled down (test_frontier_stage's premise test)
SEARCH_TEXTS = 4  # of 6 calibration texts: the premise holds on the first 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def planted():
    return planted_model(num_texts=6)


def choose_range(tmp_path, params):
    stage = load_stage("choose_range")
    stage.main(params, model_info=tmp_path / "base.json", distances=tmp_path / "distances.csv",
               calibration=tmp_path / "calibration.jsonl", merge_config=tmp_path / "slice.yaml",
               metrics=tmp_path / "choice.json", heatmap=tmp_path / "h.png", curve=tmp_path / "curve.csv",
               block_losses=tmp_path / "losses.csv")


def loss_workspace(tmp_path, planted, **changes):
    model, texts = planted
    params = workspace(tmp_path, model, texts, {"prune.strategy": "loss", "prune.layers": 2,
                                                "prune.search_texts": SEARCH_TEXTS, **changes})
    # the distances favour 0..1: a stage that fell back to them would drop that block
    write_distances(tmp_path / "distances.csv", NUM_LAYERS, {"angular_last": {2: (0, 1)}}, [0.5] * NUM_LAYERS)
    return params


def test_loss_strategy_drops_the_planted_block(tmp_path, planted):
    model, texts = planted
    choose_range(tmp_path, loss_workspace(tmp_path, planted))
    searched = texts[:SEARCH_TEXTS]
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["strategy"] == "loss" and choice["dropped"] == [4, 5] and choice["dropped_layers"] == "4..5"
    assert choice["start"] == 4 and choice["distance"] == pytest.approx(0.5 + 0.04 + 0.002)  # its angular_last
    assert choice["score_name"] == "calibration loss"
    assert choice["score"] == pytest.approx(reference_nll(model, searched, PLANTED_BLOCK), abs=2e-5)
    # on all six texts the loss differs: the search scored the first prune.search_texts only
    assert abs(reference_nll(model, texts, PLANTED_BLOCK) - choice["score"]) > 1e-3
    assert choice["kept_ranges"] == "[0,4] + [6,8]" and choice["layers_kept"] == 6
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert (choice["parameters_before"], choice["parameters_after"]) == (total, total - 2 * per_layer)
    slices = yaml.safe_load((tmp_path / "slice.yaml").read_text())["slices"]
    assert [s["sources"][0]["layer_range"] for s in slices] == [[0, 4], [6, 8]]
    assert {s["sources"][0]["model"] for s in slices} == {str(tmp_path / "base")}
    with open(tmp_path / "losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["start"]) for row in rows] == list(range(NUM_LAYERS - 2))  # every allowed block of 2
    for row in rows:
        start = int(row["start"])
        assert row["dropped"] == f"{start}..{start + 1}" and row["step"] == "1"
        assert float(row["loss"]) == pytest.approx(reference_nll(model, searched, (start, start + 1)), abs=2e-5)


def test_more_search_texts_than_calibration_texts(tmp_path, planted):
    params = loss_workspace(tmp_path, planted, **{"prune.search_texts": 9})
    with pytest.raises(UserError, match=r"^prune.search_texts=9: the calibration set has only 6 texts "
                                        r"\(sample.calibration\)$"):
        choose_range(tmp_path, params)
    assert not (tmp_path / "slice.yaml").exists() and not (tmp_path / "choice.json").exists()


@pytest.mark.parametrize("strategy", ["loss", "iterative"])
def test_calibration_texts_of_one_token_are_no_texts_to_score(tmp_path, planted, strategy):
    params = loss_workspace(tmp_path, planted, **{"prune.strategy": strategy, "prune.search_texts": 3})
    write_jsonl(tmp_path / "calibration.jsonl", ["w5", "", "w7"])  # under 2 tokens each: nothing to predict
    with pytest.raises(UserError, match=r"^no texts to score \(every calibration text had fewer than 2 tokens\)$"):
        choose_range(tmp_path, params)
    assert not (tmp_path / "slice.yaml").exists()


def test_a_block_must_be_consecutive_among_the_kept_layers(planted):
    model, texts = planted
    search = LossSearch(model, texts, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"^block \(1, 3\) is not consecutive among the kept layers "
                                         r"\[0, 1, 2, 3, 4, 5, 6, 7\]$"):
        search.block_losses((), [(1, 3)])
    with pytest.raises(ValueError, match=r"block \(3, 2\) is not consecutive"):
        search.block_losses((), [(3, 2)])
    # with layer 2 already dropped, 1 and 3 are neighbours
    (loss,) = search.block_losses({2}, [(1, 3)])
    assert loss == pytest.approx(reference_nll(model, texts, (1, 2, 3)), abs=2e-5)
    assert search.losses == {frozenset({1, 2, 3}): loss}  # the refused blocks were never scored
