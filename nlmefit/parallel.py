"""Data-parallel estimation on ``torch.distributed``: subjects sharded over ranks, totals all-reduced.

The population objective is a sum over independent subjects, so it shards exactly: rank r evaluates the −2 log L
of its own subjects (their modes, their gradient contributions) and one ``all_reduce`` (SUM) of the vector
(value, ∂/∂u) gives every rank the same total. Every rank then runs the same deterministic outer optimiser
(L-BFGS-B) on the same reduced numbers, so all ranks hold the same θ at every step; no parameter is broadcast.
A rank whose local evaluation fails contributes +∞ (the optimiser backs off on every rank alike) and never skips
the collective, so a numerical failure cannot hang the others.

* **Who is a rank.** :func:`init_from_env` joins the process group that ``torchrun`` (or
  :func:`launch_local`) describes in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``):
  gloo on CPU, NCCL when the ranks use CUDA. Collectives time out after ``timeout`` seconds (default 60), so a rank
  that dies ends the others with an error instead of a hang.
* **Balance.** :func:`balanced_assignment` splits subjects by observation count (longest-processing-time
  greedy), not by subject count: a rank's cost is its observations.
* **Launch.** ``nlmefit fit ... --workers K`` (:func:`launch_local`) starts K local ranks itself (gloo on the
  loopback interface, one thread each unless ``OMP_NUM_THREADS`` says otherwise), watches them, and stops all of
  them with a message naming the rank as soon as one fails. ``torchrun --nproc-per-node K -m nlmefit fit ...``
  does the same through torch's own launcher, across machines with its rendezvous (docs/scaling.md).
* **Who writes.** Only rank 0 prints and writes result files (atomically); the other ranks return after the fit.
* **Random numbers by subject.** Sharded stochastic work (SAEM's E-step, importance sampling) draws each
  block of random numbers for *all* subjects from the same seeded generator on every rank and keeps its own rows
  (:meth:`Shard.gather_rows` puts per-subject results back together), so a subject's draws do not depend on the
  number of ranks: a seeded run gives the same estimates on 1, 2 or K ranks. Drawing costs O(N) numbers per
  rank, negligible beside the O(N_rank·J) model evaluations it feeds.

Estimators that use it: FO, FOCE, FOCE-I, Laplace and AGQ (:class:`~nlmefit.estimators.classical.
ClassicalEstimator`), SAEM (its sufficient statistics, gradients and information matrices are sums over
subjects, all-reduced each iteration) and the marginal likelihood by IS or AGQ
(:func:`nlmefit.marginal.marginal_loglik`, a collective: every rank calls it with the same arguments).
The final modes are found per rank and all-reduced; the covariance step, predictions and
residuals are computed on every rank over all subjects (each rank holds the whole data set), so the result is the
same object everywhere.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from nlmefit.errors import EstimationError

__all__ = ["Shard", "current", "init_from_env", "leave", "balanced_assignment", "launch_local", "DEFAULT_TIMEOUT_S"]

#: seconds a collective waits for the other ranks before it fails (a dead rank ends the run, never hangs it)
DEFAULT_TIMEOUT_S = 60.0


def balanced_assignment(n_obs: np.ndarray, world: int) -> list[np.ndarray]:
    """Subject positions per rank, balanced by observation count (LPT greedy: the largest subject first, to the
    least-loaded rank; ties by position, so every rank computes the same split). Each list is sorted."""
    n_obs = np.asarray(n_obs, dtype=np.int64)
    order = np.lexsort((np.arange(len(n_obs)), -n_obs))
    load = np.zeros(world, dtype=np.int64)
    owner = np.empty(len(n_obs), dtype=np.int64)
    for i in order:
        r = int(np.argmin(load))
        owner[i] = r
        load[r] += max(int(n_obs[i]), 1)
    return [np.flatnonzero(owner == r) for r in range(world)]


@dataclass(frozen=True)
class Shard:
    """This process's place in the process group: ``rank`` of ``world``."""

    rank: int
    world: int

    def subjects(self, data) -> np.ndarray:
        """Positions of this rank's subjects in ``data`` (an ObservationData), balanced by observation count."""
        n_obs = data.mask.sum(1).detach().cpu().numpy()
        return balanced_assignment(n_obs, self.world)[self.rank]

    def rows(self, data) -> torch.Tensor:
        """:meth:`subjects` as an index tensor on ``data``'s device."""
        return torch.as_tensor(self.subjects(data), dtype=torch.long, device=data.y.device)

    def gather_rows(self, local: torch.Tensor, rows: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
        """The tensor of all ``n`` subjects on every rank, from this rank's ``local`` values at positions ``rows``
        along ``dim``: each row is filled on exactly one rank (zeros elsewhere), so the sum is the whole."""
        shape = list(local.shape)
        shape[dim] = n
        full = local.new_zeros(shape)
        full.index_copy_(dim, rows, local.detach())
        return self.allreduce_sum(full)

    def allreduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``x`` over the ranks (a new tensor; same on every rank)."""
        y = x.detach().clone()
        try:
            dist.all_reduce(y, op=dist.ReduceOp.SUM)
        except RuntimeError as exc:  # a peer died or timed out: end this rank with a message, not a traceback
            raise EstimationError(f"rank {self.rank}: lost contact with the other ranks ({exc}); the run is "
                                  "stopped and no result was written") from exc
        return y


def current() -> Shard | None:
    """The process group this process belongs to, or None in a single process (or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return Shard(dist.get_rank(), world) if world > 1 else None


def init_from_env(timeout: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> Shard | None:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (torchrun,
    :func:`launch_local`); None when ``WORLD_SIZE`` is absent or 1. gloo unless ``device`` is CUDA (NCCL)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device is not None and str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout)))
    return current()


def leave() -> None:
    """Leave the process group, if this process is in one. Every rank calls it before it exits: a gloo rank that
    exits while still in the group can abort the process (seen in about 1 of 20 runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(argv: list[str], workers: int, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """Run ``python -m nlmefit *argv`` as ``workers`` local ranks (gloo over 127.0.0.1); their exit code.

    Rank 0's output goes to this process's stdout; the others' stdout is discarded (they write nothing) and their
    stderr passes through. When a rank exits with an error the others are terminated at once and the message names
    the rank."""
    port = _free_port()
    base = dict(os.environ)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(workers),
                NLMEFIT_TIMEOUT_S=str(timeout))
    base.setdefault("OMP_NUM_THREADS", "1")
    procs = []
    for r in range(workers):
        env = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        out = None if r == 0 else subprocess.DEVNULL
        procs.append(subprocess.Popen([sys.executable, "-m", "nlmefit", *argv], env=env, stdout=out))
    failed: tuple[int, int] | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.05)
    except KeyboardInterrupt:
        failed = (-1, 130)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    rank, code = failed
    if rank >= 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"nlmefit: rank {rank} of {workers} {how}; stopped the other ranks", file=sys.stderr)
    return 1 if code < 0 else int(code)
