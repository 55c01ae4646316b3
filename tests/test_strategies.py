import random

import numpy as np
import pytest

from layerprune.errors import UserError
from layerprune.ranges import check_ranges, kept_ranges, passthrough_config
from layerprune.strategies import (STRATEGIES, Block, Choice, Problem, allowed_starts, block_size, get_strategy,
                                   layers_label, runs)


def choose_block(scores, num_layers, size, name, keep_first, keep_last) -> Block:
    """The block a registered strategy picks from these scores alone (no search)."""
    pick = get_strategy(name).pick(Problem(num_layers, size, keep_first, keep_last, "angular_last", scores,
                                           make_search=None))
    assert pick.dropped == list(range(pick.dropped[0], pick.dropped[0] + size))
    return Block(pick.dropped[0], size)


def test_seed_block_on_falcon_11b():
    # PruneMe's 31-layer block at 24 on Falcon-11B's 60 layers; the seed published [0,24] + [55,59]
    ranges = kept_ranges(60, Block(24, 31))
    assert ranges == [(0, 24), (55, 60)]
    check_ranges(ranges, 60, keep_first=0, keep_last=1)
    with pytest.raises(UserError, match=r"protected layer\(s\) 59 of 60") as err:
        check_ranges([(0, 24), (55, 59)], 60, keep_first=0, keep_last=1)
    assert "\n" not in str(err.value)


def test_block_size():
    assert block_size(60, 31, None) == 31
    assert block_size(60, None, 0.5) == 30
    assert block_size(18, None, 0.25) == 4  # 4.5 rounds to even


@pytest.mark.parametrize(
    "layers, fraction, param",
    [(6, None, "prune.layers=6"), (7, None, "prune.layers=7"), (0, None, "prune.layers=0"),
     (None, 0.05, "prune.fraction=0.05"), (None, 0.95, "prune.fraction=0.95")],
)
def test_block_size_rejects(layers, fraction, param):
    with pytest.raises(UserError) as err:
        block_size(6, layers, fraction)
    message = str(err.value)
    assert message.startswith(param + ":") and "\n" not in message


def test_no_room_after_protection():
    assert allowed_starts(6, 4, keep_first=1, keep_last=1) == range(1, 2)
    with pytest.raises(UserError, match=r"^prune.keep_first=2, prune.keep_last=1: ") as err:
        allowed_starts(6, 4, keep_first=2, keep_last=1)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="prune.keep_first"):
        choose_block(None, 6, 4, "deepest", keep_first=2, keep_last=1)


def test_deepest_is_gromov_baseline():
    # the n deepest layers except the final one
    assert choose_block(None, 60, 31, "deepest", keep_first=0, keep_last=1) == Block(28, 31)
    assert kept_ranges(60, Block(28, 31)) == [(0, 28), (59, 60)]
    assert choose_block(None, 6, 2, "deepest", keep_first=0, keep_last=0) == Block(4, 2)


def test_similarity_ignores_protected_and_undefined():
    scores = np.full((7, 6), np.nan)
    scores[2, :5] = [0.0, 0.3, np.nan, 0.2, 0.1]
    # start 0 is the global minimum but protected; start 4 would drop the last layer
    assert choose_block(scores, 6, 2, "similarity", keep_first=1, keep_last=1) == Block(3, 2)
    assert choose_block(scores, 6, 2, "similarity", keep_first=0, keep_last=0) == Block(0, 2)
    with pytest.raises(UserError, match="prune.strategy='random'"):
        choose_block(scores, 6, 2, "random", keep_first=0, keep_last=0)
    with pytest.raises(UserError, match="no similarity score"):
        choose_block(np.full((7, 6), np.nan), 6, 2, "similarity", keep_first=0, keep_last=0)


@pytest.mark.parametrize(
    "ranges, message",
    [([(0, 2), (4, 7)], r"within \[0, 6\]"), ([(3, 3)], "non-empty half-open"), ([(0, 3), (2, 6)], "overlaps"),
     ([(4, 6), (0, 2)], "overlaps or precedes")],
)
def test_check_ranges_rejects_malformed(ranges, message):
    with pytest.raises(UserError, match=message):
        check_ranges(ranges, 6, keep_first=0, keep_last=0)


def test_check_ranges_names_every_dropped_protected_layer():
    with pytest.raises(UserError, match=r"layer\(s\) 0, 1, 5 of 6"):
        check_ranges([(2, 5)], 6, keep_first=2, keep_last=1)


def test_passthrough_config():
    config = passthrough_config("/m", [(0, 24), (55, 60)], "bfloat16")
    assert config.model_dump(mode="json", exclude_defaults=True) == {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "/m", "layer_range": [0, 24]}]},
            {"sources": [{"model": "/m", "layer_range": [55, 60]}]},
        ],
        "dtype": "bfloat16",
    }


def test_every_strategy_has_a_card_reason_and_a_score_name():
    """The card and choice.json format each entry's texts with the metric and the score: a field name that is not
    one of those two would fail only at the release, after the whole pipeline."""
    for name, entry in STRATEGIES.items():
        assert entry.why.format(metric="angular_last", score=0.5) and entry.score_name.format(metric="angular_last")
        assert callable(entry.pick), name


