"""Replicates of the fitted data set simulated from the fitted model: the raw material of NPDE and (pc)VPC.

For replicate r, subject i and observation j (the design, doses and covariates of the data, the parameters of the
fit)::

    η_i^(r) ~ N(0, Ω),   y_ij^(r) = g⁻¹( f_ij(η_i^(r)) + √V_ij(η_i^(r)) · ε_ij^(r) ),   ε ~ N(0, 1)

with f, V on the likelihood scale (:meth:`nlmefit.Model.predict`) and g⁻¹ the error model's back-transform (exp for
the exponential model), so values are on the DV scale. All η and ε are drawn up front from one seeded
``torch.Generator``; predictions are evaluated in chunks of replicates, so memory is bounded and the draws do not
depend on the chunk size.

Censoring. Replicates are simulated uncensored and then censored at the observation's lower limit of
quantification ("simulate, then censor", as in PsN and the npde/vpc R packages). The limit of an observation is
:func:`observation_lloq`: a user-given ``lloq``, else the record's own limit (CENS = 1), else the largest limit of
the subject's censored records, else the median limit of all censored records of the data.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from nlmefit.progress import progress_bar

__all__ = ["simulate_replicates", "observation_lloq", "fit_parts"]

_BUDGET = 1 << 24  # elements of the largest [R_chunk, N, J, D] intermediate of a chunk


def fit_parts(fit: Any, data=None):
    """``(model, params, model_data)`` of a FitResult; ``data`` (DataFrame or Panel) replaces the fitted data."""
    model = getattr(fit, "model", None)
    if model is None:
        raise ValueError("this FitResult has no model attached (it was read from JSON?): simulation-based "
                         "diagnostics need FitResult.from_json(path, model=...) and data")
    if data is not None:
        mdata = model.prepare(data, check_likelihood=False)
    else:
        mdata = getattr(fit, "data", None)
        if mdata is None:
            raise ValueError("this FitResult carries no data (it was read from JSON?): pass data= (the DataFrame "
                             "or Panel that was fitted)")
    dev = mdata.y.device
    p = fit.population_parameters(dtype=mdata.y.dtype, device=dev)
    return model, p, mdata


def observation_lloq(data, lloq: float | None = None) -> np.ndarray:
    """Lower limit of quantification per observation, ``[N, J]`` on the DV scale (NaN where there is none).

    ``lloq`` given: that value everywhere. Otherwise a censored record (CENS = 1) has its own limit, an uncensored
    record the largest limit of its subject's censored records or, for a subject without any, the median limit of
    the data's censored records; without censored records there is no limit (all NaN)."""
    mask = data.mask.cpu().numpy()
    if lloq is not None:
        return np.where(mask, float(lloq), np.nan)
    cens = data.cens.cpu().numpy()
    lim = np.asarray(data.panel.limit, dtype=float)
    below = mask & (cens == 1) & np.isfinite(lim)
    if not below.any():
        return np.full(mask.shape, np.nan)
    subj = np.where(below, lim, -np.inf).max(axis=1)  # [N]
    subj = np.where(np.isfinite(subj), subj, np.median(lim[below]))
    out = np.where(below, lim, subj[:, None])
    return np.where(mask, out, np.nan)


def _chunk_size(data, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    n, j = data.y.shape
    d = max(1, int(data.events.dose_time.shape[-1])) if hasattr(data.events, "dose_time") else 1
    return max(1, _BUDGET // max(1, n * j * d))


def simulate_replicates(
    fit: Any,
    n_rep: int,
    seed: int | None = 0,
    residual: bool = True,
    data=None,
    chunk: int | None = None,
    return_blq: bool = False,
    lloq: float | None = None,
    progress: bool | None = None,
):
    """``n_rep`` replicates of the data under the fitted model: ``[R, N, J]`` on the DV scale, NaN off the mask.

    ``residual=False`` gives individual predictions g⁻¹(f(η)) without residual error. ``data`` (DataFrame or
    Panel) replaces the fitted data set (e.g. an external validation set). ``chunk``: replicates per prediction
    call (default: bounded by memory). With ``return_blq=True`` the result is ``(y, blq)`` where ``blq[r, i, j]``
    says the simulated value lies below the observation's LLOQ (:func:`observation_lloq`; all False when the data
    has no censoring and no ``lloq`` is given). The values themselves are returned uncensored. ``progress``: a bar
    over the replicates (None: automatic, :mod:`nlmefit.progress`).
    """
    if n_rep < 1:
        raise ValueError(f"n_rep must be at least 1, got {n_rep}")
    model, p, mdata = fit_parts(fit, data)
    y = _simulate(model, p, mdata, int(n_rep), seed, residual, chunk, progress)
    if not return_blq:
        return y
    lim = observation_lloq(mdata, lloq)
    with np.errstate(invalid="ignore"):
        blq = np.isfinite(lim)[None] & (y < lim[None])
    return y, blq


def _simulate(model, p, data, n_rep: int, seed: int | None, residual: bool = True,
              chunk: int | None = None, progress: bool | None = False, desc: str = "replicates") -> np.ndarray:
    """The batched simulation behind :func:`simulate_replicates` (model, Params and ModelData given); ``progress``:
    a bar over the replicates, updated per chunk."""
    dev, dt = data.y.device, data.y.dtype
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    n, j = data.y.shape
    size = _chunk_size(data, chunk)
    out = np.empty((n_rep, n, j))
    with torch.no_grad(), progress_bar(n_rep, desc, "rep", enabled=progress, leave=False) as bar:
        eta = model.sample_eta(p, n, data.n_occ, generator=gen, size=(n_rep,))  # [R, N, q]
        eps = torch.randn(n_rep, n, j, generator=gen, dtype=dt, device=dev) if residual else None
        for s in range(0, n_rep, size):  # chunks of replicates bound the [R, N, J, D] intermediates
            f, var = model.predict(p, eta[s:s + size], data)
            if residual:
                f = f + torch.sqrt(var) * eps[s:s + size]
            out[s:s + size] = model.error.untransform(f).cpu().numpy()
            bar.update(min(size, n_rep - s))
    out[:, ~data.mask.cpu().numpy()] = np.nan
    return out
