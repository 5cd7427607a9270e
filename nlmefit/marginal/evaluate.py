"""The marginal −2LL of a model at given parameters, by any method: importance sampling, AGQ, or one of the
approximations (Laplace, FOCE-I, FOCE, FO). The exact methods (IS with many samples, AGQ with many nodes) are
the yardstick the approximations are judged by."""
from __future__ import annotations

import numpy as np
import torch
from torch.distributions import Distribution

from nlmefit import parallel
from nlmefit.errors import ModelSpecError
from nlmefit.marginal.importance import (
    LoglikEstimate,
    default_chunk,
    importance_loglik,
    log_weight_sums,
    weights_estimate,
)
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.linearisation import get_linearisation
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.posteriors import EmpiricalPosterior, GaussianPosterior, StudentTPosterior
from nlmefit.progress import progress_bar

__all__ = ["marginal_loglik", "PROPOSALS"]

PROPOSALS = ("laplace", "t", "posterior")


def _proposal(model, p, data, proposal, df, posterior, eta0) -> Distribution:
    if proposal not in PROPOSALS:
        raise ModelSpecError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
    if proposal == "posterior":
        if posterior is None:
            raise ValueError("proposal='posterior' needs a posterior (a fit's posterior draws or a posterior "
                             "family); use 'laplace' or 't'")
        if isinstance(posterior, EmpiricalPosterior):
            if posterior.n_draws < 2:
                raise ValueError("a 'posterior' proposal needs at least two posterior draws per subject")
            return posterior.moment_matched(df)
        return posterior
    return laplace_posterior(model, p, data, eta0, df=(df or 4.0) if proposal == "t" else df)


def marginal_loglik(model: LatentModel, p: Params, data: ObservationData, method: str = "is", *,
                    n_samples: int = 2000, proposal: str = "t", df: float | None = None,
                    posterior: Distribution | None = None, n_nodes: int = 7, hessian: str = "exact",
                    seed: int | None = 0, min_ess: float = 50.0,
                    eta0: torch.Tensor | None = None, progress: bool | None = None) -> LoglikEstimate:
    """Marginal −2LL of ``model`` at parameters ``p`` on ``data``.

    ``is``: ``n_samples`` draws per subject from ``proposal`` — ``laplace``, ``t`` (``df`` degrees of freedom,
    default 4) or ``posterior`` (the given ``posterior``: a family with a density is used as it is, MCMC draws
    through their moment-matched Gaussian, or t with ``df``); ``seed`` makes it reproducible. ``agq``:
    ``n_nodes`` per dimension, scale from the ``hessian`` (``exact`` | ``gauss-newton``). ``laplace``,
    ``focei``, ``foce``, ``fo``: the approximations (``se`` 0). ``progress``: a bar (:mod:`nlmefit.progress`):
    over the draws for ``is``, over the two stages (modes, −2LL) otherwise.

    Under several ranks (:mod:`nlmefit.parallel`) this is a collective: every rank calls it with the same
    arguments, evaluates its own subjects, and receives the whole estimate; importance draws are taken by subject
    index, so a seeded estimate does not depend on the number of ranks."""
    key = method.lower().replace("-", "").replace("_", "")
    shard = parallel.current()
    if shard is not None and data.n_subjects > 1:
        return _sharded(shard, key, model, p, data, n_samples=n_samples, proposal=proposal, df=df,
                        posterior=posterior, n_nodes=n_nodes, hessian=hessian, seed=seed, min_ess=min_ess,
                        eta0=eta0, progress=progress if shard.rank == 0 else False)
    if key == "is":
        prop = _proposal(model, p.detach(), data, proposal, df, posterior, eta0)
        return importance_loglik(model, p, data, prop, n_samples=n_samples, seed=seed, min_ess=min_ess,
                                 progress=progress)
    return _deterministic(key, model, p, data, n_nodes, hessian, eta0, progress)


def _deterministic(key: str, model: LatentModel, p: Params, data: ObservationData, n_nodes: int, hessian: str,
                   eta0: torch.Tensor | None, progress: bool | None) -> LoglikEstimate:
    """AGQ or an approximation (Laplace, FOCE-I, FOCE, FO) at the conditional modes; ``se`` 0."""
    lin = get_linearisation(key, n_nodes=n_nodes, hessian=hessian) if key == "agq" else get_linearisation(key)
    lin.check(model)
    eta = torch.zeros(data.n_subjects, data.q, dtype=data.y.dtype, device=data.y.device) if eta0 is None else eta0
    pd_ = p.detach()
    with progress_bar(2, lin.name, "stage", enabled=progress, leave=False) as bar:  # one batched call each
        bar.set_postfix_str("modes")
        eta_hat = lin.modes(model, pd_, data, eta)
        bar.update(1)
        bar.set_postfix_str("-2LL")
        with torch.enable_grad():
            m2 = lin.subject_m2ll(model, pd_, data, eta_hat).detach().cpu().numpy()
        bar.update(1)
    n = data.n_subjects
    return LoglikEstimate(data.ids, -m2 / 2, np.zeros(n), np.full(n, np.nan), 0, "", data.n_uncensored,
                          method=lin.name, n_nodes=n_nodes if key == "agq" else None)


