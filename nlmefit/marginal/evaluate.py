"""The marginal −2LL of a model at given parameters, by any method: importance sampling, AGQ, or one of the
approximations (Laplace, FOCE-I, FOCE, FO). The exact methods (IS with many samples, AGQ with many nodes) are
the yardstick the approximations are judged by."""
from __future__ import annotations

import numpy as np
import torch
from torch.distributions import Distribution

from nlmefit.errors import ModelSpecError
from nlmefit.marginal.importance import LoglikEstimate, importance_loglik
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.linearisation import get_linearisation
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.posteriors import EmpiricalPosterior
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
    over the draws for ``is``, over the two stages (modes, −2LL) otherwise."""
    key = method.lower().replace("-", "").replace("_", "")
    if key == "is":
        prop = _proposal(model, p.detach(), data, proposal, df, posterior, eta0)
        return importance_loglik(model, p, data, prop, n_samples=n_samples, seed=seed, min_ess=min_ess,
                                 progress=progress)
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
