"""The package's import rules and size limits, read from the source with `ast` (nothing is imported).

(a) Only fftrainer_ds/ds/ imports deepspeed, at any level: DeepSpeed's internals stay behind one door.
(b) `fftrainer-launch` (fftrainer_ds/launch.py) and every first-party module it loads at import time
    never import deepspeed and never import torch.distributed at module level: the supervisor must
    start fast and must not pull in a communication stack it never uses.
(c) Module-level first-party imports form no cycle (a cycle works or breaks depending on which
    module is imported first).
(d) Files <= 400 lines, functions (methods and nested ones too) <= 60 lines.

"Module level" means run when the module is imported: outside any function body and outside an
`if TYPE_CHECKING:` block. Importing a module runs its packages' `__init__` first, so reaching
`fftrainer_ds.ops.reference` also reaches `fftrainer_ds` and `fftrainer_ds.ops`.
"""
from __future__ import annotations

import ast
import functools
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "fftrainer_ds"
LAUNCHER = "fftrainer_ds.launch"
DS_PACKAGE = "fftrainer_ds.ds"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    """One module imported by one import statement (a statement naming several yields several)."""

    path: str          # file, relative to the repository root
    lineno: int
    text: str          # the statement's first source line, for the failure message
    target: str        # absolute module name (for `from m import x`: m, or m.x when that is a module)
    names: Tuple[str, ...]  # what `from target import ...` takes from it; () for `import target`
    module_level: bool

    def where(self) -> str:
        return f"{self.path}:{self.lineno}: {self.text}"


@dataclass(frozen=True)
class SourceModule:
    name: str
    path: str
    tree: ast.Module
    lines: Tuple[str, ...]


