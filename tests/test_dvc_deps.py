"""dvc.yaml lists, for every stage, exactly the project code the stage runs: its script and every layerprune module
the script imports, directly or through other modules, imports inside functions included. A module missing from
the list means an edit to it keeps stale results; one too many reruns a stage for nothing. The same for the data
folders of the package that this code reads (layerprune/architectures), and for the params the stage reads."""
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
    outputs = lambda stage: [resolve(next(iter(out)) if isinstance(out, dict) else out)  # noqa: E731
                             for out in stage.get("outs", []) + stage.get("metrics", [])]
    return {name: {"script": re.search(r"stages/\w+\.py", stage["cmd"]).group(0),
                   "deps": [resolve(dep) for dep in stage.get("deps", [])],
                   "params": stage.get("params", []),
                   "paths": re.findall(r"--[\w-]+ (\S+)", resolve(" ".join(stage["cmd"].split()))),
                   "outs": outputs(stage)}
            for name, stage in pipeline["stages"].items()}


def path_check(stage: dict) -> tuple[list[str], list[str]]:
    """(paths the command passes that are neither deps nor outputs, outputs the command never passes)."""
    declared = set(stage["deps"]) | set(stage["outs"])
    return sorted(set(stage["paths"]) - declared), sorted(set(stage["outs"]) - set(stage["paths"]))


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_path_the_command_passes_is_a_dep_or_an_output(name):
    """A file the stage reads but does not list is a change DVC does not see (the heal reading metrics/choice.json
    unlisted would heal the old cut after a new choice); an output the command does not name is never written."""
    unlisted, unnamed = path_check(stages()[name])
    assert not unlisted, f"{name} is passed paths that are neither deps nor outputs: {unlisted}"
    assert not unnamed, f"{name} declares outputs its command never names: {unnamed}"


def test_path_check_catches_a_read_that_is_not_a_dep():
    stage = stages()["heal"]
    assert "metrics/choice.json" in stage["paths"]
    stage["deps"].remove("metrics/choice.json")
    assert path_check(stage) == (["metrics/choice.json"], [])


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


# ---- data folders of the package ----


def package_data() -> set[str]:
    """What the package holds besides its modules: folders without an __init__.py (layerprune/architectures)."""
    return {entry.name for entry in (REPO / PACKAGE).iterdir()
            if entry.is_dir() and entry.name != "__pycache__" and not (entry / "__init__.py").exists()}


