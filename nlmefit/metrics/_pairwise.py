"""Sums of a function of pairwise squared distances, in row blocks so memory stays bounded (private)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["pairwise_sum", "BLOCK_ELEMENTS"]

#: entries of one block of the distance matrix (2**22 float64 = 32 MiB)
BLOCK_ELEMENTS = 2 ** 22


def pairwise_sum(a: np.ndarray, b: np.ndarray | None, fn: Callable[[np.ndarray], np.ndarray]) -> float:
    """Σ_{i,j} fn(‖a_i − b_j‖²) over all pairs; with ``b=None`` the pairs of ``a`` with itself, i ≠ j.

    ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b (clipped at 0) in blocks of rows of ``a`` of at most ``BLOCK_ELEMENTS``
    entries. Centre the data first (the metrics use the pooled mean): the expansion then loses less precision.
    """
    same = b is None
    b = a if same else b
    n_a, n_b = a.shape[0], b.shape[0]
    a2, b2 = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    rows = max(1, BLOCK_ELEMENTS // max(n_b, 1))
    total = 0.0
    for s in range(0, n_a, rows):
        e = min(s + rows, n_a)
        sq = a2[s:e, None] + b2[None, :] - 2.0 * (a[s:e] @ b.T)
        np.maximum(sq, 0.0, out=sq)
        val = fn(sq)
        if same:
            idx = np.arange(s, e)
            val[idx - s, idx] = 0.0
        total += float(val.sum())
    return total
