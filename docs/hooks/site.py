"""mkdocs hooks for the documentation site (mkdocs.yml ``hooks:``).

* ``on_files``: publish the committed notebooks in ``notebooks/`` as pages under ``notebooks/``. They live at the
  repository root, outside ``docs/``; this adds them to the build as if they were ``docs/notebooks/*.ipynb`` (no
  copy, no symlink). It runs before mkdocs-jupyter's ``on_files`` (priority 100), which then renders them without
  executing them (``execute: false``).
* ``on_page_markdown``: in table rows, ``\\|`` inside a code span becomes ``|``. GitHub needs the backslash to keep
  a pipe in a code span from splitting the cell; Python-Markdown does not split there and would print the
  backslash.
"""
from __future__ import annotations

import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
_CODE_SPAN = re.compile(r"`[^`\n]*`")


@event_priority(100)
def on_files(files: Files, config) -> Files:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        files.append(File(f"notebooks/{path.name}", src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def _unescape_pipes(line: str) -> str:
    if not line.lstrip().startswith("|") or "\\|" not in line:
        return line
    return _CODE_SPAN.sub(lambda m: m.group(0).replace("\\|", "|"), line)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return "\n".join(_unescape_pipes(line) for line in markdown.split("\n"))
