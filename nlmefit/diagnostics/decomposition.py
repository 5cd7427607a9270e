"""The per-subject decomposition log p(y_i | θ) = Q_i − KL_i + gap_i, and the population (aggregate-posterior) check.

For a posterior family q_i(η) (a Distribution with batch [N], event [q]; by default the fit's own posterior):

* Q_i = E_q[log p(y_i | η, θ)] — how well the subject's data are fitted, averaged over q_i (natural log, full
  constants, M3 records as their censored probabilities);
* KL_i = KL(q_i ‖ p(η | θ)) — how far the subject's posterior moved from the prior N(0, Ω_full) (IOV blocks
  included). Closed form (``torch.distributions.kl_divergence``) for a Gaussian q and a model with
  ``prior_covariance``; Monte Carlo with its standard error otherwise. MCMC draws (an
  :class:`~nlmefit.posteriors.EmpiricalPosterior`) have no density: their KL is that of the moment-matched
  Gaussian (``Decomposition.kl_method`` says so) while Q_i is averaged over the draws themselves;
* ELBO_i = Q_i − KL_i ≤ log p(y_i | θ) (when Q and KL refer to the same q);
* log p(y_i | θ) by importance sampling (:func:`~nlmefit.marginal.importance_loglik`; default proposal a
  multivariate t with 4 df at the Laplace posterior) with its Monte-Carlo SE;
* gap_i = log p(y_i) − ELBO_i = KL(q_i ‖ p(η | y_i, θ)) ≥ 0: zero exactly when q_i is the exact posterior.

Estimators. For a Gaussian q with a closed-form KL, Q_i is estimated with the control variate
log p(η) − log q(η) (whose mean −KL_i is known): Q̂_i = mean_k[log p(y_i, η_k) − log q_i(η_k)] + KL_i. Its
variance vanishes when q_i is the exact posterior (the log-weight is then the constant log p(y_i)), so on a
linear-Gaussian model with its Laplace posterior every column is exact to rounding. Otherwise Q̂_i, KL̂_i and
ELBÔ_i are plain means over the same draws (so Q̂ − KL̂ = ELBÔ holds exactly).

Population check: the aggregate posterior m(η) = (1/N) Σ_i q_i(η) is sampled by stratification (K draws from
every q_i) and its density evaluated by a log-mean-exp over subjects. By convexity of the KL,
(1/N) Σ_i KL_i ≥ KL(m ‖ prior); the difference is the mutual information I(i; η) = E[log q_i(η) − log m(η)]
∈ [0, log N] between "which subject" and η, estimated directly with its MC SE. A KL(m ‖ prior) that is large
next to the mutual information says the prior N(0, Ω) does not describe the population of posteriors:
simulations from the model will not look like the subjects fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.distributions import Distribution, MultivariateNormal, kl_divergence

from nlmefit._html import object_html
from nlmefit.diagnostics.decomposition_plots import plot_aggregate_posterior, plot_q_kl
from nlmefit.marginal.importance import LoglikEstimate, importance_loglik
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.quadrature import agq_m2ll
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel
from nlmefit.posteriors import EmpiricalPosterior, seeded

__all__ = ["Decomposition", "decomposition", "ExactPosterior", "exact_posterior", "prior_distribution",
           "fit_parts"]

TABLE_COLUMNS = ["ID", "q", "q_se", "kl", "kl_se", "elbo", "elbo_se", "loglik", "loglik_se", "gap", "gap_se",
                 "ess"]


def fit_parts(fit: Any) -> tuple[LatentModel, Params, ObservationData]:
    """(model, population parameters, data) of a FitResult, on the data's dtype and device."""
    if fit.model is None or fit.data is None:
        raise ValueError("this FitResult has no model or data attached (read from JSON?): use "
                         "FitResult.from_json(path, model=...) and refit, or pass a fit made in this session")
    data = fit.data
    return fit.model, fit.population_parameters(dtype=data.dtype, device=data.device), data


def prior_distribution(model: LatentModel, p: Params, data: ObservationData) -> MultivariateNormal | None:
    """p(η | θ) = N(0, Ω_full) (with the IOV blocks of ``data.n_occ`` occasions) as a MultivariateNormal, or
    None when the model has no ``prior_covariance`` (then KLs are Monte Carlo on ``model.log_prior``)."""
    if not hasattr(model, "prior_covariance"):
        return None
    cov = model.prior_covariance(p, data.n_occ).detach().to(data.dtype)
    if cov.dim() > 2:  # per-subject copies: the decomposition uses one prior
        cov = cov.reshape(-1, *cov.shape[-2:])[0]
    return MultivariateNormal(torch.zeros(cov.shape[-1], dtype=cov.dtype, device=cov.device),
                              covariance_matrix=cov)


