"""Amortized posterior family: an encoder maps a subject's panel to the variational parameters of q_i.

    (m_i, L_i, c_i) = encoder(panel_i),    q_i = law of m_i + L_i g(ξ; c_i),  ξ ~ N(0, I_q)

with g the shared flow of :class:`~nlmefit.posteriors.flows.FlowFamily` (identity for ``gaussian``). The panel of
subject i is a *set* of tokens, one per observation (time, value, censoring flag) and one per dose (time, amount),
each carrying its own time; baseline covariates join after pooling.

Why a set encoder with attention pooling (DeepSets + attention, not a GRU): sampling times are irregular and the
number of records varies; each token carries its time, so order is information the token already has and the
encoder need not be sequential. A per-token MLP, masked multi-head attention pooling plus masked mean pooling
is permutation-invariant, handles padding by masks alone, and runs over the padded [N, J + D] tensors in one
batched pass (a GRU would be J + D sequential steps and sensitive to the padding order). Pooling by attention
lets the encoder pick the informative records (e.g. the peak), which a plain mean cannot.

Features are standardised with scales fixed when the family is built (time: the largest observation time;
values: the SD of the observed values; amounts: the largest dose; covariates: mean and SD), kept as persistent
buffers, so the same encoder applied to new subjects sees the same scaling (``for_data``).

Initialisation: the output layer starts at zero weight with its bias at the mean target, then
:meth:`AmortizedFamily.warm_start` regresses the encoder's (m_i, log-diag and strict lower triangle of L_i)
onto given per-subject targets (the Laplace posterior at the initial θ) by full-batch Adam for a few hundred
steps, so q_i starts near N(η̂_i, H_i⁻¹) as in per-subject VEM. The flow's last layers start at zero (g = identity).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from nlmefit.posteriors.flows import FlowFamily, FlowPosterior
from nlmefit.posteriors.gaussian import GaussianPosterior

__all__ = ["PanelEncoder", "AmortizedFamily", "panel_tokens"]

N_TOKEN_FEATURES = 7  # time, value, asinh(value), log-amount, is-observation, is-dose, censoring flag


def panel_tokens(data, scales: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [N, J + D, 7], token mask [N, J + D], covariates [N, C]) of bound data (ObservationData or
    ModelData), standardised by ``scales`` (see :func:`feature_scales`)."""
    y, mask = data.y, data.mask
    dt = torch.float64
    events = getattr(data, "events", None)
    n, j = y.shape
    t_obs = events.obs_time.to(dt) if events is not None else torch.arange(j, dtype=dt, device=y.device).expand(n, j)
    m = mask.to(dt)
    obs = torch.stack([t_obs / scales["t"], (y.to(dt) - scales["y_mean"]) / scales["y_sd"],
                       torch.asinh(y.to(dt) / scales["y_abs"]), torch.zeros_like(m),
                       torch.ones_like(m), torch.zeros_like(m), data.cens.to(dt)], -1) * m.unsqueeze(-1)
    parts, masks = [obs], [mask]
    if events is not None and events.dose_time.shape[-1] > 0:
        dm = events.dose_mask
        d = dm.to(dt)
        amt = torch.log1p(events.dose_amt.to(dt).clamp_min(0) / scales["amt"])
        dose = torch.stack([events.dose_time.to(dt) / scales["t"], torch.zeros_like(d), torch.zeros_like(d), amt,
                            torch.zeros_like(d),
                            torch.ones_like(d), torch.zeros_like(d)], -1) * d.unsqueeze(-1)
        parts.append(dose)
        masks.append(dm)
    cov = _covariates(data)
    if cov.shape[-1]:
        cov = (cov - scales["cov_mean"]) / scales["cov_sd"]
    return torch.cat(parts, 1), torch.cat(masks, 1), cov


def _covariates(data) -> Tensor:
    """Baseline covariates [N, C] (the first record's value of each, sorted by name)."""
    cov = getattr(data, "cov", None) or {}
    n = data.y.shape[0]
    cols = [torch.as_tensor(cov[k]).to(torch.float64).reshape(n, -1)[:, 0] for k in sorted(cov)]
    if not cols:
        return torch.zeros(n, 0, dtype=torch.float64, device=data.y.device)
    return torch.stack(cols, -1)


