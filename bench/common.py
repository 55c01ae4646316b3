"""What every bench script shares, written once: the environment it runs in, the pipeline's paths, the machine it ran
on, and how its markdown tables are written.

Import it before anything that imports transformers or datasets: it sets the offline switches they read at import.
The bench scripts run as `python bench/<name>.py` from anywhere: Python puts bench/ on the path (so `import common`
and `import measure` work), and layerprune comes from the venv (`pip install -e .`, done by `make setup`).
"""
import os
import platform
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import psutil
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the Makefile: everything here is offline
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# ---- the pipeline's paths: dvc.yaml holds them, once ----

PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())
# dvc.yaml's `vars: paths`, relative to a pipeline's folder: {"corpus": "data/corpus.jsonl", ...}
PIPELINE_PATHS = {name: path for entry in PIPELINE["vars"] for name, path in entry.get("paths", {}).items()}


def _filled(text: str) -> str:
    """text with each ${paths.name} replaced by that path, as DVC does."""
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: PIPELINE_PATHS[m.group(1)], text)


def stage_args(stage: str) -> dict[str, str]:
    """The `--name value` pairs of a dvc.yaml stage's cmd, ${paths.…} filled in: {"choice": "metrics/choice.json"}."""
    words = [_filled(word) for word in shlex.split(PIPELINE["stages"][stage]["cmd"])]
    return {word[2:]: value for word, value in zip(words, words[1:]) if word.startswith("--")}


def stage_outputs(stage: str) -> set[str]:
    """The paths a dvc.yaml stage writes (its outs and metrics), ${paths.…} filled in."""
    entries = PIPELINE["stages"][stage].get("outs", []) + PIPELINE["stages"][stage].get("metrics", [])
    names = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
    return {_filled(name) for name in names}


def timing_file(metrics: str) -> str:
    """Where a stage's timing goes: logs/<its metrics file's stem>.timing.json (layerprune.stage.write_timing)."""
    return f"logs/{Path(metrics).stem}.timing.json"


_HEAL, _FRONTIER = stage_args("heal"), stage_args("frontier")
# The paths bench/ reads that dvc.yaml names in stage commands rather than in vars, and the timing logs
OTHER_PATHS = {
    "params": "params.yaml",
    "choice": _HEAL["choice"],
    "heal_metrics": _HEAL["metrics"],
    "heal_curves": _HEAL["curves"],
    "heal_timing": timing_file(_HEAL["metrics"]),
    "frontier_metrics": _FRONTIER["metrics"],
    "frontier_timing": timing_file(_FRONTIER["metrics"]),
}


def paths(root: Path = REPO) -> SimpleNamespace:
    """Every pipeline path bench/ uses, as a Path under root: paths(pipeline).corpus is <pipeline>/data/corpus.jsonl."""
    return SimpleNamespace(**{name: Path(root) / path for name, path in {**PIPELINE_PATHS, **OTHER_PATHS}.items()})


# ---- the machine ----


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def machine() -> str:
    """CPU, cores, RAM, Python and torch versions, torch's threads and the load average now ("at start")."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores ({usable_cores()} usable), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} "
        f"inter-op threads); load average {load_average()} (1/5/15 min) at start"
    )


def now() -> str:
    """The time a table was measured, as every bench writes it."""
    return f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


# ---- markdown ----


def markdown_table(columns: list[str], rows, right=()) -> str:
    """A markdown table: `columns` as its header (those named in `right` right-aligned), one line per row of cells;
    a cell of None is left empty."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---:" if c in right else "---" for c in columns) + "|"]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def num(x: float) -> str:
    """Three significant digits, without exponents for large numbers."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def row(what, ratio, goal, ours, baseline, how) -> dict:
    """One row of a ratio table (bench/run.py, bench/frontier.py)."""
    return dict(what=what, ratio=ratio, goal=goal, ours=ours, baseline=baseline, how=how)


def write_table(path: Path, text: str) -> None:
    """Write a bench's results file and print it."""
    Path(path).write_text(text)
    print(text)


def ratio_table(rows: list[dict], header: str) -> str:
    """header, then the rows of row(): the ratio in bold, beside the absolute numbers it came from."""
    return header + "\n\n" + markdown_table(
        ["measurement", "ratio", "goal", "layerprune", "baseline", "how"],
        [[r["what"], f"**{num(r['ratio'])}**", r["goal"], r["ours"], r["baseline"], r["how"]] for r in rows],
        right=("ratio", "layerprune", "baseline"))
