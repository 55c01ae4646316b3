"""The benchmark harness runs end to end (smoke mode: tiny random Llama, no DVC part) and writes its table."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from run import DOCS_PAGE, MARKERS, replace_block  # noqa: E402

ROWS = [
    "similarity: `layer_distances` tokens/s ÷ bare body forward",
    "similarity: PruneMe-style sweep",
    "similarity: achieved FLOP/s",
    "similarity: peak anonymous RSS above the loaded model ÷ model size in memory, 8 texts",
    "similarity: peak anonymous RSS above the loaded model ÷ model size in memory, 32 texts",
    "evaluation: lm-eval perplexity tokens/s ÷ direct batched forward",
    "slicing: mergekit slice time ÷ copying the safetensors",
    "slicing: mergekit peak anonymous RSS ÷ safetensors size",
]


def test_smoke_run_writes_the_table(tmp_path):
    out = tmp_path / "results.md"
    # One thread: with two, a tiny model on a machine busy with other work waits on thread hand-offs (see --help).
    result = subprocess.run([sys.executable, str(REPO / "bench/run.py"), "--smoke", "--threads", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text in result.stdout and "Machine: " in text and "torch " in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(ROWS)
    for (what, *_), prefix in zip(rows, ROWS):
        assert what.lstrip("| ").startswith(prefix)
    for what, number, *_ in rows:
        ratio = float(number.strip("*").replace(",", ""))
        assert math.isfinite(ratio) and ratio > 0, what


def test_docs_block_is_replaced_and_nothing_else():
    start, end = MARKERS
    page = f"# Title\n\nintro\n{start}\nold table\n{end}\n\nrest\n"
    assert replace_block(page, "new table\n") == f"# Title\n\nintro\n{start}\nnew table\n{end}\n\nrest\n"
    with pytest.raises(SystemExit, match="bench:start"):
        replace_block("no markers here\n", "new table\n")


def test_the_benchmarks_page_has_one_table_for_update_docs():
    """--update-docs rewrites the table between the markers of docs/benchmarks.md; the page must hold them once."""
    text = (REPO / DOCS_PAGE).read_text()
    updated = replace_block(text, "new table\n")
    assert "new table\n" in updated and "| measurement | ratio |" not in updated


def test_heal_scale_smoke_run_writes_its_table(tmp_path):
    """bench/heal_scale.py end to end at small sizes: corpora, a killed and restarted heal, DDP against FSDP."""
    out = tmp_path / "heal-scale.md"
    result = subprocess.run([sys.executable, str(REPO / "bench/heal_scale.py"), "--smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [
        "heal-corpus peak anonymous memory, 0.04M − 0.02M tokens",
        "heal restart + 2 steps, peak anonymous memory, 0.04M − 0.02M tokens",
        "heal restart to first step, 0.04M ÷ 0.02M tokens", "heal-corpus tokens/s per core",
        "FSDP ÷ DDP tokens/s, 2 CPU processes, trainable all", "FSDP ÷ DDP peak anonymous memory per process"]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["small"]["resumed_from"] == data["large"]["resumed_from"] == 2  # killed after checkpoint 2
    assert data["parallel"]["fsdp"]["tokens_per_second"] > 0 and data["parallel"]["ddp"]["peak"] > 0