def _take(dist: Distribution, idx: torch.Tensor) -> Distribution:
    """The proposal of a subset of subjects (Gaussian, t, or a family with ``index``)."""
    if isinstance(dist, StudentTPosterior):
        return StudentTPosterior(float(dist.df.reshape(-1)[0]), dist.loc[idx], dist.scale_tril[idx], kind=dist.kind)
    if isinstance(dist, GaussianPosterior):
        return GaussianPosterior(dist.loc[idx], dist.scale_tril[idx], kind=dist.kind)
    if hasattr(dist, "index"):
        return dist.index(idx)
    raise ModelSpecError(f"importance sampling on several ranks needs a proposal that can be split by subject "
                         f"(Gaussian, t, or a family with .index); got {type(dist).__name__}")


def _gathered(shard: parallel.Shard, local: Distribution, rows: torch.Tensor, n: int) -> Distribution:
    """The proposal of all ``n`` subjects from each rank's own (Gaussian or t, built from the modes)."""
    loc = shard.gather_rows(local.loc, rows, n)
    tril = shard.gather_rows(local.scale_tril, rows, n)
    if isinstance(local, StudentTPosterior):
        return StudentTPosterior(float(local.df.reshape(-1)[0]), loc, tril, kind=local.kind)
    return GaussianPosterior(loc, tril, kind=getattr(local, "kind", "laplace"))


def _sharded(shard: parallel.Shard, key: str, model: LatentModel, p: Params, data: ObservationData, *, n_samples,
             proposal, df, posterior, n_nodes, hessian, seed, min_ess, eta0, progress) -> LoglikEstimate:
    """:func:`marginal_loglik` with this rank's subjects; per-subject terms gathered over the ranks."""
    rows = shard.rows(data)
    n = data.n_subjects
    local = data.index(rows)
    e0 = None if eta0 is None else eta0[rows]
    if key != "is":
        if local.n_subjects:
            est = _deterministic(key, model, p, local, n_nodes, hessian, e0, progress)
            ll = torch.as_tensor(est.loglik_i, dtype=torch.float64, device=data.y.device)
            method = est.method
        else:
            ll, method = torch.zeros(0, dtype=torch.float64, device=data.y.device), key
        full = shard.gather_rows(ll, rows, n).cpu().numpy()
        return LoglikEstimate(data.ids, full, np.zeros(n), np.full(n, np.nan), 0, "", data.n_uncensored,
                              method=method, n_nodes=n_nodes if key == "agq" else None)
    pd_ = p.detach()
    if proposal == "posterior":  # the given posterior covers every subject: each rank takes its rows
        whole = _proposal(model, pd_, data, proposal, df, posterior, eta0)
        mine = _take(whole, rows)
    else:
        mine = _proposal(model, pd_, local, proposal, df, None, e0) if local.n_subjects else None
        whole = _gathered(shard, mine if mine is not None else _empty(data, proposal, df), rows, n)
        mine = _take(whole, rows)  # the gathered values (bit-identical to the local ones)
    chunk = default_chunk(data, n_samples)  # from all subjects: the same chunks, hence draws, on every rank
    if local.n_subjects:
        lse_w, lse_w2 = log_weight_sums(model, pd_, local, mine, n_samples, seed, chunk, progress,
                                        sampler=lambda k: whole.sample((k,))[:, rows])
    else:  # a rank without subjects (more ranks than subjects) takes part in the gathering only
        lse_w = lse_w2 = torch.zeros(0, dtype=data.y.dtype, device=data.y.device)
    lse_w = shard.gather_rows(lse_w, rows, n)
    lse_w2 = shard.gather_rows(lse_w2, rows, n)
    return weights_estimate(data.ids, lse_w, lse_w2, n_samples, getattr(whole, "kind", type(whole).__name__),
                            data.n_uncensored, min_ess)


def _empty(data: ObservationData, proposal: str, df) -> Distribution:
    """A proposal of no subjects (a rank with none still takes part in the gathering)."""
    loc = torch.zeros(0, data.q, dtype=data.y.dtype, device=data.y.device)
    tril = torch.zeros(0, data.q, data.q, dtype=data.y.dtype, device=data.y.device)
    return StudentTPosterior(df or 4.0, loc, tril) if proposal == "t" else GaussianPosterior(loc, tril)