def feature_scales(data) -> dict[str, Tensor]:
    """The standardisation constants of the training data (persisted with the encoder)."""
    kw = dict(dtype=torch.float64, device=data.y.device)
    m = data.mask & (data.cens == 0)
    yv = data.y[m].to(torch.float64) if bool(m.any()) else torch.zeros(1, **kw)
    events = getattr(data, "events", None)
    t = events.obs_time[data.mask].to(torch.float64) if events is not None else torch.tensor([data.y.shape[1]], **kw)
    tmax = t.abs().max() if t.numel() else torch.tensor(1.0, **kw)
    amt = events.dose_amt[events.dose_mask].to(torch.float64) if events is not None else torch.ones(1, **kw)
    cov = _covariates(data)
    sd = cov.std(0) if cov.shape[0] > 1 and cov.shape[1] else torch.ones(cov.shape[1], **kw)
    return {"t": torch.clamp(tmax, min=1e-8), "y_mean": yv.mean(), "y_sd": torch.clamp(yv.std(), min=1e-8)
            if yv.numel() > 1 else torch.tensor(1.0, **kw),
            "y_abs": torch.clamp(yv.abs().median(), min=1e-8),
            "amt": torch.clamp(amt.abs().max(), min=1e-8) if amt.numel() else torch.tensor(1.0, **kw),
            "cov_mean": cov.mean(0), "cov_sd": torch.where(sd > 1e-12, sd, torch.ones_like(sd))}


