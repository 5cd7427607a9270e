"""The package's import graph, read from the source with ``ast`` (nothing is imported).

* layering: the latent-variable core (``nlmefit.marginal``, ``nlmefit.posteriors``, ``nlmefit.models``) never
  reaches the layers built on it (estimators, results, diagnostics, simulation, benchmark, cli), not even
  through a function-local import; ``nlmefit.posteriors`` does not use ``nlmefit.marginal``; ``nlmefit.pk``
  knows nothing of models or estimators;
* no cycle between modules in the module-level import graph;
* every function-local import of an ``nlmefit`` module, or of a heavy optional dependency (matplotlib,
  pyro), says why it is local in a comment on its line or the line just above (``cli.py`` is exempt: a
  command-line entry point imports lazily for start-up time).

The graph: there is an edge A → B when module A imports module B or a name from B.  ``import nlmefit.x``
and ``from nlmefit import x`` give an edge to ``nlmefit.x`` (its ``__init__.py`` when it is a package);
``from nlmefit.x import y`` gives an edge to ``nlmefit.x.y`` when that is a module, else to ``nlmefit.x``.
Parent packages that Python initialises on the way are *not* edges, so a package's ``__init__`` re-exporting
its children, and children importing siblings by full module path, are not cycles by themselves.
"""
from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "nlmefit"
ROOT = Path(__file__).resolve().parents[1]
PKG_DIR = ROOT / PACKAGE

# layer → the packages it must not reach (directly or transitively, module-level or function-level imports)
FORBIDDEN = {
    "nlmefit.marginal": ("nlmefit.estimators", "nlmefit.results", "nlmefit.diagnostics", "nlmefit.simulation",
                         "nlmefit.benchmark", "nlmefit.cli"),
    "nlmefit.posteriors": ("nlmefit.estimators", "nlmefit.results", "nlmefit.diagnostics", "nlmefit.simulation",
                           "nlmefit.benchmark", "nlmefit.cli", "nlmefit.marginal"),
    "nlmefit.models": ("nlmefit.estimators", "nlmefit.results", "nlmefit.diagnostics", "nlmefit.simulation",
                       "nlmefit.benchmark", "nlmefit.cli"),
    "nlmefit.pk": ("nlmefit.models", "nlmefit.estimators"),
}
HEAVY = {"matplotlib", "pyro"}          # third-party modules whose function-local imports need a reason too
LAZY_EXEMPT = {"nlmefit.cli"}           # a CLI imports lazily for start-up time
DIRECTIVES = ("noqa", "type:", "pragma", "fmt:", "pylint:")   # tool directives are not reasons


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}


@dataclass(frozen=True)
class Imp:
    source: str          # importing module
    target: str          # imported module (a key of MODULES)
    lineno: int
    end_lineno: int
    local: bool          # inside a function body
    type_only: bool      # under ``if TYPE_CHECKING:`` (no runtime effect)

    @property
    def where(self) -> str:
        return f"{MODULES[self.source].relative_to(ROOT)}:{self.lineno}"


def _resolve(source: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of the package that ``node`` (in module ``source``) imports or takes names from."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:                                      # relative: anchor on the importing module's package
        pkg = source if source in PACKAGES else source.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = f"{pkg}.{node.module}" if node.module else pkg
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:
            out.append(sub)                             # ``from pkg import submodule``
        elif base in MODULES:
            out.append(base)                            # ``from module import name``
        else:
            raise AssertionError(f"{source}: cannot resolve 'from {base} import {a.name}' (line {node.lineno})")
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(tree: ast.AST):
    """(node, local, type_only) for every import statement, local meaning inside a function (or lambda)."""
    def visit(node, local, type_only):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, local, type_only
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(child, True, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), local, True)
                for stmt in child.orelse:
                    yield from visit(ast.Module(body=[stmt], type_ignores=[]), local, type_only)
            else:
                yield from visit(child, local, type_only)
    yield from visit(tree, False, False)


def _parse():
    imports: list[Imp] = []
    raw: dict[str, list[tuple[ast.Import | ast.ImportFrom, bool]]] = {}   # every import node, for rule (c)
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        raw[name] = []
        for node, local, type_only in _walk_imports(tree):
            raw[name].append((node, local))
            for target in _resolve(name, node):
                if target != name:
                    imports.append(Imp(name, target, node.lineno, node.end_lineno or node.lineno, local, type_only))
    return imports, raw


IMPORTS, RAW = _parse()


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _graph(*, local: bool) -> dict[str, list[Imp]]:
    g: dict[str, list[Imp]] = {m: [] for m in MODULES}
    for imp in IMPORTS:
        if imp.type_only or (imp.local and not local):
            continue
        g[imp.source].append(imp)
    return g


