"""PPCA written against the LatentModel protocol alone: y_i = μ + W η_i + ε_i, η_i ~ N(0, I), ε ~ N(0, σ²I).

The seed of the generative baselines: a model that is not a PK model, with tensor-valued parameters (μ, W),
fitted by the same estimators. It stays under 40 lines on purpose (the core issue's acceptance)."""
import copy

import torch
from torch.distributions import MultivariateNormal, Normal

from nlmefit.models import Omega, Param, ParameterSet
from nlmefit.models.data import ObservationData


class PPCA:
    def __init__(self, d: int, q: int = 1, seed: int = 0):
        w0 = 0.5 * torch.randn(d, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.name, self.q = "ppca", q
        self.parameters = ParameterSet({}, Omega({f"z{k}": 1.0 for k in range(q)}, fixed=True),
                                       {"eps": Param(1.0, lower=0.0)}, weights={"mu": torch.zeros(d), "W": w0})

    eta_names = property(lambda self: self.parameters.eta_names)

    def prepare(self, data, device=None, dtype=torch.float64):
        return ObservationData.from_panel(data, self.q, device, dtype)

    def predict(self, p, eta, data):  # f = μ + W η; W may carry per-subject copies [N, d, q]
        f = p.weights["mu"] + (p.weights["W"] @ eta.unsqueeze(-1)).squeeze(-1)
        return f, (p.sigma["eps"] ** 2).unsqueeze(-1).expand_as(f)

    def log_lik(self, p, eta, data, mask=None):
        f, var = self.predict(p, eta, data)
        m = data.mask if mask is None else data.mask & mask
        return torch.where(m, Normal(f, var.sqrt()).log_prob(data.y), torch.zeros_like(f)).sum(-1)

    def prior_covariance(self, p, n_occ=0):
        return p.omega

    def log_prior(self, p, eta, n_occ=0):
        return MultivariateNormal(torch.zeros(self.q, dtype=eta.dtype), p.omega).log_prob(eta)

    def sample_eta(self, p, n, n_occ=0, generator=None, size=()):
        z = torch.randn(*size, n, self.q, generator=generator, dtype=p.omega.dtype)
        return z @ torch.linalg.cholesky(p.omega).transpose(-1, -2)

    def sample_y(self, p, eta, data, generator=None, residual=True):
        f, var = self.predict(p, eta, data)
        return f + residual * var.sqrt() * torch.randn(f.shape, generator=generator, dtype=f.dtype)

    def with_initial(self, params):
        new = copy.copy(self)
        new.parameters = self.parameters.with_values(params)
        return new
