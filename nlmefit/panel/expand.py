"""Vectorised event processing: record order and sequence keys, reset epochs, LOCF, ADDL/II dose expansion.

Everything works on flat per-record arrays with a subject code; no Python loop over subjects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ADDL_SEQ_OFFSET", "Ordered", "order_records", "epochs", "locf", "Expanded", "expand_addl",
           "within_group_position"]

#: Sequence key offset of ADDL-implied doses: they sort after every record at the same time.
ADDL_SEQ_OFFSET = 1 << 40


@dataclass
class Ordered:
    order: np.ndarray  # positions into the user's rows, in processing order (subject blocks, time order)
    subj: np.ndarray  # subject code per ordered record
    seq: np.ndarray  # position within the subject
    start: np.ndarray  # [S] first ordered position of each subject
    count: np.ndarray  # [S] number of records per subject


def within_group_position(group: np.ndarray) -> np.ndarray:
    """0-based position of each element within its run of equal (sorted) group codes (groupby-cumcount)."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = group[1:] != group[:-1]
    starts = np.flatnonzero(new)
    run = np.cumsum(new) - 1
    return np.arange(n, dtype=np.int64) - starts[run]


def order_records(subj: np.ndarray, time: np.ndarray, n_subjects: int, sort: bool) -> Ordered:
    """Processing order: user order (already subject-contiguous and time-ordered), or a stable sort by subject
    code then TIME when ``sort`` is set."""
    if sort:
        order = np.argsort(time, kind="stable")
        order = order[np.argsort(subj[order], kind="stable")]
    else:
        order = np.arange(len(subj))
    s = subj[order]
    count = np.bincount(s, minlength=n_subjects).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    seq = np.arange(len(s), dtype=np.int64) - start[s]
    return Ordered(order=order, subj=s, seq=seq, start=start, count=count)


def epochs(reset: np.ndarray, subj: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Reset epoch per ordered record: counts resets within the subject, the resetting record included."""
    c = np.cumsum(reset.astype(np.int64))
    first = start[subj]
    return c - (c[first] - reset[first].astype(np.int64))


def locf(values: np.ndarray, subj: np.ndarray) -> np.ndarray:
    """Last observation carried forward within each subject, then the first value carried backward
    (``values`` [n] or [n, K] in subject-contiguous order; NaN = missing)."""
    v = values.reshape(len(values), -1).copy()
    n = len(v)
    if n == 0:
        return values.copy()
    new = np.ones(n, dtype=bool)
    new[1:] = subj[1:] != subj[:-1]
    idx = np.arange(n)
    for k in range(v.shape[1]):
        col = v[:, k]
        ok = ~np.isnan(col)
        # forward: index of the last non-missing at or before, within the subject
        src = np.where(ok | new, idx, 0)
        src = np.maximum.accumulate(src)
        fwd = col[src]
        # backward fill what is still missing (leading gap): next non-missing within subject
        ok2 = ~np.isnan(fwd)
        last = np.ones(n, dtype=bool)
        last[:-1] = subj[:-1] != subj[1:]
        src2 = np.where(ok2 | last, idx, n - 1)
        src2 = np.minimum.accumulate(src2[::-1])[::-1]
        v[:, k] = fwd[src2]
    return v.reshape(values.shape)


@dataclass
class Expanded:
    parent: np.ndarray  # ordered position of the parent dose record
    time: np.ndarray
    last_record: np.ndarray  # ordered position of the last record at or before this dose's time
    merged_pos: np.ndarray  # position in the merged (records + implied doses) order


def expand_addl(addl: np.ndarray, ii: np.ndarray, time: np.ndarray, subj: np.ndarray) -> Expanded:
    """ADDL-implied doses of ordered records: ``addl[p]`` doses at ``time[p] + k*ii[p]``, k = 1..addl[p].

    Each implied dose is placed after every record with the same or an earlier time (NONMEM convention);
    ``last_record`` is the record whose state (covariates, occasion, epoch) applies at the implied dose.
    """
    n = len(time)
    tot = int(addl.sum())
    if tot == 0:
        e = np.zeros(0, dtype=np.int64)
        return Expanded(parent=e, time=np.zeros(0), last_record=e, merged_pos=e)
    parent = np.repeat(np.arange(n, dtype=np.int64), addl)
    k = within_group_position(parent) + 1
    t = time[parent] + k * ii[parent]
    all_time = np.concatenate([time, t])
    all_subj = np.concatenate([subj, subj[parent]])
    kind = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(tot, dtype=np.int64)])
    pos = np.arange(n + tot, dtype=np.int64)
    merged = np.lexsort((pos, kind, all_time, all_subj))
    marker = np.where(kind[merged] == 0, pos[merged], -1)
    last = np.maximum.accumulate(marker)
    inv = np.empty(n + tot, dtype=np.int64)
    inv[merged] = np.arange(n + tot)
    mp = inv[n:]
    return Expanded(parent=parent, time=t, last_record=last[mp], merged_pos=mp)
