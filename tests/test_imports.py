"""The package's import graph: no cycles, and imports run one way between the rooms.

    cli -> experiments, explain, inference -> engine -> model, data, evaluation, viz -> ops -> torch

(files.py sits under every room). The graph is read from the sources with `ast`, every `import` and
`from ... import` at any depth, inside functions too: an import moved into a function to dodge a
cycle is still an edge. The first tests run the checker on small packages written here, so it is
known to find what it looks for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fasterrcnn

PACKAGE = Path(fasterrcnn.__file__).parent

# The layer of each room (a sub-package, or a top-level module): a room may import rooms of a lower
# layer and itself, never one above. Rooms on one layer are checked by the rules below.
LAYERS = {
    "cli": 5,
    "__main__": 5,
    "experiments": 4,
    "explain": 4,
    "inference": 4,
    "engine": 3,
    "deploy": 3,
    "model": 2,
    "data": 2,
    "evaluation": 2,
    "viz": 2,
    "ops": 1,
    "files": 0,
}
# What the detector's own rooms may import: the model knows nothing of datasets, metrics, drawing,
# the training runtime or the command line; the ops know nothing of the model.
ALLOWED = {"model": {"model", "ops", "files"}, "ops": {"ops", "files"}}


def module_name(path: Path, root: Path) -> str:
    """`root/model/rpn.py` -> `<root's name>.model.rpn`; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}, from every import statement in its source."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: `from ..ops import x` climbs level - 1 packages
                    base = package[: len(package) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:  # `from . import rpn` imports the module rpn
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in paths else source)
        # `import a.b.c` runs a, a.b and a.b.c: an edge to each that is a module of this package, but
        # not to the importer's own packages (Python has initialised them before the importer runs).
        own = {".".join(package[:k]) for k in range(1, len(package) + 1)} | {name}
        resolved = set()
        for target in targets:
            parts = target.split(".")
            resolved.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        graph[name] = {target for target in resolved if target in paths and target not in own}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each as one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_through(graph, sorted(group)) for group in groups]


def cycle_through(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One readable cycle a -> b -> ... -> a inside a strongly connected group (breadth-first back to a)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def room(module: str) -> str | None:
    """`fasterrcnn.model.rpn` -> `model`; the package's own `__init__` (its lazy facade) has no room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def room_violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that goes up a layer, or out of what the model and the ops may import."""
    found = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = room(source), room(target)
            if a is None or b is None or a == b:
                continue
            if LAYERS[b] > LAYERS[a]:
                found.append(f"{source} imports {target}: {a} (layer {LAYERS[a]}) is below {b} ({LAYERS[b]})")
            elif a in ALLOWED and b not in ALLOWED[a]:
                found.append(f"{source} imports {target}: {a} may import only {sorted(ALLOWED[a])}")
    return found


def write_package(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


# The checker on packages made here


def test_the_checker_resolves_relative_absolute_and_function_level_imports(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "ops/__init__.py": "from .nms import nms\n",
            "ops/nms.py": "import torch\n",
            "model/__init__.py": "from . import rpn\n",
            "model/rpn.py": "from ..ops import nms\nfrom ..ops.nms import nms as n2\n",
            "engine/trainer.py": "import pkg.model.rpn\n\ndef f():\n    from pkg.ops import nms\n",
        },
    )
    assert import_graph(pkg) == {
        "pkg": set(),
        "pkg.ops": {"pkg.ops.nms"},
        "pkg.ops.nms": set(),  # torch is outside the package
        "pkg.model": {"pkg.model.rpn"},
        "pkg.model.rpn": {"pkg.ops", "pkg.ops.nms"},  # `from ..ops import nms` runs ops/__init__ and nms.py
        "pkg.engine.trainer": {"pkg.model", "pkg.model.rpn", "pkg.ops", "pkg.ops.nms"},
    }


def test_the_checker_finds_a_cycle_held_off_by_an_import_inside_a_function(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "engine/__init__.py": "",
            "engine/trainer.py": "from .checkpoint import save\n\ndef train():\n    from .alternating import run\n",
            "engine/checkpoint.py": "",
            "engine/alternating.py": "from .trainer import train\n",
        },
    )
    assert find_cycles(import_graph(pkg)) == [
        ["pkg.engine.alternating", "pkg.engine.trainer", "pkg.engine.alternating"]
    ]
    (pkg / "engine/alternating.py").write_text("from .checkpoint import save\n")
    assert find_cycles(import_graph(pkg)) == []


def test_the_checker_finds_an_import_up_the_layers_and_out_of_the_models_room(tmp_path):
    pkg = write_package(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "model/rpn.py": "from ..ops import nms\nfrom ..data import coco\n",
            "ops/__init__.py": "from ..files import write\n",
            "data/coco.py": "",
            "engine/trainer.py": "from ..experiments import alternating\n",
            "experiments/alternating.py": "",
            "files.py": "",
        },
    )
    assert room_violations(import_graph(pkg)) == [
        "pkg.engine.trainer imports pkg.experiments.alternating: engine (layer 3) is below experiments (4)",
        "pkg.model.rpn imports pkg.data.coco: model may import only ['files', 'model', 'ops']",
    ]


# The package itself


def test_every_room_of_the_package_has_a_layer():
    rooms = {room(name) for name in import_graph(PACKAGE)} - {None}
    assert rooms <= set(LAYERS), f"new rooms without a layer in this test: {sorted(rooms - set(LAYERS))}"


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_imports_run_one_way_between_the_rooms():
    violations = room_violations(import_graph(PACKAGE))
    assert not violations, "\n".join(violations)