class PanelEncoder(nn.Module):
    """Set encoder: per-token MLP → masked attention pooling (``heads`` heads) and masked mean → MLP with the
    covariates and log record counts → ``n_out`` outputs. Permutation-invariant in the tokens; padding is masked."""

    def __init__(self, n_cov: int, n_out: int, hidden: int = 64, heads: int = 4, dtype=torch.float64) -> None:
        super().__init__()
        self.heads = heads
        self.phi = nn.Sequential(nn.Linear(N_TOKEN_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))
        self.score = nn.Linear(hidden, heads)
        self.rho = nn.Sequential(nn.Linear(hidden * (heads + 1) + n_cov + 2, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, n_out)
        self.to(dtype)

    def forward(self, tokens: Tensor, mask: Tensor, cov: Tensor) -> Tensor:
        h = self.phi(tokens)  # [N, T, H]
        m = mask.unsqueeze(-1)
        s = self.score(h).masked_fill(~m, -math.inf)  # [N, T, heads]
        w = torch.softmax(s, 1).nan_to_num(0.0)  # a subject without records pools to zero
        att = torch.einsum("nth,ntk->nkh", h, w).flatten(1)
        cnt = m.sum(1).to(h.dtype)
        mean = (h * m).sum(1) / cnt.clamp_min(1.0)
        n_obs = (mask[:, :, None] & (tokens[..., 4:5] > 0)).sum(1).to(h.dtype)
        z = torch.cat([att, mean, cov.to(h.dtype), torch.log1p(n_obs), torch.log1p(cnt - n_obs)], -1)
        return self.out(self.rho(z))


class AmortizedFamily(nn.Module):
    """q_i from an encoder of subject i's panel: ``forward(index)`` gives the distribution of the bound subjects
    (all or ``index``), like :class:`FlowFamily`, but every variational parameter is a function of the data, so
    :meth:`for_data` gives the posterior of new subjects without optimisation.

    Built from bound training data (``bind``); ``kind`` ``gaussian`` | ``maf`` | ``nsf``; ``flow_options`` as for
    FlowFamily; ``hidden``/``heads`` size the encoder. The encoder outputs q + q² + d_c numbers per subject: m_i,
    the raw Cholesky (strict lower triangle as is, log-diagonal) and, for flows, the context c_i."""

    def __init__(self, kind: str, data, q: int, *, hidden: int = 64, heads: int = 4, context_dim: int = 8,
                 flow_hidden: Sequence[int] = (32, 32), transforms: int = 2, bins: int = 8,
                 passes: int | None = None) -> None:
        super().__init__()
        shell = FlowFamily(kind, 1, q, context_dim=context_dim, hidden=flow_hidden, transforms=transforms, bins=bins,
                           passes=passes)
        self.kind, self.q = kind, int(q)
        self.flow: nn.Module | None = shell.flow
        self.context_dim = context_dim if shell.flow is not None else 0
        for name, val in feature_scales(data).items():
            self.register_buffer("scale_" + name, val.detach().clone())
        n_cov = int(self.scale_cov_mean.numel())
        self.encoder = PanelEncoder(n_cov, q + q * q + self.context_dim, hidden=hidden, heads=heads)
        nn.init.zeros_(self.encoder.out.weight)
        nn.init.zeros_(self.encoder.out.bias)
        self.register_buffer("_tril", torch.tril(torch.ones(q, q, dtype=torch.bool), -1), persistent=False)
        self.bind(data)

    @property
    def scales(self) -> dict[str, Tensor]:
        return {k[6:]: v for k, v in self.named_buffers() if k.startswith("scale_")}

    def bind(self, data) -> AmortizedFamily:
        """Featurise ``data`` (bound ObservationData/ModelData) as the subjects ``forward`` refers to."""
        self._tokens, self._mask, self._cov = panel_tokens(data, self.scales)
        self.n_subjects = int(data.y.shape[0])
        return self

    def _split(self, out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        q = self.q
        loc, raw = out[:, :q], out[:, q:q + q * q].reshape(-1, q, q)
        low = torch.where(self._tril, raw, torch.zeros_like(raw))
        L = low + torch.diag_embed(torch.exp(torch.diagonal(raw, dim1=-2, dim2=-1)))
        return loc, L, (out[:, q + q * q:] if self.flow is not None else None)

    def parameters_of(self, tokens: Tensor, mask: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(m [N, q], L [N, q, q], context [N, d_c] or None) for featurised subjects."""
        return self._split(self.encoder(tokens, mask, cov))

    def _dist(self, loc: Tensor, L: Tensor, ctx: Tensor | None) -> Distribution:
        if self.flow is None:
            return GaussianPosterior(loc, L, kind=self.kind)
        return FlowPosterior(loc, L, self.flow, ctx, kind=self.kind)

    def forward(self, index: Tensor | slice | Sequence[int] | None = None) -> Distribution:
        idx = slice(None) if index is None else index
        return self._dist(*self.parameters_of(self._tokens[idx], self._mask[idx], self._cov[idx]))

    distribution = forward

    def for_data(self, data) -> Distribution:
        """q_i of the subjects of ``data`` (bound data, same model) from the trained encoder: no optimisation."""
        return self._dist(*self.parameters_of(*panel_tokens(data, self.scales)))

    def warm_start(self, loc: Tensor, scale_tril: Tensor, steps: int = 500, lr: float = 0.01) -> float:
        """Regress the encoder's (m_i, log-diag L_i, strict lower L_i) onto targets (e.g. the Laplace posterior)
        by full-batch Adam with a cosine-decayed rate; the output bias starts at the target means. Returns the
        final standardised MSE."""
        q = self.q
        diag = torch.log(torch.diagonal(scale_tril, dim1=-2, dim2=-1))
        raw = torch.tril(scale_tril, -1) + torch.diag_embed(diag)
        target = torch.cat([loc, raw.reshape(-1, q * q)], -1).detach()
        mu, sd = target.mean(0), target.std(0) if target.shape[0] > 1 else torch.ones(target.shape[1])
        sd = torch.where(sd > 1e-6, sd, torch.ones_like(sd))
        with torch.no_grad():
            self.encoder.out.bias[:q + q * q] = mu
        params = [p for n, p in self.encoder.named_parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        loss = torch.tensor(0.0)
        for k in range(steps):
            opt.param_groups[0]["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * k / max(1, steps)))
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = self.encoder(self._tokens, self._mask, self._cov)[:, :q + q * q]
                loss = (((out - target) / sd) ** 2).mean()
                loss.backward()
            opt.step()
        return float(loss.detach())
