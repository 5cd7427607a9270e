"""K perturbed starts of the classical estimators, optimised in lockstep with one batched objective per step.

The starts are independent problems, so their objectives are one sum over K × N "virtual subjects": the data are
replicated K times and every replica carries its own copy of the population parameters (the models broadcast
over per-subject copies θ [K·N], Ω [K·N, q, q], as the covariance step already uses). One call of the
linearisation's ``modes`` and ``subject_m2ll`` on the replicated data gives all K objectives, and one backward
pass all K gradients (the starts do not interact, so ∂(Σ_k OFV_k)/∂u_k = ∂OFV_k/∂u_k).

Each start keeps its own L-BFGS-B (scipy, same options as a single fit). They run in threads that only wait:
each optimiser's objective call posts its point and blocks; the coordinating thread evaluates every pending point
in one batched call and hands the results back. Starts that have converged leave the batch. A batch whose
evaluation fails (a singular matrix in one start) is evaluated start by start, so one bad start cannot stop the
others.

Starts: start 0 is the given initial values; start k > 0 multiplies every free θ, σ and Ω variance by a factor
drawn uniformly from [1 − s, 1 + s] (s = ``spread``, default 0.5; Ω as D^½ Ω D^½, keeping its correlations;
bounded θ kept inside their bounds), seeded.

:func:`replica_minimize` runs the lockstep for replicas that may differ in their data as well as their start:
replica r is a list of subject positions (repeats allowed, sizes may differ). The multi-start fit uses it with K
copies of all subjects; the bootstrap with its resamples and the jackknife's leave-one-out sets
(:mod:`nlmefit.resampling`).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import numpy as np
import scipy.optimize
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.parameters import ParameterSet, Params

__all__ = ["perturbed_starts", "lockstep_minimize", "batched_params", "replica_params", "replica_minimize"]


def perturbed_starts(pset: ParameterSet, p0: Params, k: int, spread: float = 0.5, seed: int = 0) -> torch.Tensor:
    """[k, P] unconstrained starts: row 0 is ``p0``, the others ``p0`` with free θ, σ and Ω variances scaled by
    U(1 − spread, 1 + spread) factors (see the module docstring)."""
    if not 0.0 < spread < 1.0:
        raise ModelSpecError(f"start_spread must be in (0, 1), got {spread}")
    rng = np.random.default_rng(seed)
    rows = [pset.to_unconstrained(p0).detach()]
    for _ in range(k - 1):
        theta = {}
        for name, v in p0.theta.items():
            par = pset.theta[name]
            if par.fixed:
                theta[name] = v
                continue
            x = float(v) * rng.uniform(1 - spread, 1 + spread)
            lo, hi = par.lower, par.upper
            if math.isfinite(lo) and math.isfinite(hi):
                x = min(max(x, lo + 1e-3 * (hi - lo)), hi - 1e-3 * (hi - lo))
            elif math.isfinite(lo) and x <= lo:
                x = lo + abs(float(v) - lo) * (1 - spread)
            elif math.isfinite(hi) and x >= hi:
                x = hi - abs(hi - float(v)) * (1 - spread)
            theta[name] = torch.as_tensor(x, dtype=v.dtype, device=v.device)
        f = torch.as_tensor(rng.uniform(1 - spread, 1 + spread, p0.omega.shape[-1]), dtype=p0.omega.dtype,
                            device=p0.omega.device)
        free = torch.as_tensor([not _fixed_eta(pset, n) for n in pset.omega.names], device=p0.omega.device)
        f = torch.where(free, f, torch.ones_like(f)).sqrt()
        omega = f[:, None] * p0.omega * f[None, :]
        sigma = {n: (v if pset.sigma[n].fixed else v * rng.uniform(1 - spread, 1 + spread))
                 for n, v in p0.sigma.items()}
        p = Params(theta, omega, sigma, p0.omega_iov, dict(p0.weights))
        rows.append(pset.to_unconstrained(p).detach())
    return torch.stack(rows)


def _fixed_eta(pset: ParameterSet, name: str) -> bool:
    om = pset.omega
    for b, blk in enumerate(om.block_list):
        if name in blk:
            return bool(om._fixed_blocks[b])
    return False


def batched_params(pset: ParameterSet, U: torch.Tensor, n: int) -> Params:
    """Per-virtual-subject parameters for k starts ``U`` [k, P]: each start's values repeated for its n subjects
    (start-major), as per-subject copies [k·n] that the models broadcast over (``replica_params``, equal sizes)."""
    return replica_params(pset, U, n)


def replica_params(pset: ParameterSet, U: torch.Tensor, sizes: torch.Tensor) -> Params:
    """Per-virtual-subject parameters for R replicas of different sizes: row r of ``U`` [R, P] repeated
    ``sizes[r]`` times (replica-major), as per-subject copies [Σ sizes]. ``batched_params`` with equal sizes."""
    x = torch.stack([pset.to_natural_vector(pset.from_unconstrained(u)) for u in U])
    return pset.from_natural_vector(x.repeat_interleave(sizes, 0))


def replica_minimize(model, lin, data, idx: Sequence[np.ndarray], U0: np.ndarray, options: dict,
                     eta0: torch.Tensor | None = None,
                     on_batch: Callable[[list[int]], None] | None = None,
                     bounds: Sequence | None = None) -> list[scipy.optimize.OptimizeResult]:
    """Minimise R independent objectives in lockstep, replica r being the subjects ``idx[r]`` of ``data``
    (positions, repeats allowed: a repeated subject is a distinct subject of that replica) with its own
    parameters, started at ``U0[r]`` (unconstrained [R, P]).

    Replica r's objective is Σ_{i ∈ idx[r]} −2 log L_i(u_r) under ``lin`` (the estimators' objective, n·log 2π
    included); all pending replicas are evaluated by one call of ``lin.modes`` / ``lin.subject_m2ll`` on the
    concatenated subjects and one backward pass. ``eta0`` [Σ |idx[r]|, q] warm-starts the modes (replica-major);
    ``on_batch(replicas)`` is called after each batched evaluation. A batch whose evaluation fails is evaluated
    replica by replica; a replica whose objective is not finite gets 1e20 and a zero gradient (the line search
    backs off). ``bounds``: per replica, L-BFGS-B bounds on u or None (equal bounds pin a coordinate: the
    likelihood profile). Returns the R scipy results (``lockstep_minimize``)."""
    pset = model.parameters
    dev = data.y.device
    q = data.q
    sizes = np.array([len(i) for i in idx], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    flat = torch.as_tensor(np.concatenate([np.asarray(i, dtype=np.int64) for i in idx]), device=dev)
    eta = (torch.zeros(int(offsets[-1]), q, dtype=torch.float64, device=dev) if eta0 is None
           else eta0.detach().clone().to(device=dev, dtype=torch.float64))
    cache: dict[tuple[int, ...], tuple[torch.Tensor, object]] = {}

    def rows(reps: list[int]) -> tuple[torch.Tensor, object]:
        key = tuple(reps)
        if key not in cache:  # the pending set only shrinks: keep the latest
            cache.clear()
            sel = torch.cat([torch.arange(int(offsets[r]), int(offsets[r + 1]), device=dev) for r in reps])
            cache[key] = (sel, data.index(flat[sel]))
        return cache[key]

    def evaluate(reps: list[int], points: np.ndarray) -> list[tuple[float, np.ndarray]]:
        sel, d = rows(reps)
        sz = torch.as_tensor(sizes[reps], device=dev)
        owner = torch.repeat_interleave(torch.arange(len(reps), device=dev), sz)
        U = torch.tensor(points, dtype=torch.float64, device=dev, requires_grad=True)
        try:
            p = replica_params(pset, U, sz)
            e = lin.modes(model, p, d, eta[sel])
            m2i = lin.subject_m2ll(model, p, d, e)
            m2 = torch.zeros(len(reps), dtype=m2i.dtype, device=dev).index_add(0, owner, m2i)
            ok = torch.isfinite(m2)
            torch.where(ok, m2, torch.zeros_like(m2)).sum().backward()
        except (torch.linalg.LinAlgError, RuntimeError):
            if len(reps) == 1:
                return [(1e20, np.zeros(points.shape[1]))]
            return [evaluate([r], points[j:j + 1])[0] for j, r in enumerate(reps)]
        if on_batch is not None:
            on_batch(list(reps))
        g = U.grad.detach().cpu().numpy()
        vals = m2.detach().cpu().numpy()
        fine = np.isfinite(vals) & np.isfinite(g).all(1)
        keep = torch.as_tensor(fine, device=dev)[owner]
        eta[sel] = torch.where(keep[:, None], e.detach(), eta[sel])
        return [(float(v), gj) if f else (1e20, np.zeros_like(gj)) for v, gj, f in zip(vals, g, fine)]

    return lockstep_minimize(evaluate, np.asarray(U0, dtype=float), options, bounds)


def lockstep_minimize(evaluate: Callable[[list[int], np.ndarray], list[tuple[float, np.ndarray]]],
                      U0: np.ndarray, options: dict,
                      bounds: Sequence | None = None) -> list[scipy.optimize.OptimizeResult]:
    """Minimise K objectives with K L-BFGS-B runs whose function evaluations are batched.

    ``evaluate(starts, points)`` gets the indices of the starts waiting for an evaluation and their points
    [len(starts), P] and returns (value, gradient) per start; ``bounds[i]``: start i's L-BFGS-B bounds (or None).
    Returns the K scipy results."""
    k = U0.shape[0]
    cond = threading.Condition()
    pending: dict[int, np.ndarray] = {}
    answers: dict[int, tuple[float, np.ndarray]] = {}
    done: set[int] = set()
    results: list = [None] * k
    errors: list[BaseException] = []

    def run(i: int) -> None:
        def fun(u: np.ndarray):
            with cond:
                pending[i] = np.array(u, dtype=float)
                cond.notify_all()
                while i not in answers:
                    cond.wait()
                return answers.pop(i)

        try:
            results[i] = scipy.optimize.minimize(fun, U0[i], jac=True, method="L-BFGS-B", options=options,
                                                 bounds=None if bounds is None else bounds[i])
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)
        finally:
            with cond:
                done.add(i)
                cond.notify_all()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(k)]
    for t in threads:
        t.start()
    while True:
        with cond:
            while len(pending) + len(done) < k:
                cond.wait()
            if len(done) == k:
                break
            batch = sorted(pending)
            points = np.stack([pending.pop(i) for i in batch])
        out = evaluate(batch, points)
        with cond:
            answers.update(zip(batch, out))
            cond.notify_all()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