def _path_to(graph: dict[str, list[Imp]], start: str, bad) -> list[Imp] | None:
    """Breadth-first: the shortest chain of imports from ``start`` to a module for which ``bad`` holds."""
    prev: dict[str, Imp | None] = {start: None}
    queue = [start]
    while queue:
        m = queue.pop(0)
        for imp in graph[m]:
            if imp.target in prev:
                continue
            prev[imp.target] = imp
            if bad(imp.target):
                chain, t = [], imp.target
                while prev[t] is not None:
                    chain.append(prev[t])
                    t = prev[t].source
                return chain[::-1]
            queue.append(imp.target)
    return None


def _describe(chain: list[Imp]) -> str:
    return "  →  ".join(f"{i.target} ({i.where}{', function-local' if i.local else ''})" for i in chain)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layering(layer):
    graph = _graph(local=True)
    forbidden = FORBIDDEN[layer]
    bad = [
        f"{m} reaches {chain[-1].target}: {m}  →  {_describe(chain)}"
        for m in sorted(MODULES) if _in(m, layer)
        if (chain := _path_to(graph, m, lambda t: any(_in(t, f) for f in forbidden)))
    ]
    assert not bad, f"{layer} must not import {', '.join(forbidden)}:\n" + "\n".join(bad)


def _sccs(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
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
                    out.append(sorted(comp))
    return out


def test_no_module_level_cycles():
    graph = _graph(local=False)
    simple = {m: {i.target for i in imps} for m, imps in graph.items()}
    msgs = []
    for comp in _sccs(simple):
        if len(comp) < 2:
            continue
        members = set(comp)
        sub = {m: [i for i in graph[m] if i.target in members] for m in comp}
        start = comp[0]
        # one concrete cycle through ``start``: the shortest chain of imports from start back to start
        prev: dict[str, Imp | None] = {}
        queue, found = [start], None
        while queue and found is None:
            m = queue.pop(0)
            for imp in sub[m]:
                if imp.target == start:
                    found = imp
                    break
                if imp.target not in prev:
                    prev[imp.target] = imp
                    queue.append(imp.target)
        chain = [found]
        while chain[0].source != start:
            chain.insert(0, prev[chain[0].source])
        msgs.append(f"cycle among {', '.join(comp)}:\n    {start}  →  {_describe(chain)}")
    assert not msgs, "module-level import cycles:\n" + "\n".join(msgs)


def _comments(path: Path) -> dict[int, str]:
    """Line number → the text of the comment on that line (real comments only, via tokenize)."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for tok in tokenize.generate_tokens(io.StringIO(fh.read()).readline):
            if tok.type == tokenize.COMMENT:
                out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _is_reason(comment: str | None) -> bool:
    if not comment:
        return False
    text = comment
    for d in DIRECTIVES:             # "noqa: F401  (reason)" still counts through the reason in brackets
        if text.lower().startswith(d):
            text = text.split("(", 1)[1] if "(" in text else ""
    return bool(text.strip())


def _needs_reason(module: str, node: ast.Import | ast.ImportFrom) -> bool:
    if _resolve(module, node) or (isinstance(node, ast.ImportFrom) and node.level):
        return True
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return any(n.split(".")[0] in HEAVY | {PACKAGE} for n in names)


def test_function_local_imports_say_why():
    missing = []
    for module, nodes in RAW.items():
        if module in LAZY_EXEMPT:
            continue
        path = MODULES[module]
        lines = path.read_text(encoding="utf-8").splitlines()
        comments = _comments(path)
        local = [n for n, is_local in nodes if is_local]
        explained: set[int] = set()
        for node in sorted(local, key=lambda n: n.lineno):
            first, last = node.lineno, node.end_lineno or node.lineno
            own = any(_is_reason(comments.get(i)) for i in range(first, last + 1))
            above = first - 1
            above_is_comment = (above >= 1 and lines[above - 1].lstrip().startswith("#")
                                and _is_reason(comments.get(above)))
            # a comment above a run of consecutive function-local imports covers the run
            in_run = any((n.end_lineno or n.lineno) == above and n.lineno in explained for n in local)
            if own or above_is_comment or in_run:
                explained.add(first)
            elif _needs_reason(module, node):
                missing.append(f"{path.relative_to(ROOT)}:{first}: {lines[first - 1].strip()}")
    assert not missing, (
        "function-local imports must say why they are local (a comment on the line or the line above, e.g. "
        "'# avoids the cycle X -> Y' or '# matplotlib is imported only when plotting'):\n" + "\n".join(missing)
    )


def test_graph_is_read():
    """The parser sees the package: known edges are present (guards against a silently empty graph)."""
    edges = {(i.source, i.target) for i in IMPORTS}
    assert ("nlmefit", "nlmefit.models") in edges
    assert ("nlmefit.models", "nlmefit.models.model") in edges
    assert len(MODULES) > 50
