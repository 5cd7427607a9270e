"""Atomic file writes: every file nlmefit writes goes through a temporary file in the same folder and a rename,
so a reader never sees a half-written file and an interrupted run leaves the old file (or none)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import pandas as pd

__all__ = ["atomic_write", "atomic_csv"]


def atomic_write(path: str | os.PathLike, write: Callable, binary: bool = False) -> None:
    """``write(fh)`` into a temporary file beside ``path``, then rename it to ``path`` (umask file mode)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """``frame.to_csv(path, index=False)``, atomically."""
    atomic_write(path, lambda fh: frame.to_csv(fh, index=False))