class ExactPosterior(Distribution):
    """The exact posterior p(η | y_i, θ) = p(y_i, η | θ) / p(y_i | θ), normalised by AGQ (q ≤ 3–4).

    ``log_prob`` is exact up to the quadrature error of log p(y_i | θ); ``sample`` resamples a pool of draws
    from a t proposal at the Laplace posterior with their self-normalised importance weights
    (sampling-importance-resampling: exact as the pool grows). It is the reference posterior for which
    Q_i − KL_i = log p(y_i | θ) (gap 0)."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, model: LatentModel, p: Params, data: ObservationData, log_evidence: torch.Tensor,
                 pool: torch.Tensor, pool_logw: torch.Tensor, mean: torch.Tensor) -> None:
        self.model, self.p, self.data = model, p, data
        self.log_evidence = log_evidence  # [N]
        self.pool = pool  # [M, N, q]
        self.pool_logw = pool_logw  # [M, N], normalised over M
        self._mean = mean
        self.kind = "exact"
        super().__init__(batch_shape=pool.shape[1:2], event_shape=pool.shape[2:], validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    def sample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        k = int(shape.numel())
        idx = torch.multinomial(self.pool_logw.T.exp(), k, replacement=True).T  # [k, N]
        picked = torch.gather(self.pool, 0, idx.unsqueeze(-1).expand(k, *self.pool.shape[1:]))
        return picked.reshape(*shape, *self.pool.shape[1:])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        lj = self.model.log_lik(self.p, value, self.data) + self.model.log_prior(self.p, value, self.data.n_occ)
        return lj - self.log_evidence


def exact_posterior(model: LatentModel, p: Params, data: ObservationData, n_nodes: int = 9,
                    n_pool: int = 4000, df: float = 4.0, seed: int | None = 0) -> ExactPosterior:
    """The :class:`ExactPosterior` of every subject (AGQ with ``n_nodes`` per dimension for the normaliser)."""
    p = p.detach()
    lap = laplace_posterior(model, p, data)
    log_ev = (-0.5 * agq_m2ll(model, p, data, lap.loc, n_nodes)).detach()  # needs autograd for the Hessian
    with torch.no_grad():
        prop = laplace_posterior(model, p, data, eta0=lap.loc, df=df)
        with seeded(seed, data.device):
            pool = prop.sample((n_pool,)).to(data.dtype)
        lw = model.log_lik(p, pool, data) + model.log_prior(p, pool, data.n_occ) - prop.log_prob(pool)
        lw = torch.nan_to_num(lw, nan=-math.inf)
        lw = lw - torch.logsumexp(lw, 0)
        mean = (lw.exp().unsqueeze(-1) * pool).sum(0)
    return ExactPosterior(model, p, data, log_ev, pool, lw, mean)


@dataclass
class Decomposition:
    """The result of :func:`decomposition`: ``table`` (one row per subject, natural log, full constants),
    ``totals`` (sums over subjects with SEs) and ``aggregate`` (the population check)."""

    table: pd.DataFrame
    aggregate: dict
    posterior_kind: str
    kl_method: str  # "closed form", "monte carlo", or "moment-matched Gaussian (closed form)"
    q_method: str
    proposal: str
    n_samples: int
    mixture_draws: np.ndarray = field(repr=False)  # [K, N, q] draws of the aggregate posterior
    prior_cov: np.ndarray | None = field(default=None, repr=False)
    eta_names: list[str] = field(default_factory=list)
    loglik_estimate: LoglikEstimate | None = field(default=None, repr=False)

    @property
    def totals(self) -> dict:
        t = self.table
        out = {c: float(t[c].sum()) for c in ("q", "kl", "elbo", "loglik", "gap")}
        out.update({f"{c}_se": float(np.sqrt((t[f"{c}_se"] ** 2).sum())) for c in ("q", "kl", "elbo", "loglik",
                                                                                   "gap")})
        return out

    def summary(self) -> dict:
        return {"posterior": self.posterior_kind, "kl_method": self.kl_method, "q_method": self.q_method,
                "proposal": self.proposal, "n_samples": self.n_samples, **self.totals, **self.aggregate}

    def _repr_html_(self) -> str:
        t = self.totals
        lines = [f"log p(y|θ) = Q − KL: {t['loglik']:.3f} ± {t['loglik_se']:.3f} = {t['q']:.3f} − {t['kl']:.3f} "
                 f"(ELBO {t['elbo']:.3f}, gap {t['gap']:.3f})",
                 f"posterior: {self.posterior_kind}; KL by {self.kl_method}; Q by {self.q_method}",
                 "aggregate posterior vs prior: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in self.aggregate.items()
                                                            if not isinstance(v, (list, dict, np.ndarray)))]
        return object_html("Decomposition (per subject)", lines, [("subjects", self.table)])

    def plot(self, **kwargs):
        """Q_i against KL_i (:func:`~nlmefit.diagnostics.decomposition_plots.plot_q_kl`)."""
        return plot_q_kl(self, **kwargs)

    def plot_aggregate(self, **kwargs):
        """Aggregate posterior against the prior per η dimension
        (:func:`~nlmefit.diagnostics.decomposition_plots.plot_aggregate_posterior`)."""
        return plot_aggregate_posterior(self, **kwargs)


def _density(posterior: Distribution) -> tuple[Distribution, str]:
    """A posterior with a density for the KL: MCMC draws become their moment-matched Gaussian."""
    if isinstance(posterior, EmpiricalPosterior):
        return posterior.moment_matched(), "moment-matched Gaussian of the draws (closed form)"
    return posterior, ""


def _proposal(model: LatentModel, p: Params, data: ObservationData, proposal: str | Distribution, df: float,
              density: Distribution) -> Distribution:
    if isinstance(proposal, Distribution):
        return proposal
    try:
        mean = density.mean.detach().to(data.dtype)
    except NotImplementedError:  # flows have no closed-form mean: a start for the mode search is enough
        mean = density.sample((256,)).mean(0).detach().to(data.dtype)
    if proposal == "t":
        return laplace_posterior(model, p, data, eta0=mean, df=df)
    if proposal == "laplace":
        return laplace_posterior(model, p, data, eta0=mean)
    if proposal == "posterior":
        return density
    raise ValueError(f"proposal must be 't', 'laplace', 'posterior' or a Distribution, got {proposal!r}")


def _mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over draws (dim 0) and its standard error."""
    k = x.shape[0]
    m = x.mean(0)
    se = x.std(0, unbiased=True) / math.sqrt(k) if k > 1 else torch.full_like(m, math.nan)
    return m, se


