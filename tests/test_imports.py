"""Imports run one way (../shared/DESIGN.md, README "Architecture"): no circles, and none of DESIGN's
"never" arrows. Read from the source with ast, importing nothing, so it holds for code no other test runs.

What counts as an import of M by A: any `import`/`from ... import` in A, at the top or inside a function
(a function-local import is still an arrow, only a later one), except under `if TYPE_CHECKING:` (never
run). Importing a.b.c also runs a/__init__.py and a/b/__init__.py, so those packages count too, except
the ones A itself sits in (Python has started them before A). The CLI's handler table names modules as
strings (imported on use); that is the CLI importing the library, the allowed direction.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("kolm_ray", "deployments")

CLI = ("kolm_ray.cli",)
TRAIN = ("kolm_ray.compile",)  # validate -> train -> evaluate -> gate -> pack, and train/ inside it
# Training code, which the capture proxy never loads: compile/ and the loop that runs it.
TRAINING_CODE = ("kolm_ray.compile", "kolm_ray.loop")
# Inference and serving, which never import compile/: the model layer and the artifact format included.
INFERENCE = (
    "kolm_ray.inference",  # kolm_ray.run, `kolm run`, the K-score's predictor, local answers
    "kolm_ray.serve",
    "kolm_ray.models",
    "kolm_ray.artifact",
    "kolm_ray.registry",
    "deployments",
)
CAPTURE = ("kolm_ray.capture", "kolm_ray.observations", "kolm_ray.providers")

# The packages in the order their imports run: each may import only from the packages before it (README
# "Architecture"). The loop's order, except that capture answers from promoted models, so it sits above
# the registry and inference, and the registry above the store it writes to.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kolm_ray.errors", "kolm_ray.settings", "kolm_ray.placement"),
    ("kolm_ray.providers",),
    ("kolm_ray.artifact",),
    ("kolm_ray.observations",),
    ("kolm_ray.models",),
    ("kolm_ray.inference",),
    ("kolm_ray.registry",),
    ("kolm_ray.capture", "kolm_ray.clustering", "kolm_ray.serve"),
    ("kolm_ray.recipe",),
    ("kolm_ray.compile",),
    ("kolm_ray.loop",),
    ("kolm_ray.demo",),
    ("kolm_ray.cli",),
)

Graph = dict[str, dict[str, int]]  # module -> {module it imports: line of the first such import}


def within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def module_files(repo: Path, roots: Iterable[str] = ROOTS) -> dict[str, Path]:
    """Dotted name -> file, for every .py under the roots (a package is its __init__.py)."""
    out = {}
    for root in roots:
        for path in sorted((repo / root).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, outside `if TYPE_CHECKING:` bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = node.orelse if _is_type_checking(node) else ast.iter_child_nodes(node)
        todo.extend(children)


def import_graph(repo: Path = REPO, roots: Iterable[str] = ROOTS) -> Graph:
    files = module_files(repo, roots)

    def owner(name: str) -> str | None:  # the module a dotted name lives in (None: outside the roots)
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: Graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for name in names:
                target = owner(name)
                if target is None:
                    continue
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    implicit = i < len(parts)  # a package __init__ the import runs on the way
                    if step == module or step not in files or (implicit and within(module, [step])):
                        continue
                    edges.setdefault(step, node.lineno)
        graph[module] = edges
    return graph


def _sccs(graph: Graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _shortest_path(graph: Graph, start: str, goal, allowed=None) -> list[str] | None:
    """start -> ... -> a module for which goal(m) holds (not start itself), fewest arrows first."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, {})):
            if allowed is not None and w not in allowed:
                continue
            if goal(w):
                path = [w, v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return None


def _describe(graph: Graph, path: list[str]) -> str:
    steps = [path[0]] + [f"{b} (line {graph[a][b]} of {a})" for a, b in zip(path, path[1:], strict=False)]
    return " -> ".join(steps)


def cycles(graph: Graph) -> list[str]:
    """One shortest circle per tangle of modules that import each other, as a readable chain."""
    out = []
    for component in _sccs(graph):
        first = component[0]
        path = _shortest_path(graph, first, lambda m, first=first: m == first, set(component))
        out.append(_describe(graph, path))
    return out


def forbidden(graph: Graph, sources: Iterable[str], never: Iterable[str]) -> list[str]:
    """For every module within `sources` that reaches a module within `never`: the chain that does."""
    never = tuple(never)
    out = []
    for module in sorted(m for m in graph if within(m, sources) and not within(m, never)):
        path = _shortest_path(graph, module, lambda m: within(m, never))
        if path:
            out.append(_describe(graph, path))
    return out


def stage(module: str) -> str | None:
    """kolm_ray.capture.local -> kolm_ray.capture; kolm_ray.settings -> itself; the package root: None."""
    parts = module.split(".")
    if parts[0] != "kolm_ray" or len(parts) == 1:
        return None
    return ".".join(parts[:2])


def layer_breaks(graph: Graph, layers=LAYERS) -> list[str]:
    """Every arrow from a package to one in a later layer (or to one no layer names), as a readable line."""
    rank = {p: i for i, group in enumerate(layers) for p in group}
    out = []
    for module, edges in sorted(graph.items()):
        src = stage(module)
        if src is None:
            continue
        for target, line in sorted(edges.items()):
            dst = stage(target)
            if dst is None or dst == src:
                continue
            if src not in rank or dst not in rank:
                out.append(
                    f"{module} -> {target} (line {line}): {src if src not in rank else dst} is in no layer"
                )
            elif rank[dst] > rank[src]:
                out.append(f"{module} -> {target} (line {line}): {src} may not import {dst}, a later layer")
    return out


# ---- the package as it is -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph: Graph) -> None:
    """The checks below pass only if the reader finds what is there: function-local imports, packages'
    own submodules, the implicit package __init__ and deployments/."""
    assert "kolm_ray.inference.predictors" in graph["kolm_ray.capture.local"]  # inside a method
    assert "kolm_ray.compile.train.config" in graph["kolm_ray.compile.compile"]  # inside a function
    assert "kolm_ray.clustering.featurize" in graph["kolm_ray.clustering.fit"]
    assert {"kolm_ray.serve.router", "kolm_ray"} <= set(
        graph["deployments.recall"]
    )  # kolm_ray/__init__ runs too
    assert "kolm_ray.recipe" not in graph["kolm_ray.recipe.synth"]  # its own package is not an arrow
    assert len(graph) >= 80 and sum(map(len, graph.values())) >= 250  # 80 modules, 269 arrows today


def test_packages_import_only_earlier_layers(graph: Graph) -> None:
    found = layer_breaks(graph)
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_the_top_level_holds_only_the_cli_settings_errors_and_placement() -> None:
    top = sorted(p.stem for p in (REPO / "kolm_ray").glob("*.py"))
    assert top == ["__init__", "cli", "errors", "placement", "settings"]


def test_no_module_imports_itself_back(graph: Graph) -> None:
    assert not cycles(graph), "import circles:\n" + "\n".join(cycles(graph))


def test_the_library_never_imports_the_cli(graph: Graph) -> None:
    found = forbidden(graph, [m for m in graph if not within(m, CLI)], CLI)
    assert not found, "the library imports the CLI:\n" + "\n".join(found)


def test_inference_and_serving_never_import_training(graph: Graph) -> None:
    found = forbidden(graph, INFERENCE, TRAIN)
    assert not found, "inference/serving reaches kolm_ray.compile.train:\n" + "\n".join(found)


def test_capture_never_imports_training_code(graph: Graph) -> None:
    found = forbidden(graph, CAPTURE, TRAINING_CODE)
    assert not found, "the capture path reaches training code:\n" + "\n".join(found)


# ---- the checks themselves, on small trees made to break them -----------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_circle_through_a_function_local_relative_import_is_found(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "kolm_ray/__init__.py": "",
            "kolm_ray/a.py": "def f():\n    from . import b\n    return b\n",
            "kolm_ray/b.py": "import json\n\nfrom kolm_ray.a import f\n",
            "kolm_ray/c.py": "from kolm_ray import a\n",  # reaches the circle, is not part of it
        },
    )
    assert cycles(import_graph(tmp_path)) == [
        "kolm_ray.a -> kolm_ray.b (line 2 of kolm_ray.a) -> kolm_ray.a (line 3 of kolm_ray.b)"
    ]


