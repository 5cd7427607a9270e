"""How many CPU threads a fit uses: a small policy and a context manager that applies it.

torch's default is one intra-op thread per core. The tensors of a typical population-PK fit are small (tens of
subjects × tens of observations), so the work per parallel region is tiny and the threads mostly wait for each
other; on a machine whose cores are busy with other processes they wait for the scheduler as well, and a fit
can run many times slower than on one thread (a theophylline FOCE-I fit: ~40× on a busy 2-core machine; see
``python -m nlmefit.benchmark.threads``). So:

* :func:`thread_policy` chooses 1 thread for small problems and torch's default for large ones;
* :func:`limit_threads` sets ``torch.set_num_threads`` for a block and restores the previous value;
* estimators take ``threads=None`` (the policy), an int, or ``"default"`` (leave torch's setting alone).

OpenMP worker threads spin while they wait unless ``OMP_WAIT_POLICY=PASSIVE``; that variable must be set before
torch initialises OpenMP, i.e. before ``import torch`` — :func:`set_passive_wait_policy` does it (only when the
user has not chosen a policy); ``nlmefit/__init__.py`` does the same before it imports torch, which only helps
when nlmefit is imported before torch.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from nlmefit.errors import ModelSpecError

__all__ = ["thread_policy", "limit_threads", "resolve_threads", "set_passive_wait_policy", "check_threads",
           "SMALL_PROBLEM_OBS"]

#: problems with at most this many observations (and subjects × observations) run on one thread by default
SMALL_PROBLEM_OBS = 20_000


def set_passive_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user has set a policy (must run before torch is imported)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def thread_policy(n_subjects: int, n_obs: int) -> int | None:
    """Threads for a problem of ``n_subjects`` subjects and ``n_obs`` observations: 1 for small problems (the
    per-operation work is too small for threads to pay off), None (torch's default) for large ones."""
    if n_obs <= SMALL_PROBLEM_OBS and n_subjects <= SMALL_PROBLEM_OBS // 10:
        return 1
    return None


def resolve_threads(threads: int | str | None, n_subjects: int, n_obs: int) -> int | None:
    """The thread count an estimator option means: None → :func:`thread_policy`, ``"default"`` → None (torch's
    own setting), a positive int → itself."""
    if threads is None:
        return thread_policy(n_subjects, n_obs)
    if threads == "default":
        return None
    return int(check_threads(threads))


def check_threads(threads: int | str | None) -> int | str | None:
    """Validate an estimator's ``threads`` option (raises :class:`~nlmefit.errors.ModelSpecError`)."""
    if threads is None or threads == "default" or (isinstance(threads, int) and not isinstance(threads, bool)
                                                   and threads >= 1):
        return threads
    raise ModelSpecError(f"threads must be a positive integer, None (automatic) or 'default', got {threads!r}")


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(n)`` and restore the previous count afterwards (also on an
    exception). ``n=None`` leaves the setting alone. Yields the number of threads in effect."""
    # torch is imported here, not at module level, so that set_passive_wait_policy can run before torch loads
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield before
        return
    torch.set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        torch.set_num_threads(before)
