"""The shape of the house: no import cycles among edgeship modules, and imports only point down the layers.

The graph is read from the source with ``ast`` (nothing is imported), from
the three folders that setup.cfg maps onto ``edgeship``. Every import counts,
wherever it stands:

* module-level and function-level ("lazy") imports alike. A lazy import
  only postpones a cycle to the first call that takes that path — the
  ``noqa: PLC0415 - avoid an import cycle`` kind of comment is a cycle, not
  a way out of one;
* a string naming an edgeship module inside a tuple of a module-level
  assignment (the ``_LAZY`` and ``_SUBCOMMANDS`` maps handed to
  ``importlib.import_module``); a logger name such as
  ``getLogger("edgeship.agent")`` is not an import;
* but not imports under ``if TYPE_CHECKING:``, which never run.

Importing a sub-module also runs its parent packages' ``__init__``; those
implicit edges are left out (every module would otherwise point at
``edgeship`` itself). An edge goes to the most specific module named:
``from . import package`` is an edge to ``edgeship.package``.

Layers (low to high). A module may import its own layer group or any lower
rank; groups that share a rank are siblings and never import each other —
so the agent never imports the converters or the fleet side, and the fleet
side never imports the agent:

    0 foundation   edgeship, errors, _version, _files, metrics, _onnx_external
    1 contracts    tensorspec, preprocess, signing, protocol, mqtt, drift, rollout, fielddata
    2 model        package, runtime.*
    3 converters | agent | fleet
    4 app          cli.*, demo, demo_loop

A new module must be given a layer here (the test says so), which is the
moment to decide where it belongs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"edgeship": ROOT / "sdk", "edgeship.converters": ROOT / "converters", "edgeship.agent": ROOT / "device_agent"}

# (group, rank, module names or package prefixes ending in ".")
LAYERS = [
    ("foundation", 0, ["edgeship", "edgeship.errors", "edgeship._version", "edgeship._files", "edgeship.metrics",
                      "edgeship.lifecycle", "edgeship._onnx_external"]),
    ("contracts", 1, ["edgeship.tensorspec", "edgeship.preprocess", "edgeship.signing", "edgeship.protocol",
                      "edgeship.mqtt", "edgeship.drift", "edgeship.rollout", "edgeship.fielddata"]),
    ("model", 2, ["edgeship.package", "edgeship.runtime", "edgeship.runtime."]),
    ("converters", 3, ["edgeship.converters", "edgeship.converters."]),
    ("agent", 3, ["edgeship.agent", "edgeship.agent."]),
    ("fleet", 3, ["edgeship.fleet", "edgeship.fleet."]),
    ("app", 4, ["edgeship.cli", "edgeship.cli.", "edgeship.demo", "edgeship.demo_loop", "edgeship.demo_data",
             "edgeship.demo_data."]),
]


# ------------------------------------------------------------------ the graph (pure)

def find_modules(folders: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under the mapped folders."""
    mods = {}
    for pkg, folder in folders.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _is_type_checking(node: ast.If) -> bool:
    return any(getattr(n, "id", getattr(n, "attr", None)) == "TYPE_CHECKING" for n in ast.walk(node.test))


def _statements(body: list[ast.stmt]):
    """Every statement at any depth (function bodies, if/try/with blocks), minus ``if TYPE_CHECKING:`` bodies.

    Statements only: imports cannot hide inside expressions, and not walking
    every expression node keeps this fast on a loaded machine."""
    todo = list(body)
    while todo:
        stmt = todo.pop()
        yield stmt
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            block = getattr(stmt, field, None)
            if not isinstance(block, list) or (field == "body" and isinstance(stmt, ast.If) and _is_type_checking(stmt)):
                continue
            for child in block:
                # except handlers and match cases hold statements one level down
                todo.extend(child.body if isinstance(child, (ast.ExceptHandler, ast.match_case)) else [child])


def imports_of(module: str, source: str, known: set[str], *, is_package: bool) -> set[str]:
    """The edgeship modules ``module`` imports (any depth of the file), resolved to the most specific known name."""
    tree = ast.parse(source)
    here = module.split(".") if is_package else module.split(".")[:-1]
    out: set[str] = set()

    def add(name: str) -> None:
        # `import a.b.c` / `from a.b import c`: the deepest prefix that is one of our modules
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                if cand != module:
                    out.add(cand)
                return

    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                add(f"{prefix}.{alias.name}")
    # Lazy maps: ("edgeship.agent.agent", "Agent") in a module-level assignment. A logger name such as
    # getLogger("edgeship.agent") is not in a tuple.
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            for node in ast.walk(stmt.value):
                if isinstance(node, ast.Tuple):
                    for item in node.elts:
                        if isinstance(item, ast.Constant) and isinstance(item.value, str) and item.value in known:
                            add(item.value)
    return out


def import_graph(folders: dict[str, Path] = FOLDERS) -> dict[str, set[str]]:
    mods = find_modules(folders)
    known = set(mods)
    return {m: imports_of(m, f.read_text(encoding="utf-8"), known, is_package=f.name == "__init__.py")
            for m, f in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself), sorted.

    Tarjan's algorithm, iterative so a deep chain cannot hit the recursion limit.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in graph.get(v, ()):
                    cycles.append(sorted(comp))
    return sorted(cycles)