def test_choice_round_trips_and_leaves_out_what_a_layer_set_lacks(tmp_path):
    fields = dict(strategy="iterative", metric="angular_last", n=2, dropped=[1, 3], dropped_layers="1, 3",
                  score_name="calibration loss", score=2.5, kept_ranges="[0,1] + [2,3] + [4,6]", layers_before=6,
                  layers_kept=4, parameters_before=100, parameters_after=80)
    Choice(**fields).save(tmp_path / "choice.json")
    text = (tmp_path / "choice.json").read_text()
    assert '"start"' not in text and '"distance"' not in text  # a set of layers that is no block has neither
    assert Choice.load(tmp_path / "choice.json") == Choice(**fields)
    with pytest.raises(ValueError, match="dropped"):
        Choice.model_validate({**fields, "dropped": "1, 3"})


def test_random_blocks():
    rng = random.Random(0)
    np_rng = np.random.default_rng(0)
    for _ in range(500):
        num_layers = rng.randint(2, 80)
        size = rng.randint(1, num_layers - 1)
        keep_first = rng.randint(0, num_layers - size)
        keep_last = rng.randint(0, num_layers - size - keep_first)
        scores = np_rng.random((num_layers + 1, num_layers))
        scores[np_rng.random(scores.shape) < 0.2] = np.nan
        scores[size, keep_first] = 2.0  # at least one allowed start is defined

        block = choose_block(scores, num_layers, size, "similarity", keep_first, keep_last)
        best = None
        for start in range(num_layers - size + 1):
            allowed = start >= keep_first and start + size <= num_layers - keep_last
            score = scores[size, start]
            if allowed and not np.isnan(score) and (best is None or score < scores[size, best]):
                best = start
        assert block == Block(best, size)

        for chosen in (block, choose_block(None, num_layers, size, "deepest", keep_first, keep_last)):
            ranges = kept_ranges(num_layers, chosen)
            kept = [i for a, b in ranges for i in range(a, b)]
            assert len(kept) == num_layers - size == len(set(kept))
            assert set(range(chosen.start, chosen.stop)).isdisjoint(kept)
            assert all(a < b for a, b in ranges)
            check_ranges(ranges, num_layers, keep_first, keep_last)
            assert set(range(keep_first)) | set(range(num_layers - keep_last, num_layers)) <= set(kept)


def test_dropped_layers_need_not_be_consecutive():
    assert runs({9, 3, 8}) == [(3, 4), (8, 10)]
    assert kept_ranges(18, {3, 8, 9}) == [(0, 3), (4, 8), (10, 18)]
    assert kept_ranges(18, Block(8, 2)) == kept_ranges(18, [8, 9]) == [(0, 8), (10, 18)]
    assert kept_ranges(4, [0, 3]) == [(1, 3)]
    assert layers_label(Block(8, 2)) == "8..9"
    assert layers_label([9, 3, 8]) == "3, 8..9"
    assert layers_label([5]) == "5"
    assert list(Block(8, 2)) == [8, 9]


def test_random_layer_sets():
    rng = random.Random(1)
    for _ in range(500):
        num_layers = rng.randint(2, 60)
        dropped = set(rng.sample(range(num_layers), rng.randint(1, num_layers - 1)))
        ranges = kept_ranges(num_layers, dropped)
        kept = [i for a, b in ranges for i in range(a, b)]
        assert kept == sorted(set(range(num_layers)) - dropped)  # every kept layer once, in order
        assert all(b < c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # runs are maximal: a gap between each
        check_ranges(ranges, num_layers, keep_first=0, keep_last=0)
        label = layers_label(dropped)
        parsed = set()
        for part in label.split(", "):
            first, _, last = part.partition("..")
            parsed |= set(range(int(first), int(last or first) + 1))
        assert parsed == dropped


@pytest.mark.parametrize("metric, dropped, ranges", [
    ("angular_last", [2, 3], [[0, 2], [4, 12]]),
    ("angular_mean", [5, 6], [[0, 5], [7, 12]]),
    ("block_influence", [8, 9], [[0, 8], [10, 12]]),
])
def test_each_metric_gives_its_own_block_through_the_stage(tmp_path, metric, dropped, ranges):
    """A distance table where the three metrics disagree: similarity.metric decides what choose-range drops."""
    import json

    import yaml
    from test_errors import stage, write_model_info, write_params

    num_layers = 12
    best = {"angular_last": 2, "angular_mean": 5}
    rows = ["metric,n,start,distance"]
    for n in range(1, num_layers):
        for start in range(num_layers - n + 1):
            for name in ("angular_last", "angular_mean"):
                rows.append(f"{name},{n},{start},{0.1 if n == 2 and start == best[name] else 0.5}")
            # block_influence of a block is the sum of its layers' BI: layers 8 and 9 barely change anything
            rows.append(f"block_influence,{n},{start},{sum(0.01 if i in (8, 9) else 0.5 for i in range(start, start + n))}")
    (tmp_path / "distances.csv").write_text("\n".join(rows) + "\n")
    write_model_info(tmp_path / "base.json", num_layers)
    params = write_params(tmp_path / "params.yaml", {"similarity.metric": metric, "prune.layers": 2})
    result = stage("choose_range.py", params, "--model-info", "base.json", "--distances", "distances.csv",
                   "--calibration", "cal.jsonl", "--merge-config", "slice.yaml", "--metrics", "choice.json",
                   "--heatmap", "h.png", "--curve", "c.csv", "--block-losses", "l.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert (choice["metric"], choice["dropped"]) == (metric, dropped)
    config = yaml.safe_load((tmp_path / "slice.yaml").read_text())
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == ranges


def test_the_search_is_built_once_per_problem():
    """choose-range's search loads the model: a strategy that asks twice (loss_by_start, then search()) must not
    load it twice, nor lose what the first call scored."""
    built = []
    problem = Problem(6, 2, 0, 1, None, None, make_search=lambda: built.append(object()) or built[-1])
    assert problem.search() is problem.search() and len(built) == 1
