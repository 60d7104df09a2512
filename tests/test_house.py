"""The package's layout rules, read from the source (AST), not from a running server.

(a) No import cycle among gstream's modules. Counted: imports at module level, including
    inside a module-level ``try``/``if``. Not counted: imports inside functions (the lazy
    imports that keep ``import gstream`` from loading ssl before monkey-patching run after
    every module is initialised, so they cannot deadlock an import) and ``if TYPE_CHECKING:``
    blocks (never run).
(b) No underscore name of one module used from another module outside its "unit": a module
    at the top of gstream/ is its own unit; a module in a sub-package (gstream/client/,
    gstream/backplane/, gstream/contrib/locust/...) shares its unit with that sub-package.
    Counted: ``from m import _x``; ``m._x`` where ``m`` names a gstream module; ``obj._x``
    (also ``self._x`` and ``super()._x``) when ``_x`` is not defined in the user's unit but is
    defined (method, class attribute, ``self._x = ...`` or ``__slots__``) in another gstream
    module. Underscore names of other libraries are not this test's business.

``KNOWN_PRIVATE_USES`` names each remaining violation of (b). The list may only shrink; a new violation fails the test,
and so does an entry that is no longer needed.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gstream"


def _pairs(module: str, names: str) -> set[tuple[str, str]]:
    return {(module, name) for name in names.split()}


#: (module that uses it, underscore name) for each violation of (b) left to fix. Only shrinks.
KNOWN_PRIVATE_USES: frozenset[tuple[str, str]] = frozenset(
    # Not gstream's: gevent's socket._sock, which only shares a name with an attribute
    # of gstream's WebSocket.
    _pairs("gstream.handler", "_sock")
)


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def _is_package(name: str, modules: dict[str, ast.Module]) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _resolve(importer: str, node: ast.ImportFrom, modules: dict[str, ast.Module]) -> str | None:
    """The absolute module name an ``ImportFrom`` reads from, or None if not gstream's."""
    if node.level == 0:
        base = node.module or ""
    else:
        parts = importer.split(".")
        if not _is_package(importer, modules):
            parts = parts[:-1]
        if node.level > 1:
            parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return base if base in modules else None


def _top_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: module level, not TYPE_CHECKING, not in defs."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                stack.extend(node.orelse)
            else:
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                stack.extend(handler.body)


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph(modules: dict[str, ast.Module] | None = None) -> dict[str, set[str]]:
    """Module -> gstream modules it imports at import time (with the packages that loads)."""
    modules = modules if modules is not None else _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in modules.items():
        targets: set[str] = set()
        for node in _top_level_imports(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
                continue
            base = _resolve(name, node, modules)
            if base is None:
                continue
            targets.add(base)
            for alias in node.names:  # `from pkg import submodule`
                if f"{base}.{alias.name}" in modules:
                    targets.add(f"{base}.{alias.name}")
        mine = _ancestors(name)
        for target in targets:
            # Importing a.b.c runs a and a.b first, except the packages the importer is in
            # (they are already being imported when it runs).
            for dep in ({target} | _ancestors(target)) - mine - {name}:
                graph[name].add(dep)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _unit(name: str) -> str:
    parent = name.rpartition(".")[0]
    return name if parent == "gstream" or name == "gstream" else parent


def _same_unit(user: str, owner: str) -> bool:
    unit = _unit(owner)
    return user in (unit, owner) or user.startswith(unit + ".")


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _defined_privates(tree: ast.Module) -> set[str]:
    """Underscore attribute names a module defines on its classes and instances."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    for target in item.targets:
                        if isinstance(target, ast.Name):
                            names.add(target.id)
                            if target.id == "__slots__" and isinstance(item.value, (ast.Tuple, ast.List)):
                                names.update(e.value for e in item.value.elts
                                             if isinstance(e, ast.Constant) and isinstance(e.value, str))
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == "self"):
                    names.add(target.attr)
    return {n for n in names if _private(n)}


def private_uses(modules: dict[str, ast.Module] | None = None) -> set[tuple[str, str]]:
    """(using module, name) for every underscore name used outside its unit; see the docstring."""
    modules = modules if modules is not None else _modules()
    defined = {name: _defined_privates(tree) for name, tree in modules.items()}
    found: set[tuple[str, str]] = set()
    for user, tree in modules.items():
        local = set().union(*(defined[m] for m in modules if _same_unit(user, m)))
        elsewhere = {n for m in modules if not _same_unit(user, m) for n in defined[m]}
        module_aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(user, node, modules)
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        module_aliases[alias.asname or alias.name] = sub
                    elif _private(alias.name) and not _same_unit(user, base):
                        found.add((user, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        module_aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in module_aliases:
                if not _same_unit(user, module_aliases[value.id]):
                    found.add((user, node.attr))
            elif node.attr not in local and node.attr in elsewhere:
                found.add((user, node.attr))
    return found


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles among gstream modules: {cycles}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_used_outside_its_module_or_package() -> None:
    found = private_uses()
    new = sorted(found - KNOWN_PRIVATE_USES)
    assert not new, f"underscore names used outside their module/package (add a public seam): {new}"
    fixed = sorted(KNOWN_PRIVATE_USES - found)
    assert not fixed, f"no longer violated: remove from KNOWN_PRIVATE_USES: {fixed}"


def test_the_private_use_finder_finds_reach_ins() -> None:
    modules = {
        "gstream": ast.parse(""),
        "gstream.a": ast.parse("_X = 1\nclass A:\n    def _hidden(self): pass\n"),
        "gstream.b": ast.parse("from . import a\nfrom .a import _X\n"
                               "def f(obj):\n    a._X\n    obj._hidden()\n"),
    }
    assert private_uses(modules) == {("gstream.b", "_X"), ("gstream.b", "_hidden")}
