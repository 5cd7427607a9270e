"""Normalizing-flow posterior families q_i(η) = T(ξ; φ_i), ξ ~ N(0, I_q), for variational EM and as proposals.

    η = m_i + L_i · g(ξ; c_i),    log q_i(η) = log N(ξ; 0, I) − log|det ∂g/∂ξ| − Σ_j log L_i,jj

with m_i [N, q], L_i [N, q, q] lower-triangular with positive diagonal, and g an invertible flow whose network
weights are shared by all subjects while its per-subject freedom sits in a learned context c_i [N, d_c] (the
amortized variant feeds c_i = encoder(panel_i) instead). g is the identity for the ``gaussian`` kind and a zuko
conditional flow otherwise: ``maf`` (masked autoregressive, affine; ``passes=2`` gives coupling layers) or ``nsf``
(rational-quadratic neural splines on [−5, 5], identity outside). The last layer of every hyper-network starts at
zero, so g starts as the identity and q_i starts as exactly N(m_i, L_i L_iᵀ) — e.g. a Laplace posterior.

zuko defines its transforms f = g⁻¹ in the density direction (one network pass per layer for ``log_prob``); a
draw inverts them (``passes`` network passes per layer, q for a fully autoregressive layer).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, MultivariateNormal, constraints, kl_divergence

_VALIDATE_ARGS = Distribution._validate_args
import zuko  # noqa: E402  (importing zuko switches torch's argument validation off globally: restored below)

Distribution.set_default_validate_args(_VALIDATE_ARGS)

from nlmefit.posteriors.gaussian import GaussianPosterior  # noqa: E402

__all__ = ["FLOW_KINDS", "FlowFamily", "FlowPosterior", "kl_to_prior"]

FLOW_KINDS = ("gaussian", "maf", "nsf")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class FlowPosterior(Distribution):
    """q_i(η) = law of m_i + L_i g(ξ; c_i), ξ ~ N(0, I_q): batch [N], event [q], reparameterised draws.

    ``flow`` is a zuko lazy transform f(· | c) = g⁻¹ (``None``: g = identity, a Gaussian); ``context`` [N, d_c]
    conditions it. The network runs in its own dtype (its parameters'); draws are in ``loc``'s dtype and
    ``log_prob`` works in the wider of ``loc``'s and the value's, so a float32 network serves float64 callers."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, scale_tril: Tensor, flow: nn.Module | None = None, context: Tensor | None = None,
                 kind: str = "flow") -> None:
        if loc.dim() != 2 or scale_tril.shape != (*loc.shape, loc.shape[-1]):
            raise ValueError(f"loc must be [N, q] and scale_tril [N, q, q], got {tuple(loc.shape)} and "
                             f"{tuple(scale_tril.shape)}")
        if (flow is None) != (context is None):
            raise ValueError("a flow needs a context [N, d_c] and a context needs a flow")
        if context is not None and (context.dim() != 2 or context.shape[0] != loc.shape[0]):
            raise ValueError(f"context must be [N, d_c] with N = {loc.shape[0]}, got {tuple(context.shape)}")
        self.loc, self.scale_tril, self.flow, self.context, self.kind = loc, scale_tril, flow, context, kind
        super().__init__(batch_shape=loc.shape[:1], event_shape=loc.shape[1:], validate_args=False)

    def _net(self, x: Tensor) -> Tensor:
        return x if self.context is None else x.to(self.context.dtype)

    def from_base(self, xi: Tensor) -> Tensor:
        """η = m + L g(ξ) for base points ξ [..., N, q]."""
        u = xi if self.flow is None else self.flow(self.context).inv(self._net(xi)).to(self.loc.dtype)
        return self.loc + (self.scale_tril @ u.unsqueeze(-1)).squeeze(-1)

    def to_base(self, value: Tensor) -> tuple[Tensor, Tensor]:
        """(ξ = g⁻¹(L⁻¹(η − m)), log|det ∂ξ/∂η|) for values η [..., N, q]."""
        dt = torch.promote_types(value.dtype, self.loc.dtype)
        loc, L = self.loc.to(dt), self.scale_tril.to(dt)
        diff = (value.to(dt) - loc).unsqueeze(-1)
        u = torch.linalg.solve_triangular(L.expand(*diff.shape[:-2], -1, -1), diff, upper=False).squeeze(-1)
        log_det = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        if self.flow is None:
            return u, -log_det.expand(u.shape[:-1])
        xi, ladj = self.flow(self.context).call_and_ladj(self._net(u))
        return xi.to(dt), ladj.to(dt) - log_det

    def rsample(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> Tensor:
        xi = torch.randn(self._extended_shape(torch.Size(sample_shape)), dtype=self.loc.dtype, device=self.loc.device)
        return self.from_base(xi)

    def log_prob(self, value: Tensor) -> Tensor:
        """log N(ξ; 0, I) + log|det ∂ξ/∂η| at ξ = T⁻¹(η), shape [..., N]."""
        xi, ladj = self.to_base(value)
        return -0.5 * xi.pow(2).sum(-1) - self.event_shape[0] * _HALF_LOG_2PI + ladj

    def rsample_and_log_prob(self, sample_shape: torch.Size | Sequence[int] = torch.Size()) -> tuple[Tensor, Tensor]:
        """Draws [*S, N, q] and their log q [*S, N] (what the ELBO needs)."""
        eta = self.rsample(sample_shape)
        return eta, self.log_prob(eta)

    def index(self, idx: Tensor | slice | Sequence[int]) -> FlowPosterior:
        """The posterior of a subset of subjects."""
        ctx = None if self.context is None else self.context[idx]
        return FlowPosterior(self.loc[idx], self.scale_tril[idx], self.flow, ctx, self.kind)


class FlowFamily(nn.Module):
    """Per-subject variational parameters of q_i for N subjects, all evaluated in one pass.

    The parameters live in each subject's own *reference frame* (r_i, R_i), the Gaussian set at
    :meth:`initialise` (e.g. the Laplace posterior): ``offset`` o_i [N, q] and ``scale_raw`` [N, q, q] (strict lower
    triangle as is, log-diagonal; zero = identity) give m_i = r_i + R_i o_i and L_i = R_i · chol(scale_raw_i).
    Why: Adam moves every parameter by about its learning rate per step whatever the gradient's size, so in absolute
    units a step of 0.05 is a tenth of one subject's posterior SD and several SDs of another's (a richly sampled
    subject with SD 0.01 was thrown out of its mode into a secondary flip-flop mode 181 −2LL units worse); in the
    reference frame a step is the same fraction of every subject's posterior SD. ``loc``/``scale_tril`` are m_i/L_i;
    for ``maf``/``nsf`` a zuko conditional flow with shared weights takes the learned per-subject ``context``
    [N, ``context_dim``]. ``init_loc``/``init_scale`` (e.g. the Laplace mode and Cholesky of H⁻¹; ``init_scale``
    may also be standard deviations [N, q] or a number) set q_i to that Gaussian exactly at initialisation.
    ``forward(index)`` returns the distribution of all subjects or of ``index`` (a mini-batch): a
    :class:`GaussianPosterior` for ``gaussian`` (closed-form entropy and KL), a :class:`FlowPosterior` otherwise."""

    def __init__(self, kind: str, n_subjects: int, q: int, *, context_dim: int = 8, hidden: Sequence[int] = (32, 32),
                 transforms: int = 2, bins: int = 8, passes: int | None = None, init_loc: Tensor | None = None,
                 init_scale: Tensor | float | None = None, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if kind not in FLOW_KINDS:
            raise ValueError(f"unknown flow kind {kind!r}; choose one of {FLOW_KINDS}")
        if n_subjects < 1 or q < 1:
            raise ValueError(f"need n_subjects >= 1 and q >= 1, got {n_subjects} and {q}")
        self.kind, self.n_subjects, self.q = kind, int(n_subjects), int(q)
        self.offset = nn.Parameter(torch.zeros(n_subjects, q, dtype=dtype))
        self.scale_raw = nn.Parameter(torch.zeros(n_subjects, q, q, dtype=dtype))
        self.register_buffer("ref_loc", torch.zeros(n_subjects, q, dtype=dtype))
        self.register_buffer("ref_scale", torch.eye(q, dtype=dtype).expand(n_subjects, q, q).clone())
        self.register_buffer("_tril", torch.tril(torch.ones(q, q, dtype=torch.bool), -1), persistent=False)
        self.flow: nn.Module | None = None
        self.context: nn.Parameter | None = None
        if kind != "gaussian":
            if context_dim < 1 or transforms < 1:
                raise ValueError(f"need context_dim >= 1 and transforms >= 1, got {context_dim} and {transforms}")
            cls = zuko.flows.NSF if kind == "nsf" else zuko.flows.MAF
            extra = {"bins": bins} if kind == "nsf" else {}
            self.flow = cls(q, context_dim, transforms=transforms, passes=passes, hidden_features=tuple(hidden),
                            **extra).transform.to(dtype)
            self.context = nn.Parameter(torch.randn(n_subjects, context_dim, dtype=dtype))
        self.initialise(init_loc, init_scale)

    @property
    def loc(self) -> Tensor:
        """m_i [N, q] = r_i + R_i o_i."""
        return self._loc(slice(None))

    @property
    def scale_tril(self) -> Tensor:
        """L_i [N, q, q] = R_i · (strict lower triangle of ``scale_raw`` plus exp of its diagonal)."""
        return self.ref_scale @ self._cholesky(self.scale_raw)

    def _loc(self, idx) -> Tensor:
        return self.ref_loc[idx] + (self.ref_scale[idx] @ self.offset[idx].unsqueeze(-1)).squeeze(-1)

    def _cholesky(self, raw: Tensor) -> Tensor:
        low = torch.where(self._tril, raw, torch.zeros_like(raw))
        return low + torch.diag_embed(torch.exp(torch.diagonal(raw, dim1=-2, dim2=-1)))

    @torch.no_grad()
    def initialise(self, loc: Tensor | None = None, scale: Tensor | float | None = None) -> FlowFamily:
        """Set q_i = N(loc_i, L_i L_iᵀ) exactly, as the new reference frame (flow reset to the identity);
        ``None``: N(0, I)."""
        n, q = self.n_subjects, self.q
        dt, dev = self.offset.dtype, self.offset.device
        self.ref_loc.copy_(torch.zeros(n, q) if loc is None else torch.as_tensor(loc).expand(n, q))
        if scale is None:
            L = torch.eye(q, dtype=dt, device=dev).expand(n, q, q)
        else:
            s = torch.as_tensor(scale, dtype=dt, device=dev)
            chol = s.dim() == 3 or s.shape == (q, q)  # else standard deviations: a number, [q] or [N, q]
            L = s.expand(n, q, q) if chol else torch.diag_embed(s.expand(n, q))
            if chol and bool(torch.triu(L, 1).ne(0).any()):
                raise ValueError("init_scale must be lower-triangular (a Cholesky factor, not a covariance)")
        diag = torch.diagonal(L, dim1=-2, dim2=-1)
        if not bool((diag > 0).all()):
            raise ValueError("init_scale must be a Cholesky factor with a positive diagonal (or positive SDs)")
        self.ref_scale.copy_(L)
        self.offset.zero_()
        self.scale_raw.zero_()
        if self.flow is not None:
            for module in self.flow.modules():
                hyper = getattr(module, "hyper", None)
                if isinstance(hyper, nn.Sequential):  # zero last layer: f(· | c) = identity for every c
                    nn.init.zeros_(hyper[-1].weight)
                    nn.init.zeros_(hyper[-1].bias)
        return self

    @torch.no_grad()
    def rebase(self) -> FlowFamily:
        """Make the current (m_i, L_i) the reference frame (offset and ``scale_raw`` back to zero): q is unchanged
        exactly, and an optimiser step is again a fixed fraction of each subject's *current* posterior SD."""
        loc, L = self.loc.clone(), self.scale_tril.clone()
        self.ref_loc.copy_(loc)
        self.ref_scale.copy_(L)
        self.offset.zero_()
        self.scale_raw.zero_()
        return self

    @classmethod
    def from_gaussian(cls, posterior: MultivariateNormal, kind: str = "gaussian", **kwargs) -> FlowFamily:
        """A family whose q_i equals ``posterior`` (batch [N], event [q]; e.g. the Laplace posterior)."""
        loc, L = posterior.loc, posterior.scale_tril
        kwargs.setdefault("dtype", loc.dtype)
        return cls(kind, loc.shape[0], loc.shape[1], init_loc=loc.detach(), init_scale=L.detach(), **kwargs)

    def forward(self, index: Tensor | slice | Sequence[int] | None = None,
                dtype: torch.dtype | None = None) -> Distribution:
        """q for all subjects (``index=None``) or for ``index``; values and densities in ``dtype`` (default:
        the parameters'), differentiable in every parameter."""
        idx = slice(None) if index is None else index
        loc, L = self._loc(idx), self.ref_scale[idx] @ self._cholesky(self.scale_raw[idx])
        if dtype is not None:
            loc, L = loc.to(dtype), L.to(dtype)
        if self.flow is None:
            return GaussianPosterior(loc, L, kind=self.kind)
        return FlowPosterior(loc, L, self.flow, self.context[idx], kind=self.kind)

    distribution = forward


def kl_to_prior(q: Distribution, prior: Distribution, n_samples: int = 64) -> Tensor:
    """KL(q_i ‖ p) per subject [N]: closed form for two Gaussians, else (1/S) Σ_s log q(η_s) − log p(η_s) with
    reparameterised draws η_s ~ q_i (differentiable; unbiased)."""
    if isinstance(q, MultivariateNormal) and isinstance(prior, MultivariateNormal):
        return kl_divergence(q, prior)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    eta = q.rsample((n_samples,)) if q.has_rsample else q.sample((n_samples,))
    return (q.log_prob(eta) - prior.log_prob(eta)).mean(0)