def _module_name(rel: str) -> str:
    parts = rel[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def modules() -> Dict[str, SourceModule]:
    """Every first-party module by name."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(f for f in filenames if f.endswith(".py")):
            rel = os.path.relpath(os.path.join(dirpath, fn), ROOT)
            with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
                source = f.read()
            found[_module_name(rel)] = SourceModule(_module_name(rel), rel, ast.parse(source, rel),
                                                   tuple(source.splitlines()))
    return found


def ancestors(name: str) -> List[str]:
    """The packages whose `__init__` runs before `name` itself, outermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(mod: SourceModule, node: ast.stmt) -> List[Tuple[str, Tuple[str, ...]]]:
    """(module, names taken from it) for each module the statement imports."""
    if isinstance(node, ast.Import):
        return [(alias.name, ()) for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = mod.name if mod.path.endswith("__init__.py") else mod.name.rpartition(".")[0]
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    submodules = [(f"{base}.{a.name}", ()) for a in node.names if f"{base}.{a.name}" in modules()]
    return [(base, tuple(a.name for a in node.names))] + submodules


def _walk(mod: SourceModule, nodes: Iterable[ast.AST], module_level: bool, out: List[Import]) -> None:
    for child in nodes:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            text = mod.lines[child.lineno - 1].strip()
            out.extend(Import(mod.path, child.lineno, text, target, names, module_level)
                       for target, names in _targets(mod, child))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _walk(mod, ast.iter_child_nodes(child), False, out)
        elif isinstance(child, ast.If) and _is_type_checking(child):
            _walk(mod, child.body, False, out)
            _walk(mod, child.orelse, module_level, out)
        else:
            _walk(mod, ast.iter_child_nodes(child), module_level, out)


@functools.lru_cache(maxsize=None)
def imports(name: str) -> Tuple[Import, ...]:
    """Every import of module `name`, function-level ones included, in source order."""
    out: List[Import] = []
    _walk(modules()[name], modules()[name].tree.body, True, out)
    return tuple(sorted(out, key=lambda i: i.lineno))


def first_party_deps(name: str) -> Dict[str, Import]:
    """First-party modules that importing `name` runs directly, each with the import that runs it
    (a target's packages included: `import a.b.c` runs a and a.b too)."""
    deps: Dict[str, Import] = {}
    for imp in imports(name):
        if imp.module_level:
            for dep in ancestors(imp.target) + [imp.target]:
                if dep in modules() and dep != name:
                    deps.setdefault(dep, imp)
    return deps


def is_under(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def test_only_ds_imports_deepspeed():
    bad = [imp.where() for name in modules() if not is_under(name, DS_PACKAGE)
           for imp in imports(name) if is_under(imp.target, "deepspeed")]
    assert not bad, f"deepspeed imported outside {DS_PACKAGE.replace('.', '/')}/:\n" + "\n".join(bad)


# Packages that work on bytes and tensors only: they are tested without an engine and must not reach
# up into DeepSpeed, the failover flows or the runtime (docs/DESIGN.md, "Who may import whom").
LOWER = ("fftrainer_ds.snapshot", "fftrainer_ds.ops", "fftrainer_ds.replication")
UPPER = ("fftrainer_ds.ds", "fftrainer_ds.failover", "fftrainer_ds.runtime", "fftrainer_ds.engine")


def test_lower_packages_never_import_upper_ones():
    bad = [imp.where() for name in modules() if any(is_under(name, low) for low in LOWER)
           for imp in imports(name) if any(is_under(imp.target, up) for up in UPPER)]
    assert not bad, "snapshot/, ops/ and replication/ must not import ds/, failover/, runtime or engine:\n  " + \
        "\n  ".join(bad)


def launcher_closure() -> Dict[str, Optional[Import]]:
    """The modules `fftrainer-launch` loads at import time, each with the import that first reached it."""
    reached: Dict[str, Optional[Import]] = {m: None for m in ancestors(LAUNCHER) + [LAUNCHER]}
    todo = list(reached)
    while todo:
        for dep, imp in first_party_deps(todo.pop()).items():
            if dep not in reached:
                reached[dep] = imp
                todo.append(dep)
    return reached


def _chain(reached: Dict[str, Optional[Import]], name: str) -> str:
    """How the launcher reaches `name`: the import lines from launch.py (or a package) down to it."""
    steps = []
    while reached[name] is not None:
        imp = reached[name]
        steps.append(imp.where())
        name = _module_name(imp.path)
    steps.append(f"{LAUNCHER} itself" if name == LAUNCHER else f"package {name}, run before {LAUNCHER}")
    return " <- ".join(steps)


def _is_torch_distributed(imp: Import) -> bool:
    return is_under(imp.target, "torch.distributed") or (imp.target == "torch" and "distributed" in imp.names)


def _launcher_violations() -> List[str]:
    reached = launcher_closure()
    bad = []
    for name in sorted(reached):
        for imp in imports(name):
            if is_under(imp.target, "deepspeed"):
                bad.append(f"{imp.where()}  [deepspeed; reached via {_chain(reached, name)}]")
            elif imp.module_level and _is_torch_distributed(imp):
                bad.append(f"{imp.where()}  [module-level torch.distributed; reached via {_chain(reached, name)}]")
    return bad


def test_launcher_imports_neither_deepspeed_nor_torch_distributed():
    bad = _launcher_violations()
    assert not bad, "fftrainer-launch loads modules that import deepspeed or torch.distributed:\n" + "\n".join(bad)


def find_cycles() -> List[Tuple[List[str], List[str]]]:
    """(a cycle, its whole component) per strongly connected component of module-level first-party
    imports (Tarjan). Imports of a module's own packages are left out: those are already running
    whenever the module is, so they close no cycle that import order could break."""
    graph = {m: [d for d in first_party_deps(m) if d not in ancestors(m)] for m in modules()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    sccs: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on_stack.discard(comp[-1])
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(_cycle_in(graph, sorted(comp)), sorted(comp)) for comp in sccs]


def _cycle_in(graph: Dict[str, List[str]], comp: List[str]) -> List[str]:
    """A simple cycle through comp[0] inside the component (breadth-first, so a shortest one)."""
    members, start = set(comp), comp[0]
    parent: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its component {comp}")


def test_no_import_cycles():
    reports = []
    for cycle, component in find_cycles():
        edges = [first_party_deps(a)[b].where() for a, b in zip(cycle, cycle[1:])]
        others = sorted(set(component) - set(cycle))
        also = f"\n    (same tangle: {', '.join(others)})" if others else ""
        reports.append(" -> ".join(cycle) + "\n    " + "\n    ".join(edges) + also)
    assert not reports, "module-level import cycles:\n" + "\n".join(reports)


def test_files_at_most_400_lines():
    bad = [f"{m.path}: {len(m.lines)} lines" for m in modules().values() if len(m.lines) > MAX_FILE_LINES]
    assert not bad, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(bad)


def test_functions_at_most_60_lines():
    bad = []
    for m in modules().values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    bad.append(f"{m.path}:{node.lineno} {node.name} {length} lines")
    assert not bad, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(bad)
