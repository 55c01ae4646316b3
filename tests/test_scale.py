"""bench/scale.py, the seed-scale run, at a tiny width on CPU: every step runs and the files hold what it measured."""
import json
import os
import re
import subprocess
import sys
import types

import pytest

from conftest import REPO

STEPS = ["build", "save", "similarity", "direct forward", "choose-range", "slice", "perplexity base",
         "perplexity pruned", "heal"]
TIMED = ["similarity", "direct forward", "perplexity base", "perplexity pruned", "heal"]


def scale(out, *args):
    # One thread: tiny matmuls only lose to thread hand-offs on a machine busy with other work
    return subprocess.run([sys.executable, str(REPO / "bench/scale.py"), "--tiny", "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One --tiny run (~15 s) for every test of it: (its out folder, the completed process)."""
    out = tmp_path_factory.mktemp("scale")
    return out, scale(out, "--work", out / "work")


def test_tiny_run_measures_every_step(tiny_run):
    tmp_path, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    assert data["finished"] and not data["skipped"]
    steps = {row["step"]: row for row in data["steps"]}
    assert list(steps) == STEPS and not any("error" in row for row in data["steps"])
    for name in TIMED:
        assert steps[name]["tokens_per_second"] > 0 and steps[name]["tflops"] > 0, name
    assert steps["similarity"]["tokens"] == 16 * 32  # --tiny: 16 texts of 32 tokens, none dropped
    assert steps["similarity"]["vs_bare_forward"] > 0  # measured; its goal (>= 0.9) is the bench's to report
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


# ---- the span each rate is taken over ----

ROUNDING = 2e-3  # scale.json keeps four significant digits of every number


def test_rates_are_taken_over_the_span_that_does_the_work(tiny_run):
    """Read back from scale.json: the span a rate implies (amount ÷ rate) lies within its step's wall time, and is
    the span the step's notes name where they name one (lm-eval's scoring, the Trainer's time)."""
    tmp_path, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    steps = {row["step"]: row for row in json.loads((tmp_path / "scale.json").read_text())["steps"]}
    span = {name: steps[name]["tokens"] / steps[name]["tokens_per_second"] for name in TIMED}
    for name in TIMED:
        assert 0 < span[name] <= steps[name]["seconds"] * (1 + ROUNDING), (name, span[name], steps[name])
    # no part of the direct forward is set apart: its rate is over the whole step
    assert abs(span["direct forward"] - steps["direct forward"]["seconds"]) <= ROUNDING * span["direct forward"]
    # named to 0.1 s in the notes
    named = {"perplexity base": r"lm-eval scoring (\d+\.\d) s", "perplexity pruned": r"lm-eval scoring (\d+\.\d) s",
             "heal": r"Trainer time (\d+\.\d) s"}
    for name, pattern in named.items():
        seconds = float(re.search(pattern, steps[name]["notes"]).group(1))
        assert abs(span[name] - seconds) <= 0.05 + ROUNDING * span[name], (name, span[name], steps[name]["notes"])
    # similarity and the bare forward over the same batches are two spans of the step, one after the other
    similarity = steps["similarity"]
    assert span["similarity"] * (1 + similarity["vs_bare_forward"]) <= similarity["seconds"] * (1 + 2 * ROUNDING)
    # bytes (three digits in the notes) ÷ GB/s: within the step; the slice and its plain copy are two spans
    for name in ("save", "slice"):
        written = float(re.search(r"([\d.e-]+) GB", steps[name]["notes"]).group(1))
        assert written / steps[name]["gb_per_second"] <= steps[name]["seconds"] * 1.01, steps[name]
    sliced = steps["slice"]
    written = float(re.search(r"([\d.e-]+) GB", sliced["notes"]).group(1))
    assert written / sliced["gb_per_second"] + written / sliced["copy_gb_per_second"] <= sliced["seconds"] * 1.01
    # vs_copy is copy seconds ÷ slice seconds: the GB/s of both must be over those same spans (three roundings)
    assert sliced["gb_per_second"] / sliced["copy_gb_per_second"] == pytest.approx(sliced["vs_copy"], rel=ROUNDING)


class Clock:
    """perf_counter() of a machine where only what a test says takes time."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def take(self, seconds):
        self.now += seconds


def load_scale():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench/scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def clocked(monkeypatch):
    """bench/scale.py loaded in this process, its perf_counter a Clock."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # as `python bench/scale.py` has it: its siblings common, measure
    module = load_scale()
    clock = Clock()
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=clock, time=__import__("time").time))
    return module, clock


