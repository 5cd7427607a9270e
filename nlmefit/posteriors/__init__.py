"""Posterior families q(η_i): ``torch.distributions.Distribution`` objects with batch shape ``[N]`` (one per
subject) and event shape ``[q]``, so ``sample``/``rsample``/``log_prob`` come for free and importance sampling,
counterfactual simulation, the Q/KL decomposition and one-step-ahead scores take "a posterior" and nothing else.

* :class:`GaussianPosterior` — N(m_i, L_i L_iᵀ); the Laplace approximation is one (mode, Cholesky of H⁻¹);
* :class:`StudentTPosterior` — multivariate t around the same location and scale (heavier tails);
* :class:`EmpiricalPosterior` — MCMC draws (SAEM, NUTS): resampling; moment-matched Gaussian/t for densities;
* :class:`FlowFamily` — per-subject variational parameters (Gaussian, MAF, NSF on zuko) whose ``forward(index)``
  is a :class:`GaussianPosterior` or :class:`FlowPosterior` q_i(η) = law of m_i + L_i g(ξ; c_i), ξ ~ N(0, I);
* :class:`AmortizedFamily` — the same q_i with (m_i, L_i, c_i) = encoder(panel_i) (:class:`PanelEncoder`, a
  masked set encoder over observation and dose records), so new subjects get q_i without optimisation.

Building a Laplace posterior needs the conditional modes, which is marginal-likelihood machinery:
:func:`nlmefit.marginal.laplace_posterior`. This package depends on torch, pyro and zuko only.
"""
from nlmefit.posteriors.empirical import EmpiricalPosterior
from nlmefit.posteriors.encoder import AmortizedFamily, PanelEncoder
from nlmefit.posteriors.flows import FlowFamily, FlowPosterior, kl_to_prior
from nlmefit.posteriors.gaussian import GaussianPosterior
from nlmefit.posteriors.rng import seeded
from nlmefit.posteriors.student_t import StudentTPosterior

__all__ = ["GaussianPosterior", "StudentTPosterior", "EmpiricalPosterior", "FlowFamily", "FlowPosterior", "kl_to_prior",
           "seeded", "AmortizedFamily", "PanelEncoder"]
