"""Atomic file writes: every file nlmefit writes goes through a temporary file in the same folder and a rename,
so a reader never sees a half-written file and an interrupted run leaves the old file (or none)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

__all__ = ["atomic_write", "atomic_csv", "sharded_csv"]


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


def sharded_csv(frame: pd.DataFrame, path: str | os.PathLike, shard=None) -> None:
    """:func:`atomic_csv` with the text formatting split over the ranks of ``shard`` (a
    :class:`nlmefit.parallel.Shard`; None: one process): rank r formats its share of the rows into a hidden file
    beside ``path``; after a barrier rank 0 alone concatenates the shares into a temporary file and renames it to
    ``path`` (the same bytes as one process writes), then removes them. A collective: every rank calls it with
    the same frame. Formatting floats is the cost of a large CSV (~9 µs per row of twelve numbers)."""
    if shard is None:
        atomic_csv(frame, path)
        return
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, len(frame), shard.world + 1).astype(np.int64)
    parts = [os.path.join(folder, f".{os.path.basename(path)}.part{r}") for r in range(shard.world)]
    ok = 1.0
    try:
        frame.iloc[bounds[shard.rank]:bounds[shard.rank + 1]].to_csv(parts[shard.rank], index=False,
                                                                     header=shard.rank == 0)
    except OSError:
        ok = 0.0
    written = float(shard.allreduce_sum(torch.tensor([ok], dtype=torch.float64))[0])  # also the barrier
    if shard.rank != 0:
        return
    try:
        if written < shard.world:
            raise OSError(f"{path}: {shard.world - int(written)} rank(s) could not write their share")

        def concat(fh) -> None:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, fh, 1 << 22)

        atomic_write(path, concat, binary=True)
    finally:
        for part in parts:
            with contextlib.suppress(OSError):
                os.unlink(part)
