"""bench/scale.py --tiny: the seed-size run's code path (a sharded bf16 checkpoint of Falcon-11B's layout, `dvc repro
release` stage by stage in a throwaway pipeline, a memory budget below the model) on a small model, ~2 minutes."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

# What `dvc repro release` runs, in its order (the frontier is not on its path)
STAGES = ["model-source", "model", "fetch-wiki", "sample", "layer-similarity", "choose-range", "mergekit-slice",
          "heal-corpus-source", "heal-corpus", "heal", "perplexity-base", "perplexity-pruned", "perplexity-healed",
          "release"]
LOADS_MODEL = {"layer-similarity", "perplexity-base", "perplexity-pruned"}


def scale(out, *args):
    return subprocess.run([sys.executable, str(REPO / "bench/scale.py"), "--tiny", "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    result = scale(out, "--work", out / "work")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, json.loads((out / "results-scale-tiny.json").read_text())


def test_every_stage_to_release_runs_and_is_measured(tiny_run):
    out, data = tiny_run
    assert data["finished"] and data["stopped"] is None
    rows = {row["stage"]: row for row in data["stages"]}
    assert list(rows) == STAGES
    for row in rows.values():
        assert row["seconds"] > 0 and row["peak_anonymous_gib"] > 0.01, row  # python alone holds tens of MB
        assert row["written_gb"] >= 0
    # the slice wrote the pruned weights (bf16, half of the tiny model's layers): tens of MB, not bytes
    assert rows["mergekit-slice"]["written_gb"] > 0.02
    assert not (out / "work").exists()  # the checkpoint and the pipeline copy are deleted at the end


def test_the_stages_that_load_the_model_stream_it_within_a_budget_below_its_size(tiny_run):
    _, data = tiny_run
    budget_bytes = float(re.match(r"([\d.]+) MiB", data["budget"]).group(1)) * 2**20
    assert budget_bytes < 4 * data["checkpoint"]["parameters"]  # below the fp32 weights
    rows = {row["stage"]: row for row in data["stages"]}
    streamed = 0
    for stage in LOADS_MODEL:
        placed = re.search(r"LAYERPRUNE_MEMORY=[\d.]+ MiB: (\d+) of (\d+) decoder layers in memory, (\d+) read",
                           rows[stage]["notes"])
        assert placed, (stage, rows[stage]["notes"])
        streamed += int(placed.group(3))
        # the cost, before the pass and at the first batch's rate
        assert re.search(r": [\d.e-]+ TFLOP", rows[stage]["notes"]), rows[stage]["notes"]
        assert re.search(r"first batch at [\d.]+ GFLOP/s; all of it takes about \d+ (s|min|h)", rows[stage]["notes"])
    assert streamed > 0
    # heal.tokens 0: the healed model is the pruned one, and lm-eval does not score it twice
    assert "LAYERPRUNE_MEMORY" not in rows["perplexity-healed"]["notes"]


def test_the_summary_reports_every_goal(tiny_run):
    out, data = tiny_run
    summary = data["summary"]
    for key in ("total_seconds", "peak_anonymous_gib", "similarity_vs_one_layer", "slice_vs_copy",
                "slice_peak_anonymous_gib", "distinct_vs_models"):
        assert summary[key] > 0, key
    # the run's distinct bytes include the models it made, once each (pruned, healed and release share inodes)
    assert 1 <= summary["distinct_vs_models"] < 2
    table = (out / "results-scale-tiny.md").read_text()
    assert [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()
            if line.startswith("| ") and " | " in line][1 : 1 + len(STAGES)] == STAGES
    assert table.rstrip().endswith("finished.")


def test_a_deadline_stops_the_run_and_keeps_what_it_measured(tmp_path):
    result = scale(tmp_path, "--work", tmp_path / "work", "--deadline", "1")  # passed before the first stage
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "results-scale-tiny.json").read_text())
    assert not data["finished"] and data["stages"] == []
    assert data["checkpoint"]["shards"] > 1  # measured before the deadline was checked, and kept
    assert (tmp_path / "results-scale-tiny.md").read_text().rstrip().endswith(
        "stopped early: the deadline (1 s) passed during or before model-source.")
