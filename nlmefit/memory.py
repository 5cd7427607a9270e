"""Bounded memory: per-subject work in chunks whose size follows a memory budget.

Every estimator's objective, and every per-subject quantity of a result (modes, −2LL terms, predictions and
residuals, the Laplace posterior, the OFV gradient), is a sum or a stack over independent subjects, so it can be
evaluated ``chunk`` subjects at a time with gradients accumulated across chunks: the number of subjects is then
limited by time, not by memory.

* **Budget.** ``max_memory`` (bytes, or text such as ``"2GB"``, ``"512MB"``); the default is a sixteenth of the
  machine's physical memory per local rank (``LOCAL_WORLD_SIZE``), between 256 MB and 2 GB.
* **Cost model.** One FOCE-I evaluation with its backward pass holds about 128·J·D·(q+1)² bytes per subject
  (J observation slots, D dose slots, q random effects): measured 19.4 kB per subject for the 1-cmt oral
  benchmark population (J = 10, D = 1, q = 3; 100 000 subjects in one chunk peaked 1.94 GB above the data), the
  formula gives 20.5 kB. ODE models cost more per subject; the budget is an estimate, not a hard cap.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

import torch

__all__ = ["parse_memory", "default_budget", "bytes_per_subject", "subjects_per_chunk", "subject_slices",
           "map_subjects"]

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_memory(value: int | float | str | None) -> int | None:
    """Bytes from a number or text such as ``"2GB"``, ``"512 MiB"`` (None stays None); ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not value > 0:
            raise ValueError(f"max_memory must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS or not float(m.group(1)) > 0:
        raise ValueError(f"max_memory must be a positive size such as 2GB, 512MB or a number of bytes, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume 8 GB
        return 8 * 2 ** 30


def default_budget() -> int:
    """A sixteenth of physical memory per local rank, between 256 MB and 2 GB."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    return int(min(2 * 2 ** 30, max(256 * 2 ** 20, _physical_memory() / 16 / local)))


def bytes_per_subject(data) -> int:
    """The cost model's bytes per subject for ``data`` (an ObservationData; see the module docstring)."""
    j = max(1, int(data.y.shape[-1]))
    events = getattr(data, "events", None)
    d = max(1, int(events.dose_time.shape[-1])) if events is not None else 1
    q = int(getattr(data, "q", 1) or 1)
    return 128 * j * d * (q + 1) ** 2


def subjects_per_chunk(data, max_memory: int | float | str | None = None) -> int:
    """Subjects per chunk so that one chunk's evaluation stays within ``max_memory`` (default
    :func:`default_budget`); at least 1, at most all of them."""
    budget = parse_memory(max_memory) or default_budget()
    return int(max(1, min(data.n_subjects, budget // bytes_per_subject(data))))


def subject_slices(n: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` subjects covering ``n`` (one slice when ``size`` is None)."""
    size = int(size) if size else max(1, n)
    return [slice(s, min(s + size, n)) for s in range(0, max(n, 1), size)] if n else [slice(0, 0)]


def map_subjects(fn: Callable[..., Sequence[torch.Tensor]], data, eta: torch.Tensor, size: int | None,
                 shard=None) -> list[torch.Tensor]:
    """``fn(data_chunk, eta_chunk)`` → tensors whose first axis is the subject, evaluated ``size`` subjects at
    a time and concatenated for all subjects. Under ranks (``shard``, :mod:`nlmefit.parallel`) each rank
    evaluates its own subjects and the results are gathered, so every rank returns the same tensors."""
    rows = None if shard is None else shard.rows(data)
    local = data if rows is None else data.index(rows)
    leta = eta if rows is None else eta[rows]
    if local.n_subjects == 0:  # a rank without subjects: empty results of the right shape for the gathering
        parts = [[x.detach()[:0] for x in fn(data.index(slice(0, 1)), eta[:1])]]
    else:
        slices = subject_slices(local.n_subjects, size)
        parts = [[x.detach() for x in (fn(local, leta) if len(slices) == 1 else fn(local.index(sl), leta[sl]))]
                 for sl in slices]  # a loop over memory-sized chunks, not over subjects
    out = [torch.cat(xs, 0) if len(xs) > 1 else xs[0] for xs in zip(*parts)]
    if shard is None:
        return out
    return [shard.gather_rows(x, rows, data.n_subjects) for x in out]
