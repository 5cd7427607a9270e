"""The one notebook layout (``_repr_html_``) of nlmefit's objects: a bold title, a few lines, a few tables.

A leaf module (pandas and the standard library only), so every layer — the panel included — can use it.
"""
from __future__ import annotations

import html
from collections.abc import Iterable

import pandas as pd

__all__ = ["object_html"]


def object_html(title: str, lines: Iterable[str] = (), tables: Iterable[tuple[str, pd.DataFrame]] = (),
                max_rows: int = 20) -> str:
    """``<div>``: the escaped ``title`` in bold, the escaped ``lines``, then each (caption, DataFrame) table with
    at most ``max_rows`` rows (the count of the rest said)."""
    parts = [f"<b>{html.escape(title)}</b>"] + [html.escape(str(x)) for x in lines]
    out = "<div>" + "<br>".join(parts)
    for caption, frame in tables:
        shown = frame.head(max_rows)
        more = len(frame) - len(shown)
        out += f"<br><i>{html.escape(caption)}</i>" + shown.to_html(float_format=lambda v: f"{v:.4g}", na_rep="",
                                                                     border=0)
        if more > 0:
            out += f"<i>… {more} more rows</i>"
    return out + "</div>"
