"""Griffe extension for the API reference: Sphinx cross-reference roles in docstrings become code spans.

nlmefit's docstrings are short prose with reStructuredText literals (````x````, which Markdown also reads as code)
and roles such as ``:class:`~nlmefit.panel.Panel```. Markdown has no roles, so this rewrites
``:role:`~a.b.C``` to ```C``` and ``:role:`a.b.C``` to ```a.b.C``` before mkdocstrings renders the docstring.
"""
from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`<]+?)(?:\s*<([^`>]+)>)?`")


def _replace(m: re.Match) -> str:
    tilde, text, target = m.group(1), m.group(2).strip(), m.group(3)
    if target:  # :role:`title <target>`
        return f"`{text}`"
    return f"`{text.rsplit('.', 1)[-1]}`" if tilde else f"`{text}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles to Markdown code spans in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(_replace, obj.docstring.value)
