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
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.parameters import ParameterSet, Params

__all__ = ["perturbed_starts", "lockstep_minimize", "batched_params"]


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
    (start-major), as per-subject copies [k·n] that the models broadcast over."""
    x = torch.stack([pset.to_natural_vector(pset.from_unconstrained(u)) for u in U])
    return pset.from_natural_vector(x.repeat_interleave(n, 0))


def lockstep_minimize(evaluate: Callable[[list[int], np.ndarray], list[tuple[float, np.ndarray]]],
                      U0: np.ndarray, options: dict) -> list[scipy.optimize.OptimizeResult]:
    """Minimise K objectives with K L-BFGS-B runs whose function evaluations are batched.

    ``evaluate(starts, points)`` gets the indices of the starts waiting for an evaluation and their points
    [len(starts), P] and returns (value, gradient) per start. Returns the K scipy results."""
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
            results[i] = scipy.optimize.minimize(fun, U0[i], jac=True, method="L-BFGS-B", options=options)
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
