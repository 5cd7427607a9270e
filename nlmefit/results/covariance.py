"""Covariance step (NONMEM ``$COV``): R, S and the sandwich R⁻¹SR⁻¹ on the natural parameter scale.

R is the Hessian of OFV/2 in the free natural parameters (θ, Ω variances/covariances, σ SDs), by central
differences of the exact gradient (each gradient re-solves the conditional modes); S = Σ_i g_i g_iᵀ of the
per-subject gradients of OFV_i/2, all N of them from one backward pass through per-subject parameter copies.
Both are sums over subjects: they are accumulated over memory-sized chunks of subjects (``size``) and, in a
sharded run, over the ranks (each rank its own subjects, then one all-reduce).
If R is not positive definite the step fails honestly: no SEs, ``ok=False`` and a message — never a patched
matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nlmefit.memory import subject_slices

__all__ = ["CovarianceStep", "covariance_step"]


@dataclass
class CovarianceStep:
    names: list[str]
    R: np.ndarray
    S: np.ndarray
    cov: np.ndarray | None
    kind: str
    ok: bool
    message: str

    @property
    def se(self) -> np.ndarray | None:
        return None if self.cov is None else np.sqrt(np.clip(np.diag(self.cov), 0, None))

    @property
    def correlation(self) -> np.ndarray | None:
        if self.cov is None:
            return None
        s = self.se
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.cov / np.outer(s, s)

    @property
    def condition_number(self) -> float | None:
        if not self.ok:
            return None
        w = np.linalg.eigvalsh(self.R)
        return float(w.max() / w.min())


def covariance_step(linearisation, model, data, p_hat, eta_hat, kind: str = "sandwich",
                    rel_step: float = 1e-4, size: int | None = None, shard=None) -> CovarianceStep:
    """R, S and the requested covariance of the free natural parameters, for the approximation
    ``linearisation`` (a :class:`~nlmefit.marginal.linearisation.Linearisation`) at ``p_hat``; ``size``
    subjects at a time, and rank by rank under ``shard`` (:mod:`nlmefit.parallel`; a collective)."""
    pset = model.parameters
    names = pset.natural_names
    x0 = pset.to_natural_vector(p_hat).detach()
    n_par = x0.numel()
    steps = np.array([rel_step * max(abs(float(v)), 1e-2) for v in x0.tolist()])
    rows = None if shard is None else shard.rows(data)
    local = data if rows is None else data.index(rows)
    leta = eta_hat if rows is None else eta_hat[rows]
    R, S = np.zeros((n_par, n_par)), np.zeros((n_par, n_par))
    for sl in subject_slices(local.n_subjects, size) if local.n_subjects else []:  # memory-sized chunks
        d = local if sl == slice(0, local.n_subjects) else local.index(sl)
        R_k, S_k = _r_and_s(linearisation, model, d, x0, leta[sl], steps)
        R, S = R + R_k, S + S_k
    if shard is not None:
        tot = shard.allreduce_sum(torch.as_tensor(np.stack([R, S]), dtype=torch.float64)).numpy()
        R, S = tot[0], tot[1]
    R = 0.5 * (R + R.T)
    ok, msg, cov = True, "covariance step successful", None
    try:
        np.linalg.cholesky(R)
    except np.linalg.LinAlgError:
        w = np.linalg.eigvalsh(R)
        return CovarianceStep(names, R, S, None, kind, False,
                              f"R matrix is not positive definite (smallest eigenvalue {w.min():.3g}); "
                              f"no standard errors are reported")
    Rinv = np.linalg.inv(R)
    if kind == "r":
        cov = Rinv
    elif kind == "s":
        try:
            cov = np.linalg.inv(S)
        except np.linalg.LinAlgError:
            return CovarianceStep(names, R, S, None, kind, False, "S matrix is singular; no standard errors")
    else:
        cov = Rinv @ S @ Rinv
    return CovarianceStep(names, R, S, cov, kind, ok, msg)


def _r_and_s(linearisation, model, data, x0: torch.Tensor, eta_hat: torch.Tensor, steps: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """``data``'s terms of R (unsymmetrised) and S."""
    pset = model.parameters

    def grad_at(x: torch.Tensor) -> np.ndarray:
        xt = x.clone().requires_grad_(True)
        p = pset.from_natural_vector(xt)
        eta = linearisation.modes(model, p, data, eta_hat)
        m2 = linearisation.subject_m2ll(model, p, data, eta).sum() / 2
        (g,) = torch.autograd.grad(m2, xt)
        return g.detach().cpu().numpy()

    R = _hessian_batched(grad_at, model, linearisation, data, x0, eta_hat, steps)
    # per-subject gradients: one copy of the parameters per subject
    X = x0.expand(data.n_subjects, x0.numel()).clone().requires_grad_(True)
    p_rep = pset.from_natural_vector(X)
    m2 = linearisation.subject_m2ll(model, p_rep, data, eta_hat) / 2
    (G,) = torch.autograd.grad(m2.sum(), X)
    G = G.detach().cpu().numpy()
    return R, G.T @ G


_MAX_VIRTUAL = 50_000  # virtual subjects (replicas × N) per batched gradient evaluation


def _hessian_batched(grad_at, model, linearisation, data, x0: torch.Tensor, eta_hat: torch.Tensor,
                     steps: np.ndarray) -> np.ndarray:
    """R by central differences of the gradient, R[:, k] = (g(x0 + h_k e_k) − g(x0 − h_k e_k)) / 2h_k.

    The 2P perturbed points are independent problems: they are evaluated as replicas of the data with
    per-replica parameter copies (the models broadcast over per-subject parameters), in chunks of at most
    ``_MAX_VIRTUAL`` virtual subjects — one mode search and one backward pass per chunk instead of 2P of each.
    Falls back to one point at a time for a model that does not take per-subject parameters."""
    pset = model.parameters
    n_par, n = x0.numel(), data.n_subjects
    H = torch.as_tensor(steps, dtype=x0.dtype, device=x0.device)
    E = torch.diag(H)
    pts = torch.cat([x0 + E, x0 - E])  # [2P, P]
    per = max(1, _MAX_VIRTUAL // max(n, 1))
    grads = []
    try:
        for a in range(0, 2 * n_par, per):
            X = pts[a:a + per].clone().requires_grad_(True)
            m = X.shape[0]
            rep = data.index(torch.arange(n, device=data.y.device).repeat(m))
            p = pset.from_natural_vector(X.repeat_interleave(n, 0))
            eta = linearisation.modes(model, p, rep, eta_hat.detach().repeat(m, 1))
            m2 = linearisation.subject_m2ll(model, p, rep, eta).sum() / 2
            (g,) = torch.autograd.grad(m2, X)
            grads.append(g.detach())
        G = torch.cat(grads).cpu().numpy()
    except (RuntimeError, IndexError, ValueError, TypeError):  # a model without per-subject parameter copies
        G = np.stack([grad_at(x) for x in pts])
    return (G[:n_par] - G[n_par:]).T / (2 * steps[None, :])
