"""bench/scale.py, the seed-scale run, at a tiny width on CPU: every step runs and the files hold what it measured."""
import json
import os
import re
import subprocess
import sys

from conftest import REPO

STEPS = ["build", "save", "similarity", "direct forward", "choose-range", "slice", "perplexity base",
         "perplexity pruned", "heal"]
TIMED = ["similarity", "direct forward", "perplexity base", "perplexity pruned", "heal"]


def scale(out, *args):
    # One thread: tiny matmuls only lose to thread hand-offs on a machine busy with other work
    return subprocess.run([sys.executable, str(REPO / "bench/scale.py"), "--tiny", "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tiny_run_measures_every_step(tmp_path):
    result = scale(tmp_path, "--work", tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    assert data["finished"] and not data["skipped"]
    steps = {row["step"]: row for row in data["steps"]}
    assert list(steps) == STEPS and not any("error" in row for row in data["steps"])
    for name in TIMED:
        assert steps[name]["tokens_per_second"] > 0 and steps[name]["tflops"] > 0, name
    assert steps["similarity"]["tokens"] == 16 * 32  # --tiny: 16 texts of 32 tokens, none dropped
    assert 0 < steps["similarity"]["vs_bare_forward"] < 2
    # 8 layers, block of round(31 / 60 * 8) = 4 that keeps the final layer: [0,s] + [s+4,8] with s in 0..3
    start = steps["choose-range"]["start"]
    assert steps["choose-range"]["ranges"] == (f"[0,{start}] + " if start else "") + f"[{start + 4},8]"
    assert 0 <= start <= 3
    assert steps["slice"]["gb_per_second"] > 0 and steps["slice"]["copy_gb_per_second"] > 0
    # Random weights on random tokens: the next token is a guess among the 512 ids, so perplexity ~ 512
    for name in ("perplexity base", "perplexity pruned"):
        assert 400 < steps[name]["word_perplexity"] < 650, steps[name]
    assert steps["heal"]["trainable_parameters"] > 0
    table = (tmp_path / "scale.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == STEPS
    assert steps["choose-range"]["ranges"] in table and table.rstrip().endswith("finished.")
    assert not (tmp_path / "work").exists()  # the model folders are deleted at the end


def test_deadline_stops_the_run_and_still_writes(tmp_path):
    result = scale(tmp_path, "--deadline", "0.01")  # passed before the first step starts
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    assert not data["finished"]
    assert [row["step"] for row in data["steps"]] + data["skipped"] == STEPS and data["skipped"]
    assert re.search(r"stopped early; skipped: [a-z -]+(, [a-z -]+)*\.$", (tmp_path / "scale.md").read_text())
