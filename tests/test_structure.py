"""The package's structure, from its imports (function-level and lazy imports count too).

- The import graphs of the package and of the benchmarks have no cycle: each module can be read (and
  imported) after the modules it uses, not together with them.
- The layer rules the folder tree stands for (docs/design.md, "Map of the package"): every subpackage
  has its place in LAYERS and imports only its own layer and the layers below; core/ is pure maths
  (neither torch.nn nor files); model/ never imports pruning/; nothing imports the CLI but
  `python -m seap`; at most eight modules stand at the top of src/seap. Imports under
  `if TYPE_CHECKING:` (annotations only, never run) are exempt from the layer rules, not from the
  cycle test. Each rule is also run on a planted violation, so a rule that cannot fail fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path, package: str | None) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(([package] if package else []) + parts)] = (f, is_pkg)
    return out


def _is_type_checking(node: ast.AST) -> bool:
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute)
                                                                    and t.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, runtime_only: bool):
    """Every import statement of a file, in order; `runtime_only`: not those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif runtime_only and _is_type_checking(child):
            for alt in child.orelse:
                yield from _import_nodes(alt, runtime_only)
        else:
            yield from _import_nodes(child, runtime_only)


def imported(path: Path, package: str | None, *, runtime_only: bool = False) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of what a file imports: `import a.b` gives a.b, `from m import x`
    gives m.x (a submodule of m, or a name defined in m: the caller resolves which)."""
    out = []
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), runtime_only):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
            continue
        base = package.split(".") if package else []
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        mod = ".".join((base if node.level else []) + ([node.module] if node.module else []))
        out += [(f"{mod}.{a.name}" if mod else a.name, node.lineno) for a in node.names]
    return out


def import_graph(mods: dict[str, tuple[Path, bool]], *, runtime_only: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for t, _ in imported(path, package, runtime_only=runtime_only):
            while t and t not in mods:  # `from pkg import sub` imports the submodule; `from mod import name` the module
                t = t.rpartition(".")[0]
            if t and t != name:
                graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\nfrom ..a import f\n")
    graph = import_graph(modules(pkg, "p"))
    assert graph == {"p": {"p.a"}, "p.a": {"p.sub.b"}, "p.sub": set(), "p.sub.b": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.sub.b"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph(modules(ROOT / "src" / "seap", "seap"))
    assert len(graph) > 40 and "seap.pruning.plan" in graph["seap.api"]  # the graph is really built
    assert cycles(graph) == []


def test_the_benchmarks_have_no_import_cycle():
    graph = import_graph(modules(ROOT / "benchmarks", None))
    assert "common" in graph["accuracy"]
    assert cycles(graph) == []


# -- the layer rules ---------------------------------------------------------------------------------
SRC = ROOT / "src" / "seap"
# lowest first: a module imports only modules of its own layer and of the layers below it
LAYERS = (
    {"errors", "_version", "_io", "outputs"},  # foundations: errors, atomic files, output folders
    {"core", "config", "tasks"},  # pure maths, the validated configs, the task registry and corpora
    {"model"},
    {"calibration"},
    {"pruning"},
    {"inference"},
    {"evaluation"},
    {"export"},
    {"analyze", "api"},
    {"cli"},
    {"__main__", ""},  # `python -m seap`; "" is seap/__init__.py, whose API is imported lazily
)
TOP_LEVEL_MODULES = 8
# what pure maths may import besides seap.core and seap.errors (torch, but not torch.nn)
CORE_IMPORTS = {"__future__", "abc", "bisect", "collections", "dataclasses", "enum", "functools", "heapq",
                "itertools", "logging", "math", "numpy", "operator", "statistics", "torch", "typing"}
FILE_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "mkdir", "unlink", "rmdir", "touch",
              "save_file", "load_file", "safe_open", "savefig", "save_tensors"}
FILE_NAMES = {"Path", "__file__"}
TORCH_FILES = {"save", "load", "hub"}  # torch.save / torch.load / torch.hub


def layer_of(module: str, package: str = "seap") -> str:
    """The top-level unit a module belongs to: its subpackage, or its own name at the top ('' for the
    package's __init__)."""
    parts = module.split(".")
    assert parts[0] == package
    return parts[1] if len(parts) > 1 else ""


def layer_violations(graph: dict[str, set[str]], layers=LAYERS, package: str = "seap") -> list[str]:
    """`a -> b` for each import that runs up the layers, and each unit that has no layer."""
    rank = {unit: i for i, units in enumerate(layers) for unit in units}
    out = [f"{m} has no layer" for m in sorted(graph) if layer_of(m, package) not in rank]
    for a in sorted(graph):
        for b in sorted(graph[a]):
            ra, rb = rank.get(layer_of(a, package)), rank.get(layer_of(b, package))
            if ra is not None and rb is not None and rb > ra:
                out.append(f"{a} -> {b}")
    return out


def core_violations(mods: dict[str, tuple[Path, bool]], package: str = "seap") -> list[str]:
    """What makes a module of <package>.core more than maths: an import of torch.nn, of a module that is
    neither listed in CORE_IMPORTS nor <package>.core / <package>.errors, or code that touches files."""
    out = []
    for name, (path, is_pkg) in sorted(mods.items()):
        if layer_of(name, package) != "core":
            continue
        where = path.relative_to(mods[package][0].parent).as_posix()
        found = []
        for t, line in imported(path, name if is_pkg else name.rpartition(".")[0], runtime_only=True):
            top = t.split(".")[0]
            inner = any(t == f"{package}.{u}" or t.startswith(f"{package}.{u}.") for u in ("core", "errors"))
            if t == "torch.nn" or t.startswith("torch.nn.") or (top == package and not inner) or (
                    top != package and top not in CORE_IMPORTS):
                found.append((line, f"imports {t}"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if called in FILE_CALLS:
                    found.append((line, f"calls {called}()"))
            elif isinstance(node, ast.Name) and node.id in FILE_NAMES:
                found.append((line, f"uses {node.id}"))
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
                  and (node.attr == "nn" or node.attr in TORCH_FILES)):
                found.append((line, f"uses torch.{node.attr}"))
        out += [f"{where}:{line} {what}" for line, what in sorted(found)]
    return out


def cli_violations(graph: dict[str, set[str]], package: str = "seap") -> list[str]:
    """Imports of <package>.cli from anywhere but `python -m <package>` and the cli package itself."""
    cli = f"{package}.cli"
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
            if (b == cli or b.startswith(cli + ".")) and a != f"{package}.__main__" and layer_of(a, package) != "cli"]


def package_graph(runtime_only: bool = True) -> dict[str, set[str]]:
    return import_graph(modules(SRC, "seap"), runtime_only=runtime_only)


def test_every_subpackage_has_a_layer_and_imports_only_downwards():
    graph = package_graph()
    assert {layer_of(m) for m in graph} >= {"core", "model", "calibration", "pruning", "inference", "cli"}
    assert layer_violations(graph) == []


def test_core_is_pure_maths():
    mods = modules(SRC, "seap")
    assert {"seap.core.scores", "seap.core.allocation", "seap.core.reconstruct"} <= set(mods)
    assert core_violations(mods) == []


def test_the_model_layer_never_imports_pruning():
    graph = import_graph(modules(SRC, "seap"))  # annotations-only imports count here too
    bad = [f"{a} -> {b}" for a, bs in sorted(graph.items()) if a.startswith("seap.model.") for b in sorted(bs)
           if b == "seap.pruning" or b.startswith("seap.pruning.")]
    assert any(a.startswith("seap.model.") for a in graph) and bad == []


def test_nothing_imports_the_cli():
    graph = import_graph(modules(SRC, "seap"))
    assert "seap.cli" in graph["seap.__main__"]  # the one import of it
    assert cli_violations(graph) == []


def test_at_most_eight_modules_at_the_top():
    top = sorted(f.name for f in SRC.glob("*.py"))
    assert "__init__.py" in top and len(top) <= TOP_LEVEL_MODULES, top


def test_the_rules_find_planted_violations(tmp_path):
    pkg = tmp_path / "p"
    for d in ("core", "model", "pruning", "cli", "stray"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "__main__.py").write_text("from .cli import main\n")
    (pkg / "core" / "maths.py").write_text(
        "import json\nfrom torch import nn\nimport torch\nfrom ..errors import E\nfrom ..model import m\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..model import fine\n"
        "def f(p):\n    torch.save(p, 'x')\n    return open(p).read(), torch.nn.Linear\n")
    (pkg / "model" / "m.py").write_text("def f():\n    from ..pruning import plan\n")
    (pkg / "model" / "fine.py").write_text("")
    (pkg / "pruning" / "plan.py").write_text("from ..cli import args\n")
    (pkg / "cli" / "args.py").write_text("from ..model import m\n")
    mods = modules(pkg, "p")
    graph = import_graph(mods, runtime_only=True)
    layers = ({"errors"}, {"core"}, {"model"}, {"pruning"}, {"cli"}, {"__main__", ""})
    assert layer_violations(graph, layers, "p") == [
        "p.stray has no layer", "p.core.maths -> p.model.m", "p.model.m -> p.pruning.plan",
        "p.pruning.plan -> p.cli.args"]
    assert core_violations(mods, "p") == [
        "core/maths.py:1 imports json", "core/maths.py:2 imports torch.nn", "core/maths.py:5 imports p.model.m",
        "core/maths.py:10 uses torch.save", "core/maths.py:11 calls open()", "core/maths.py:11 uses torch.nn"]
    assert cli_violations(graph, "p") == ["p.pruning.plan -> p.cli.args"]


def _tree(text: str) -> list[str]:
    """The lines of the fenced block that starts with `src/seap/` (the package map)."""
    lines = text.splitlines()
    start = lines.index("src/seap/")
    return lines[start: lines.index("```", start)]


def test_the_documented_tree_names_every_module():
    design = _tree((ROOT / "docs" / "design.md").read_text(encoding="utf-8"))
    assert design == _tree((ROOT / "README.md").read_text(encoding="utf-8"))  # one map, in both places
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(design)))
    stems = {f.stem for f in SRC.rglob("*.py") if f.stem != "__init__" and "adapters" not in f.parts}
    assert len(stems) > 40 and sorted(stems - words) == []


def test_forward_hooks_are_registered_in_one_place():
    where = sorted(str(f.relative_to(SRC)) for f in SRC.rglob("*.py")
                   if re.search(r"\.register_forward(_pre)?_hook\(", f.read_text(encoding="utf-8")))
    assert where == ["model/hooks.py"]
