"""dvc.yaml lists, for every stage, exactly the project code the stage runs: its script and every layerprune module
the script imports, directly or through other modules, imports inside functions included. A module missing from
the list means an edit to it keeps stale results; one too many reruns a stage for nothing."""
import ast
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = "layerprune"


def project_imports(path: Path) -> set[str]:
    """Files of the layerprune package that `path` imports anywhere in its body (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from layerprune import x` may name a module x; `from layerprune.x import y` names module x
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                file = REPO / (name.replace(".", "/") + ".py")
                if file.is_file():
                    found.add(str(file.relative_to(REPO)))
    return found


def code_closure(script: str) -> set[str]:
    """The script and every project module it reaches through imports."""
    seen, todo = set(), [script]
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(project_imports(REPO / file) - seen)
    return seen


def stages() -> dict[str, dict]:
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = {key: value for entry in pipeline["vars"] for key, value in entry["paths"].items()}
    resolve = lambda text: re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], text)  # noqa: E731
    return {name: {"script": re.search(r"stages/\w+\.py", stage["cmd"]).group(0),
                   "deps": [resolve(dep) for dep in stage.get("deps", [])]}
            for name, stage in pipeline["stages"].items()}


def test_the_package_init_runs_no_code():
    """Every import of a submodule runs layerprune/__init__.py; it is left out of the deps because it holds only a
    docstring. If it ever gets code, it has to go into every stage's deps."""
    body = ast.parse((REPO / PACKAGE / "__init__.py").read_text()).body
    assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_code_deps_are_exactly_its_imports(name):
    stage = stages()[name]
    needed = code_closure(stage["script"])
    listed = {dep for dep in stage["deps"] if dep.endswith(".py")}
    missing, extra = sorted(needed - listed), sorted(listed - needed)
    assert not missing, f"{name} runs code that its deps do not list: {missing}"
    assert not extra, f"{name} lists code that it does not run: {extra}"


def test_closure_follows_imports_inside_functions():
    """The check itself: slicing.py imports models.py only inside a function, and that import must count."""
    assert "layerprune/models.py" in code_closure("layerprune/slicing.py")
    assert "layerprune/models.py" not in project_imports(REPO / "layerprune/errors.py")
