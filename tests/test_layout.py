"""The package's shape, read from its source: every import (those inside functions too) as an edge between modules.

The pipeline (data, recipe, train, predict and the modules below them) never imports the lab (experiment tools built
on it); no two modules import each other, directly or round a circle; modules and functions stay short enough to read.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "seedlings"
MAX_MODULE_LINES = 330
MAX_FUNCTION_LINES = 80
TOP = {"seedlings.cli", "seedlings.commands"}  # above the pipeline and the lab: commands wired to both


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The seedlings modules a file imports, wherever in the file the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from seedlings.train import model` names a module; `from seedlings.run import Run` a name in one
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}  # fmt: skip
    return {name for name in found if name in MODULES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def is_lab(name: str) -> bool:
    return name == "seedlings.lab" or name.startswith("seedlings.lab.")


def test_the_walk_finds_the_edges_it_must():
    """The walk itself can fail: imports at the top, inside functions and of submodules are all seen."""
    assert "seedlings.train.fit" in GRAPH["seedlings.chain.submit"]
    assert "seedlings.lab.compare" in GRAPH["seedlings.cli"] or any(is_lab(m) for m in GRAPH["seedlings.cli"])
    assert "seedlings.run" in GRAPH["seedlings.train.fold"]


def test_the_pipeline_never_imports_the_lab():
    pipeline = [m for m in GRAPH if not is_lab(m) and m not in TOP]
    offending = {m: sorted(filter(is_lab, GRAPH[m])) for m in pipeline if any(map(is_lab, GRAPH[m]))}
    assert not offending, f"pipeline modules importing the lab: {offending}"


def test_predict_only_predicts():
    """The chain that trains and predicts is seedlings.chain, above both: nothing in predict/ imports the training
    loop or the chain."""
    for name, imported in GRAPH.items():
        if name.startswith("seedlings.predict"):
            assert not {m for m in imported if m == "seedlings.train.fit" or m.startswith("seedlings.chain")}, name


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import circle: {' -> '.join(circle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_short(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}: {length} lines"


def test_each_step_is_a_subpackage():
    """The tree reads as the pipeline: a folder per step, the lab apart, and few modules loose beside them."""
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert {
        "seedlings.data",
        "seedlings.recipe",
        "seedlings.train",
        "seedlings.predict",
        "seedlings.chain",
        "seedlings.lab",
    } <= packages
    loose = {m for m, p in MODULES.items() if p.parent == PACKAGE and p.name != "__init__.py"}
    allowed = {
        "seedlings.cli",
        "seedlings.commands",
        "seedlings.defaults",
        "seedlings.errors",
        "seedlings.paths",
        "seedlings.storage",
        "seedlings.metrics",
        "seedlings.optim",
        "seedlings.precision",
        "seedlings.progress",
        "seedlings.run",
    }
    assert loose <= allowed, loose


def spelled_names(path: Path) -> set[str]:
    """The string literals of a module (f-strings' literal parts too) and every `fold{...}` it builds by hand."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and first.value == "fold" and len(node.values) == 2:
                found.add("fold{k}")
    return found


def test_a_runs_files_are_named_by_paths_alone():
    """One owner of a run's layout: seedlings.paths names each file and folder of a run; no other module (pipeline,
    lab, tracking, bundle, the Kaggle notebook's cells) spells one."""
    from seedlings import paths

    names = {v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str) and k != "REPO"}
    names = {n for n in names if "." in n or n == paths.SNAPSHOTS} | {"fold{k}"}  # bare words ("report") are common
    assert {"done.json", "checkpoint.pt", "metrics.csv", "config.yaml", "weights.json", ".lock"} <= names
    spelled = {name: sorted(spelled_names(path) & names) for name, path in MODULES.items() if name != "seedlings.paths"}
    assert {name: found for name, found in spelled.items() if found} == {}