def data_read(module: str) -> set[str]:
    """The package's data folders that a module names in a string (Path(__file__).parent / "architectures")."""
    folders = package_data()
    return {folder for node in ast.walk(ast.parse((REPO / module).read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            for folder in folders if node.value == folder or node.value.startswith(folder + "/")}


def data_deps_check(stage: dict) -> tuple[list[str], list[str]]:
    """(data folders the stage's code reads that its deps leave out, data folders listed that nothing reads)."""
    needed = {f"{PACKAGE}/{folder}" for module in code_closure(stage["script"]) for folder in data_read(module)}
    listed = {dep.rstrip("/") for dep in stage["deps"] if dep.startswith(PACKAGE + "/") and not dep.endswith(".py")}
    return sorted(needed - listed), sorted(listed - needed)


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_data_deps_are_exactly_the_package_data_its_code_reads(name):
    missing, extra = data_deps_check(stages()[name])
    assert not missing, f"{name} runs code that reads package data its deps do not list: {missing}"
    assert not extra, f"{name} lists package data that its code does not read: {extra}"


def test_data_check_finds_the_architectures_through_slicing():
    """The check itself: slicing.py reads layerprune/architectures, and any stage that runs slicing.py needs it."""
    assert package_data() >= {"architectures"} and data_read("layerprune/slicing.py") == {"architectures"}
    readers = {name for name, stage in stages().items() if "layerprune/slicing.py" in code_closure(stage["script"])}
    assert readers == {"model", "mergekit-slice"}  # choose-range and frontier take the per-layer rule from layers.py
    stage = stages()["mergekit-slice"]
    stage["deps"].remove("layerprune/architectures")
    assert data_deps_check(stage) == (["layerprune/architectures"], [])
    stage = stages()["release"]
    stage["deps"].append("layerprune/architectures")
    assert data_deps_check(stage) == ([], ["layerprune/architectures"])


# ---- params ----
#
# What a stage reads of params, found statically: `params.<section>.<key>` in the stage script (params is the
# validated params.yaml that run_stage passes to main), a section bound to a name (`prune = params.prune`, then
# `prune.keep_first`), and a section passed to a layerprune function (`heal_model(params.heal, ...)`: the keys that
# function reads of its argument, followed as far as it passes it on). A section used any other way (model_dump(),
# passed to a class or a method) counts as read whole.

WHOLE = None  # a section read as a whole


def params_fields() -> dict[str, set[str] | None]:
    """Each top-level key of params.yaml: its section's keys, or None for a plain value (lang)."""
    from layerprune.params import Params, Section

    return {name: set(field.annotation.model_fields) if isinstance(field.annotation, type)
            and issubclass(field.annotation, Section) else None for name, field in Params.model_fields.items()}


class _Module:
    """A parsed source file, with each node's parent and what its names refer to."""

    cache: dict[str, "_Module"] = {}

    def __init__(self, path: str):
        self.path = path
        self.tree = ast.parse((REPO / path).read_text(), filename=path)
        self.parents = {child: node for node in ast.walk(self.tree) for child in ast.iter_child_nodes(node)}
        self.functions = {node.name: node for node in self.tree.body if isinstance(node, ast.FunctionDef)}
        self.imported = {alias.asname or alias.name: (node.module, alias.name) for node in ast.walk(self.tree)
                         if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         and node.module.startswith(PACKAGE + ".") for alias in node.names}

    @classmethod
    def get(cls, path: str) -> "_Module":
        if path not in cls.cache:
            cls.cache[path] = cls(path)
        return cls.cache[path]

    def function(self, call: ast.Call):
        """(module, FunctionDef) that a call by plain name runs, if it is a function of the project; else None."""
        if not isinstance(call.func, ast.Name):
            return None
        if call.func.id in self.functions:
            return self, self.functions[call.func.id]
        if call.func.id in self.imported:
            module, name = self.imported[call.func.id]
            path = module.replace(".", "/") + ".py"
            if (REPO / path).is_file() and name in _Module.get(path).functions:
                return _Module.get(path), _Module.get(path).functions[name]
        return None

    def scope(self, node):
        """The function (or lambda, or module) a node is in."""
        while node in self.parents and not isinstance(node, (ast.FunctionDef, ast.Lambda)):
            node = self.parents[node]
        return node


def _names(scope, name: str):
    return [node for node in ast.walk(scope) if isinstance(node, ast.Name) and node.id == name
            and isinstance(node.ctx, ast.Load)]


def _keys_read(module: _Module, scope, name: str, fields: set[str], seen: set) -> set[str] | None:
    """Keys of a section read through the name `name` in `scope`; WHOLE if the section is used whole."""
    keys = set()
    for node in _names(scope, name):
        found = _use(module, node, fields, seen)
        if found is WHOLE:
            return WHOLE
        keys |= found
    return keys


def _use(module: _Module, node, fields: set[str], seen: set) -> set[str] | None:
    """Keys read of the section that the expression `node` evaluates to."""
    parent = module.parents[node]
    if isinstance(parent, ast.Attribute) and parent.value is node:
        return {parent.attr} if parent.attr in fields else WHOLE  # a key, or a method such as model_dump
    if isinstance(parent, ast.Tuple) and isinstance(module.parents[parent], ast.Assign):
        assign = module.parents[parent]
        (target,) = assign.targets
        if isinstance(target, ast.Tuple) and len(target.elts) == len(parent.elts):
            alias = target.elts[parent.elts.index(node)]
            if isinstance(alias, ast.Name):
                return _keys_read(module, module.scope(assign), alias.id, fields, seen)
    if isinstance(parent, ast.Assign) and parent.value is node and len(parent.targets) == 1 \
            and isinstance(parent.targets[0], ast.Name):
        return _keys_read(module, module.scope(parent), parent.targets[0].id, fields, seen)
    keyword = parent if isinstance(parent, ast.keyword) else None
    call = module.parents[parent] if keyword else parent
    if isinstance(call, ast.Call) and (keyword or node in call.args):
        resolved = module.function(call)
        if resolved is None:
            return WHOLE
        callee_module, callee = resolved
        arguments = [a.arg for a in callee.args.posonlyargs + callee.args.args]
        argument = keyword.arg if keyword else arguments[call.args.index(node)]
        if (callee_module.path, callee.name, argument) in seen:
            return set()
        return _keys_read(callee_module, callee, argument, fields, seen | {(callee_module.path, callee.name, argument)})
    return WHOLE


def params_read(script: str) -> set[str]:
    """What a stage script reads of params: "lang", "section.key", or "section" for a section read whole."""
    module, fields = _Module.get(script), params_fields()
    read = set()
    for node in _names(module.tree, "params"):
        parent = module.parents[node]
        if not (isinstance(parent, ast.Attribute) and parent.value is node):
            # params itself may only go to the script's own functions, whose bodies are read here too
            call = module.parents[parent] if isinstance(parent, ast.keyword) else parent
            assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name) \
                and call.func.id in module.functions, f"{script}:{node.lineno}: params used in a way this test cannot follow"
            continue
        section = parent.attr
        assert section in fields, f"{script}:{node.lineno}: params.{section} is no section of params.yaml"
        if fields[section] is None:
            read.add(section)
            continue
        keys = _use(module, parent, fields[section], set())
        read |= {section} if keys is WHOLE else {f"{section}.{key}" for key in keys}
    return read


def expand(entries) -> set[str]:
    """"section" -> every "section.key"; "section.key" and plain values ("lang") as they are."""
    fields = params_fields()
    out = set()
    for entry in entries:
        assert isinstance(entry, str), f"params entry {entry!r}: only keys of params.yaml are supported here"
        section, _, key = entry.partition(".")
        assert section in fields, f"{entry}: no such key in params.yaml"
        if fields[section] is None or key:
            assert not key or key.split(".")[0] in fields[section], f"{entry}: no such key in params.yaml"
            out.add(".".join(entry.split(".")[:2]))
        else:
            out |= {f"{section}.{name}" for name in fields[section]}
    return out


# Sections a stage reads that are deliberately no DVC params: how the heal runs (processes, FSDP, checkpointing)
# does not change what it computes, so changing them must not rerun a finished heal.
HOW_IT_RUNS = {"heal_launch"}


def params_check(stage: dict) -> tuple[list[str], list[str]]:
    """(params the stage's code reads that its `params:` leaves out, params listed that its code never reads)."""
    needed = {key for key in expand(params_read(stage["script"])) if key.split(".")[0] not in HOW_IT_RUNS}
    listed = expand(stage["params"])
    return sorted(needed - listed), sorted(listed - needed)


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_params_are_exactly_what_its_code_reads(name):
    missing, extra = params_check(stages()[name])
    assert not missing, f"{name} reads params that its `params:` does not list: {missing}"
    assert not extra, f"{name} lists params that its code does not read (a change reruns it for nothing): {extra}"


def test_params_reads_are_found_through_names_and_library_functions():
    """The check itself, on what the stages do today."""
    # through a section bound to a name in a helper of the script, and a key passed on as a plain value
    assert {"prune.search_texts", "prune.keep_first", "similarity.max_length", "lang"} <= params_read(
        "stages/choose_range.py")
    # `prune, sizes = params.prune, params.frontier.layers`
    assert {"prune.keep_last", "frontier.layers", "eval.batch_size"} <= params_read("stages/frontier.py")
    # params.heal passed to heal_model, which passes it on; params.similarity.processes in run_stage's lambda
    assert {"heal", "model.device"} <= params_read("stages/heal.py")
    assert "similarity.processes" in params_read("stages/layer_similarity.py")
    assert "heal" in params_read("stages/release.py")  # params.heal.model_dump(): the whole section


def test_params_reads_follow_a_section_into_the_functions_it_is_passed_to(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(
        "def scored(settings, *, device):\n"
        "    return settings.max_length, device\n\n"
        "def dumped(settings):\n"
        "    return settings.model_dump()\n\n"
        "def main(params):\n"
        "    ev, n = params.eval, params.frontier.layers\n"
        "    scored(ev, device=params.model.device)\n"
        "    dumped(settings=params.sample)\n"
        "    print(params.lang, len(n))\n")
    # only the key `scored` reads of eval; the whole of sample, which `dumped` dumps
    assert params_read(str(script)) == {"eval.max_length", "model.device", "sample", "frontier.layers", "lang"}


def test_params_check_catches_a_missing_and_an_unread_param():
    stage = stages()["choose-range"]
    stage["params"].remove("prune.search_texts")
    assert params_check(stage) == (["prune.search_texts"], [])
    stage = stages()["frontier"]
    stage["params"].append("eval.tasks")  # read by the perplexity stages, not by the frontier
    assert params_check(stage) == ([], ["eval.tasks"])
    stage = stages()["perplexity-base"]
    stage["params"] = ["model.device", "eval.max_length", "eval.batch_size", "eval.tasks"]
    assert params_check(stage) == (["eval.include_path"], [])
    stage = stages()["heal"]
    stage["params"] = ["model.device", "heal.tokens", "heal.seq_len"]  # heal_model reads the whole section
    missing, extra = params_check(stage)
    assert "heal.learning_rate" in missing and "heal.eval_every" in missing and not extra
    assert not any(key.startswith("heal_launch.") for key in missing)  # read, deliberately not listed


# ---- the docs ----


def test_architecture_doc_table_says_what_dvc_yaml_deps_say():
    """docs/architecture.md lists, for each module of the package (and its data folders), the stages whose deps
    list it: what an edit of it reruns. Made by docs/deps_table.py; it must not go stale."""
    text = (REPO / "docs/architecture.md").read_text()
    table = text.split("<!-- deps:start -->")[1].split("<!-- deps:end -->")[0]
    documented = {}
    for line in table.splitlines():
        if match := re.fullmatch(r"\| `(layerprune/[\w./]+)` \| (.*) \|", line):
            documented[match[1]] = {name for name in match[2].split(", ") if name != "—"}
    modules = [str(path.relative_to(REPO)) for path in (REPO / PACKAGE).glob("*.py")]
    modules += [f"{PACKAGE}/{folder}" for folder in package_data()]
    listed = {name: {dep.rstrip("/") for dep in stage["deps"]} for name, stage in stages().items()}
    expected = {module: {name for name, deps in listed.items() if module in deps} for module in modules}
    assert documented == expected, "docs/architecture.md is stale: run python docs/deps_table.py --write"