def layer_of(module: str, layers=LAYERS) -> tuple[str, int] | None:
    """(group, rank) of the most specific entry naming ``module``; None when it has no layer."""
    best = None
    for group, rank, names in layers:
        for n in names:
            if module == n or (n.endswith(".") and module.startswith(n)):
                if best is None or len(n) > best[0]:
                    best = (len(n), group, rank)
    return (best[1], best[2]) if best else None


def layer_violations(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """One line per import that points up a layer or sideways into a sibling group."""
    out = []
    for a in sorted(graph):
        la = layer_of(a, layers)
        for b in sorted(graph[a]):
            lb = layer_of(b, layers)
            if la is None or lb is None:
                continue  # reported by test_every_module_has_a_layer
            if la[0] != lb[0] and lb[1] >= la[1]:
                out.append(f"{a} ({la[0]}) imports {b} ({lb[0]})")
    return out


# ------------------------------------------------------------------ the finder itself

def test_the_cycle_finder_finds_a_planted_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # two separate circles sharing no module are reported apart
    assert find_cycles({"x": {"y"}, "y": {"x"}, "p": {"q"}, "q": {"r"}, "r": {"p"}}) == [["p", "q", "r"], ["x", "y"]]
    # a long chain closing on itself does not blow the stack
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(5000)}
    chain["m5000"] = {"m0"}
    assert len(find_cycles(chain)[0]) == 5001


def test_imports_are_read_at_any_depth_relative_and_by_string(tmp_path):
    pkg = tmp_path / "sdk"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('_LAZY = {"X": ("edgeship.sub.b", "X")}\n')
    (pkg / "d.py").write_text("try:\n    pass\nexcept ImportError:\n    with x:\n        import edgeship.c\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                              "log = getLogger('edgeship.c')  # a name, not an import\n"
                              "def f():\n    from .sub import b  # lazy: still an edge\n")
    (pkg / "c.py").write_text("import edgeship.a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    graph = import_graph({"edgeship": pkg})
    assert graph["edgeship.a"] == {"edgeship.sub.b"}          # not c: under TYPE_CHECKING
    assert graph["edgeship.sub.b"] == {"edgeship.a"}
    assert graph["edgeship"] == {"edgeship.sub.b"}
    assert graph["edgeship.c"] == {"edgeship.a"}
    assert graph["edgeship.d"] == {"edgeship.c"}                # inside except + with
    assert find_cycles(graph) == [["edgeship.a", "edgeship.sub.b"]]


def test_layer_rules_catch_an_upward_and_a_sideways_import():
    graph = {"edgeship.errors": set(), "edgeship.package": {"edgeship.errors"},
             "edgeship.agent.store": {"edgeship.package", "edgeship.converters.recipe"},
             "edgeship.converters.recipe": {"edgeship.package"},
             "edgeship.tensorspec": {"edgeship.runtime._backends"}}
    assert layer_violations(graph) == [
        "edgeship.agent.store (agent) imports edgeship.converters.recipe (converters)",
        "edgeship.tensorspec (contracts) imports edgeship.runtime._backends (model)",
    ]


# ------------------------------------------------------------------ the tree

@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_cycles_among_edgeship_modules(graph):
    assert len(graph) > 50  # the folders were found
    assert find_cycles(graph) == []


def test_every_module_has_a_layer(graph):
    assert [m for m in sorted(graph) if layer_of(m) is None] == []


def test_imports_only_point_down_the_layers(graph):
    assert layer_violations(graph) == []


def test_the_tensor_spec_sits_below_the_runtime_and_the_package(graph):
    assert graph["edgeship.tensorspec"] <= {"edgeship.errors"}
    assert "edgeship.tensorspec" in graph["edgeship.package"] and "edgeship.tensorspec" in graph["edgeship.runtime"]
    assert not any(m.startswith("edgeship.runtime") for m in graph["edgeship.tensorspec"])


def test_the_converter_entry_points_are_functions():
    pytest.importorskip("torch")
    import importlib

    conv = importlib.import_module("edgeship.converters")
    from edgeship.converters import distill, prune, quantize

    for fn in (distill, prune, quantize):
        assert callable(fn) and type(fn).__name__ == "function", fn
    # importing every converter module does not rebind the public names to modules
    for mod in ("distillation", "quantization", "pruning", "checkpoints"):
        importlib.import_module(f"edgeship.converters.{mod}")
    assert (conv.distill, conv.quantize, conv.prune) == (distill, quantize, prune)
    assert all(type(getattr(conv, n)).__name__ == "function" for n in ("distill", "quantize", "prune"))


def test_agent_files_and_all_functions_stay_small():
    """#21.6: no file in the agent folder over 800 lines, no function anywhere over 150 (split by layer)."""
    big_files = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / "device_agent").glob("*.py"))
                 if (n := len(p.read_text().splitlines())) > 800]
    long_functions = []
    for folder in FOLDERS.values():
        for p in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > 150:
                        long_functions.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert big_files == [] and long_functions == [], big_files + long_functions