def _aggregate(model: LatentModel, p: Params, data: ObservationData, density: Distribution,
               mean_kl: float, n_draws: int) -> tuple[dict, torch.Tensor]:
    """KL of the aggregate posterior to the prior and the mutual information, stratified over subjects."""
    n = data.n_subjects
    eta = density.sample((n_draws,)).to(data.dtype)  # [K, N, q]
    chunk = max(1, 4_000_000 // max(1, n * n * max(1, data.q)))
    log_m, log_own = [], []
    for s in range(0, n_draws, chunk):  # chunks of draws, each one batched over all subject pairs
        e = eta[s:s + chunk]
        lq = density.log_prob(e.unsqueeze(-2))  # [k, N, N]: q_i'(η_{k,i})
        log_m.append(torch.logsumexp(lq, -1) - math.log(n))
        log_own.append(torch.diagonal(lq, dim1=-2, dim2=-1))
    lm, lo = torch.cat(log_m), torch.cat(log_own)
    lp = model.log_prior(p, eta, data.n_occ)

    def strat(x: torch.Tensor) -> tuple[float, float]:  # stratified mean over subjects and its SE
        return float(x.mean()), float(torch.sqrt((x.var(0, unbiased=True) / n_draws).sum()) / n)

    agg, agg_se = strat(lm - lp)
    mi, mi_se = strat(lo - lm)
    return {"mean_kl": mean_kl, "aggregate_kl": agg, "aggregate_kl_se": agg_se, "mutual_information": mi,
            "mutual_information_se": mi_se, "mi_by_difference": mean_kl - agg, "log_n": math.log(n)}, eta


def decomposition(fit: Any, posterior: Distribution | None = None, n_samples: int = 2000, seed: int | None = 0,
                  proposal: str | Distribution = "t", df: float = 4.0, n_is: int | None = None,
                  n_mixture: int = 500) -> Decomposition:
    """Q_i, KL_i, ELBO_i, log p(y_i) and gap_i for every subject of ``fit`` under ``posterior`` (default
    ``fit.posterior``: Laplace for the classical methods, MCMC draws for SAEM/NUTS), plus the aggregate-posterior
    check. ``n_samples`` draws of q_i for Q and KL, ``n_is`` (default ``n_samples``) importance samples for
    log p(y_i) from ``proposal`` (``"t"``: t with ``df`` at the Laplace posterior; ``"laplace"``;
    ``"posterior"``: the posterior itself; or any Distribution), ``n_mixture`` draws per subject for the
    aggregate posterior. ``seed`` makes every draw reproducible without touching the caller's random state."""
    model, p, data = fit_parts(fit)
    p = p.detach()
    post = posterior if posterior is not None else fit.posterior
    if post is None:
        post = laplace_posterior(model, p, data)
    n, q = data.n_subjects, data.q
    if tuple(post.batch_shape) != (n,) or tuple(post.event_shape) != (q,):
        raise ValueError(f"the posterior must have batch shape [{n}] and event shape [{q}], got "
                         f"{list(post.batch_shape)} and {list(post.event_shape)}")
    density, kl_note = _density(post)
    prior = prior_distribution(model, p, data)
    kind = getattr(post, "kind", type(post).__name__)
    dev = data.device
    with torch.no_grad(), seeded(seed, dev):
        if isinstance(post, EmpiricalPosterior):  # Q over the draws themselves, KL of their Gaussian
            eta = post.draws.to(data.dtype) if post.n_draws <= n_samples else post.sample((n_samples,))
            ll = torch.nan_to_num(model.log_lik(p, eta, data), nan=-math.inf)
            qv, q_se = _mean_se(ll)
            kl = kl_divergence(density, prior) if prior is not None else None
            if kl is None:
                e2 = density.sample((n_samples,)).to(data.dtype)
                kl, kl_se = _mean_se(density.log_prob(e2) - model.log_prior(p, e2, data.n_occ))
                kl_method = "moment-matched Gaussian of the draws (Monte Carlo)"
            else:
                kl_se = torch.zeros_like(kl)
                kl_method = kl_note
            elbo, elbo_se = qv - kl, torch.sqrt(q_se ** 2 + kl_se ** 2)
            q_method = f"mean over {eta.shape[0]} posterior draws (SE ignores autocorrelation)"
        else:
            eta = post.sample((n_samples,)).to(data.dtype)
            ll = torch.nan_to_num(model.log_lik(p, eta, data), nan=-math.inf)
            lp = model.log_prior(p, eta, data.n_occ)
            lq = post.log_prob(eta)
            closed = prior is not None and isinstance(post, MultivariateNormal)
            elbo, elbo_se = _mean_se(ll + lp - lq)
            if closed:
                kl = kl_divergence(post, prior)
                kl_se = torch.zeros_like(kl)
                qv, q_se = elbo + kl, elbo_se
                kl_method, q_method = "closed form", "control variate log p(η) − log q(η) (exact mean −KL)"
            else:
                kl, kl_se = _mean_se(lq - lp)
                qv, q_se = _mean_se(ll)
                kl_method, q_method = "monte carlo", "monte carlo"
        prop = _proposal(model, p, data, proposal, df, density)
    ll_est = importance_loglik(model, p, data, prop, n_samples=n_is or n_samples,
                               seed=None if seed is None else seed + 1)
    with torch.no_grad(), seeded(None if seed is None else seed + 2, dev):
        mean_kl = float(kl.mean())
        aggregate, mix = _aggregate(model, p, data, density, mean_kl, n_mixture)
    to = lambda x: x.detach().cpu().numpy().astype(float)  # noqa: E731
    loglik, loglik_se = ll_est.loglik_i, ll_est.se_i
    table = pd.DataFrame({"ID": data.ids, "q": to(qv), "q_se": to(q_se), "kl": to(kl), "kl_se": to(kl_se),
                          "elbo": to(elbo), "elbo_se": to(elbo_se), "loglik": loglik, "loglik_se": loglik_se})
    table["gap"] = table["loglik"] - table["elbo"]
    table["gap_se"] = np.sqrt(table["loglik_se"] ** 2 + table["elbo_se"] ** 2)
    table["ess"] = ll_est.ess_i
    return Decomposition(table=table[TABLE_COLUMNS], aggregate=aggregate, posterior_kind=str(kind),
                         kl_method=kl_method, q_method=q_method, proposal=str(getattr(prop, "kind", prop)),
                         n_samples=n_samples, mixture_draws=to(mix),
                         prior_cov=None if prior is None else to(prior.covariance_matrix),
                         eta_names=_eta_names(model, q), loglik_estimate=ll_est)


def _eta_names(model: LatentModel, q: int) -> list[str]:
    names = list(getattr(model, "eta_names", []) or [])
    if len(names) == q:
        return names
    return names + [f"eta{k + 1}" for k in range(len(names), q)]
