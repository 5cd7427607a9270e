"""Predictions and residuals per observation: PRED, IPRED, RES, IRES, WRES, CWRES, IWRES.

* PRED = f(η = 0), IPRED = f(η̂); residuals on the likelihood scale (log scale for the exponential model).
* WRES (FO-based): C₀^{-1/2}(y − f₀), C₀ = G₀ΩG₀ᵀ + V₀ at η = 0 (symmetric inverse square root).
* CWRES (Hooker et al. 2007): C^{-1/2}(y − f(η̂) + Gη̂), C = GΩGᵀ + V(η̂), linearised at η̂.
* IWRES = (y − IPRED)/√V(η̂).
Censored records get NaN residuals. Batched over subjects: [N, J, J] per-subject covariance blocks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from nlmefit.marginal.autodiff import jacobian_sep
from nlmefit.memory import map_subjects

__all__ = ["prediction_table", "prediction_tensors"]


def _inv_sqrt_times(C: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(C)
    w = w.clamp_min(1e-300)
    return (V @ ((V.transpose(-1, -2) @ r.unsqueeze(-1)) / torch.sqrt(w).unsqueeze(-1))).squeeze(-1)


def _linearised(model, p, data, eta):
    e = eta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f, var = model.predict(p, e, data)
        G = jacobian_sep(f, e, create_graph=False)
    return f.detach(), var.detach(), G.detach()


def _weighted(model, p, data, f, var, G, eta) -> torch.Tensor:
    m = data.mask & (data.cens == 0)
    Om = model.prior_covariance(p, data.n_occ).detach()
    Gm = torch.where(m.unsqueeze(-1), G, torch.zeros_like(G))
    V = torch.where(m, var, torch.ones_like(var))
    C = Gm @ Om @ Gm.transpose(-1, -2) + torch.diag_embed(V)
    # padded / censored rows are decoupled (identity) so they do not disturb the observed ones
    C = torch.where((m.unsqueeze(-1) & m.unsqueeze(-2)) | torch.diag_embed(~m), C, torch.zeros_like(C))
    center = f - (G @ eta.unsqueeze(-1)).squeeze(-1)
    r = torch.where(m, data.y - center, torch.zeros_like(f))
    out = _inv_sqrt_times(C, r)
    return torch.where(m, out, torch.full_like(out, float("nan")))


def prediction_table(model, p, data, eta_hat, size: int | None = None, shard=None) -> pd.DataFrame:
    """One row per observation, keyed by the user's original row index (ROW). The per-subject linearisations run
    ``size`` subjects at a time (and rank by rank under ``shard``: :func:`nlmefit.memory.map_subjects`)."""
    with torch.no_grad():
        pd_ = p.detach()
    (cols,) = map_subjects(lambda d, e: (prediction_tensors(model, pd_, d, e),), data, eta_hat, size, shard)
    f0, fi, res, ires, wres, cwres, iwres = cols.unbind(-1)
    m = data.mask
    panel = data.panel
    mk = m.cpu().numpy()
    ids = np.broadcast_to(np.asarray(panel.ids)[:, None], mk.shape)
    err = model.error

    def nat(x):
        return err.untransform(x).cpu().numpy()[mk]

    table = pd.DataFrame({
        "ROW": panel.obs_row[mk],
        "ID": ids[mk],
        "TIME": panel.obs_time[mk],
        "DV": panel.dv[mk],
        "PRED": nat(f0),
        "IPRED": nat(fi),
        "RES": res.cpu().numpy()[mk],
        "IRES": ires.cpu().numpy()[mk],
        "WRES": wres.cpu().numpy()[mk],
        "CWRES": cwres.cpu().numpy()[mk],
        "IWRES": iwres.cpu().numpy()[mk],
        "CENS": data.cens.cpu().numpy()[mk],
    })
    return table.sort_values("ROW", kind="stable").reset_index(drop=True)


def prediction_tensors(model, p, data, eta_hat) -> torch.Tensor:
    """[N, J, 7]: PRED, IPRED (likelihood scale), RES, IRES, WRES, CWRES, IWRES of ``data``'s subjects."""
    zero = torch.zeros_like(eta_hat)
    f0, v0, G0 = _linearised(model, p, data, zero)
    fi, vi, Gi = _linearised(model, p, data, eta_hat)
    wres = _weighted(model, p, data, f0, v0, G0, zero)
    cwres = _weighted(model, p, data, fi, vi, Gi, eta_hat)
    unc = data.mask & (data.cens == 0)
    nan = torch.full_like(fi, float("nan"))
    iwres = torch.where(unc, (data.y - fi) / torch.sqrt(vi), nan)
    res = torch.where(unc, data.y - f0, nan)
    ires = torch.where(unc, data.y - fi, nan)
    return torch.stack([f0, fi, res, ires, wres, cwres, iwres], -1)
