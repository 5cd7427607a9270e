"""The documentation site (mkdocs.yml) without building it: every public name has a docstring, and every page is
in the navigation.

(a) For every name in ``nlmefit.__all__`` and in the ``__all__`` of every module the API reference renders
(the ``::: target`` lines of docs/api/*.md), classes and functions carry a docstring of their own (not an
inherited one, not the signature a dataclass makes up) — mkdocstrings renders exactly that docstring.
(b) Every docs/**/*.md page is in the ``nav`` of mkdocs.yml and every nav entry exists (the notebooks in
``notebooks/``, which docs/hooks/site.py publishes as ``notebooks/*.ipynb``, are in it too).

No mkdocs needed: the nav is read with a regular expression and the objects are imported.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import nlmefit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"


def _api_targets() -> list[str]:
    """The ``::: dotted.path`` targets of the API reference pages, in page order."""
    out = []
    for page in sorted((DOCS / "api").glob("*.md")):
        out += re.findall(r"^:::\s*([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.M)
    return out


def _resolve(target: str):
    """Import ``target`` (a module, or an object inside one). A missing optional dependency of an nlmefit module
    skips it; a missing nlmefit module fails."""
    parts = target.split(".")
    for k in range(len(parts), 0, -1):
        name = ".".join(parts[:k])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("nlmefit"):
                pytest.skip(f"{name} needs the optional dependency {e.name}")
            if e.name != name:
                raise
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(target)


def _own_doc(obj) -> str | None:
    """The docstring mkdocstrings shows for ``obj``: a class's own (not inherited, not dataclass-generated)."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")
        if doc and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
            return None  # dataclasses write "Name(field: type, ...)" when there is none
        return doc
    return getattr(obj, "__doc__", None)


def _undocumented(owner: str, module) -> list[str]:
    missing = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            doc = obj.__doc__
        elif inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
            doc = _own_doc(obj)
        else:
            continue  # data and constants: documented where they are defined, if at all
        if not (doc or "").strip():
            missing.append(f"{owner}.{name}")
    return missing


def test_api_pages_exist():
    targets = _api_targets()
    assert "nlmefit" in targets and len(targets) > 10


@pytest.mark.parametrize("target", ["nlmefit"] + [t for t in _api_targets() if t != "nlmefit"])
def test_public_names_have_docstrings(target):
    obj = _resolve(target)
    if inspect.ismodule(obj):
        assert (obj.__doc__ or "").strip(), f"module {target} has no docstring"
        missing = _undocumented(target, obj)
        assert not missing, f"public names without a docstring: {missing}"
    else:
        assert (_own_doc(obj) or "").strip(), f"{target} has no docstring"


@pytest.mark.parametrize("target", ["nlmefit"] + [t for t in _api_targets() if t != "nlmefit"])
def test_names_shadowing_a_submodule_have_their_own_directive(target):
    """``from pkg.npde import npde`` in ``pkg/__init__.py``: the API generator (griffe, static) takes ``pkg.npde`` for
    the module and leaves the function out of ``::: pkg`` (and out of ``::: nlmefit`` when that re-exports
    ``pkg.npde``), so a page needs ``::: pkg.npde.npde`` as well."""
    module = _resolve(target)
    if not inspect.ismodule(module) or not hasattr(module, "__path__"):
        return
    targets = set(_api_targets())
    missing = []
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if inspect.ismodule(obj) or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if obj.__module__.rsplit(".", 1)[-1] != name:
            continue  # defined in a module of another name: griffe follows the import to the object
        path = f"{obj.__module__}.{obj.__qualname__}"
        if path not in targets:
            missing.append(f"{target}.{name}: add '::: {path}' to a page in docs/api/")
    assert not missing, missing


def test_top_level_all_is_complete():
    """Every name of nlmefit.__all__ exists (a stale entry would break the top-level API page)."""
    assert [n for n in nlmefit.__all__ if not hasattr(nlmefit, n)] == []


def _nav_paths() -> list[str]:
    text = MKDOCS.read_text(encoding="utf-8")
    m = re.search(r"^nav:\s*\n((?:[ \t]+.*\n?|\s*\n)*)", text, flags=re.M)
    assert m, "mkdocs.yml has no nav"
    paths = []
    for line in m.group(1).splitlines():
        line = line.split(" #", 1)[0].strip()
        entry = re.match(r"-\s*(?:[^:]+:\s*)?(\S+\.(?:md|ipynb))$", line)
        if entry:
            paths.append(entry.group(1))
    return paths


def test_every_page_in_nav_and_every_nav_entry_exists():
    nav = _nav_paths()
    assert len(nav) == len(set(nav)), "a page is in the nav twice"
    excluded = {"hooks"}  # build helpers (exclude_docs in mkdocs.yml)
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in excluded}
    notebooks = {f"notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert sorted(pages - set(nav)) == [], "pages missing from the nav of mkdocs.yml"
    assert sorted(notebooks - set(nav)) == [], "notebooks missing from the nav of mkdocs.yml"
    assert sorted(set(nav) - pages - notebooks) == [], "nav entries without a file"
    assert nav[0] == "index.md"
