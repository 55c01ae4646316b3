"""The table in docs/architecture.md of which stages list each layerprune module (and package data folder) in their
dvc.yaml deps: the stages an edit of it reruns. Made from dvc.yaml, never by hand; tests/test_dvc_deps.py checks it.

    python docs/deps_table.py            print the table
    python docs/deps_table.py --write    put it between the deps markers of docs/architecture.md
"""
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "architecture.md"
MARKERS = ("<!-- deps:start -->", "<!-- deps:end -->")


def table() -> str:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    package = REPO / "layerprune"
    data = [p for p in package.iterdir() if p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").exists()]
    lines = ["| module | stages whose deps list it: an edit reruns them |", "|---|---|"]
    for path in sorted(package.glob("*.py")) + sorted(data):
        name = str(path.relative_to(REPO))
        users = [stage for stage, spec in stages.items() if name in (dep.rstrip("/") for dep in spec.get("deps", []))]
        lines.append(f"| `{name}` | {', '.join(users) or '—'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        start, end = MARKERS
        head, rest = PAGE.read_text().split(start)
        PAGE.write_text(head + start + "\n" + table() + end + rest.split(end)[1])
    else:
        print(table(), end="")