def test_a_step_rate_is_over_its_timed_part_else_its_wall_time(clocked, tmp_path):
    scale_module, clock = clocked
    run = scale_module.Run(tmp_path, {"date": "", "command": "", "device": "CPU", "machine": "", "model": "",
                                      "settings": {}}, peak=None)
    run.step("timed", lambda: clock.take(5.0) or {"tokens": 600, "flops": 3e12, "timed_seconds": 2.0})
    run.step("whole", lambda: clock.take(4.0) or {"tokens": 600, "flops": 3e12})
    timed, whole = json.loads((tmp_path / "scale.json").read_text())["steps"]
    assert (timed["seconds"], timed["tokens_per_second"], timed["tflops"]) == (5.0, 300.0, 1.5)
    assert (whole["seconds"], whole["tokens_per_second"], whole["tflops"]) == (4.0, 150.0, 0.75)
    assert "timed_seconds" not in timed


def test_similarity_rate_leaves_out_the_warm_up_and_the_bare_forward(clocked, tmp_path):
    scale_module, clock = clocked
    sizes = scale_module.TINY_SIZES
    steps = scale_module.Steps(scale_module.TINY, sizes, "cpu", tmp_path)
    steps.model = scale_module.build_model(scale_module.TINY, "cpu")
    calls = []

    def layer_distances(model, ids, batch_size, **kwargs):
        warm_up = len(ids) <= batch_size
        calls.append("warm-up" if warm_up else "all")
        clock.take(0.5 if warm_up else 2.0)
        return "distances"

    scale_module.layer_distances = layer_distances
    scale_module.bare_forward = lambda *args: clock.take(1.0)
    run = scale_module.Run(tmp_path, {"date": "", "command": "", "device": "CPU", "machine": "", "model": "",
                                      "settings": {}}, peak=None)
    run.step("similarity", steps.similarity)
    (row,) = json.loads((tmp_path / "scale.json").read_text())["steps"]
    assert calls == ["warm-up", "all"] and steps.distances == "distances"
    tokens = sizes.texts * sizes.length
    assert row["seconds"] == 3.5 and row["tokens"] == tokens
    assert row["tokens_per_second"] == tokens / 2.0  # the scored pass alone
    assert row["vs_bare_forward"] == 0.5  # bare 1 s ÷ scored 2 s


def test_slice_rate_is_over_the_slice_alone(clocked, tmp_path):
    """mergekit's slice takes 2 s and the plain copy of its output 0.5 s: each GB/s over its own span."""
    import shutil

    from layerprune.strategies import Block

    scale_module, clock = clocked
    steps = scale_module.Steps(scale_module.TINY, scale_module.TINY_SIZES, "cpu", tmp_path)
    steps.block, steps.ranges = Block(3, 4), [(0, 3), (7, 8)]

    def slice_model(config, out_dir, progress):
        assert [s.sources[0].layer_range for s in config.slices] == [(0, 3), (7, 8)]
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"\0" * 1_000_000)
        clock.take(2.0)

    def copyfile(source, target):
        shutil.copyfile(source, target)
        clock.take(0.5)

    scale_module.slice_model = slice_model
    scale_module.count_parameters = lambda *args, **kwargs: 1000
    scale_module.shutil = types.SimpleNamespace(copyfile=copyfile, rmtree=shutil.rmtree)
    run = scale_module.Run(tmp_path, {"date": "", "command": "", "device": "CPU", "machine": "", "model": "",
                                      "settings": {}}, peak=None)
    run.step("slice", steps.slice)
    (row,) = json.loads((tmp_path / "scale.json").read_text())["steps"]
    assert row["seconds"] == 2.5
    assert (row["gb_per_second"], row["copy_gb_per_second"], row["vs_copy"]) == (0.0005, 0.002, 0.25)