def test_a_circle_through_a_package_init_is_found(tmp_path: Path) -> None:
    """clustering's summary importing recipe/purity.py ran recipe/__init__.py, which imports clustering."""
    _tree(
        tmp_path,
        {
            "kolm_ray/__init__.py": "",
            "kolm_ray/clustering/__init__.py": "from kolm_ray.clustering.summarise import summary\n",
            "kolm_ray/clustering/summarise.py": "def summary():\n    from kolm_ray.recipe.purity import p\n",
            "kolm_ray/recipe/__init__.py": "from kolm_ray.recipe.synth import recipe\n",
            "kolm_ray/recipe/purity.py": "p = 1\n",
            "kolm_ray/recipe/synth.py": "def recipe():\n    from kolm_ray.clustering import embed\n",
        },
    )
    (circle,) = cycles(import_graph(tmp_path))
    assert "kolm_ray.recipe (line 2 of kolm_ray.clustering.summarise)" in circle
    assert "kolm_ray.clustering (line 2 of kolm_ray.recipe.synth)" in circle


def test_type_checking_imports_and_a_package_own_modules_are_no_circle(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "kolm_ray/__init__.py": "",
            "kolm_ray/pkg/__init__.py": "from kolm_ray.pkg.a import A\n",
            "kolm_ray/pkg/a.py": "from kolm_ray.pkg.b import B\nA = B\n",
            "kolm_ray/pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kolm_ray.pkg import A\nB = 1\n",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["kolm_ray.pkg.a"] == {"kolm_ray.pkg.b": 1} and graph["kolm_ray.pkg.b"] == {}
    assert cycles(graph) == []


def test_a_never_arrow_is_found_through_a_chain(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {
            "kolm_ray/__init__.py": "",
            "kolm_ray/inference/predictors.py": "from kolm_ray.models import modeling\n",
            "kolm_ray/models/__init__.py": "",
            "kolm_ray/models/modeling.py": "def pooled():\n    import kolm_ray.compile.train.data\n",
            "kolm_ray/compile/__init__.py": "",
            "kolm_ray/compile/train/__init__.py": "",
            "kolm_ray/compile/train/data.py": "",
            "kolm_ray/loop/loop.py": "def run():\n    from kolm_ray.cli import build_parser\n",
            "kolm_ray/cli.py": "from kolm_ray.loop import loop\n",
            "kolm_ray/loop/__init__.py": "",
            "deployments/recall.py": "from kolm_ray.inference.predictors import run\n",
        },
    )
    graph = import_graph(tmp_path)
    assert forbidden(graph, INFERENCE, TRAIN) == [
        "deployments.recall -> kolm_ray.inference.predictors (line 1 of deployments.recall) -> kolm_ray.models.modeling"
        " (line 1 of kolm_ray.inference.predictors) -> kolm_ray.compile (line 2 of kolm_ray.models.modeling)",
        "kolm_ray.inference.predictors -> kolm_ray.models.modeling (line 1 of kolm_ray.inference.predictors)"
        " -> kolm_ray.compile (line 2 of kolm_ray.models.modeling)",
        "kolm_ray.models.modeling -> kolm_ray.compile (line 2 of kolm_ray.models.modeling)",
    ]
    assert forbidden(graph, ["kolm_ray.loop.loop"], CLI) == [
        "kolm_ray.loop.loop -> kolm_ray.cli (line 2 of kolm_ray.loop.loop)"
    ]
    assert cycles(graph) == [
        "kolm_ray.cli -> kolm_ray.loop.loop (line 1 of kolm_ray.cli) -> kolm_ray.cli (line 2 of kolm_ray.loop.loop)"
    ]


def test_a_later_layer_import_is_found(tmp_path: Path) -> None:
    """capture/ importing compile/ (or the store importing capture) breaks the layers, even inside a function."""
    _tree(
        tmp_path,
        {
            "kolm_ray/__init__.py": "",
            "kolm_ray/capture/__init__.py": "",
            "kolm_ray/capture/local.py": "def answer():\n    from kolm_ray.compile.evaluate import field_correct\n",
            "kolm_ray/compile/__init__.py": "",
            "kolm_ray/compile/evaluate.py": "",
            "kolm_ray/observations/__init__.py": "from kolm_ray.capture import local\n",
            "kolm_ray/stray.py": "",
            "kolm_ray/artifact/__init__.py": "import kolm_ray.stray\n",
        },
    )
    graph = import_graph(tmp_path)
    assert layer_breaks(graph) == [
        "kolm_ray.artifact -> kolm_ray.stray (line 1): kolm_ray.stray is in no layer",
        "kolm_ray.capture.local -> kolm_ray.compile (line 2): kolm_ray.capture may not import kolm_ray.compile,"
        " a later layer",
        "kolm_ray.capture.local -> kolm_ray.compile.evaluate (line 2): kolm_ray.capture may not import"
        " kolm_ray.compile, a later layer",
        "kolm_ray.observations -> kolm_ray.capture (line 1): kolm_ray.observations may not import"
        " kolm_ray.capture, a later layer",
        "kolm_ray.observations -> kolm_ray.capture.local (line 1): kolm_ray.observations may not import"
        " kolm_ray.capture, a later layer",
    ]
    assert forbidden(graph, CAPTURE, TRAINING_CODE)
