"""Batched concentrations of S simulated subjects under one regimen, shared by regimen simulation and exposures.

A regimen is one template subject (its dose records and a time grid, :func:`template`); the S simulated subjects are
copies of it (:func:`copies`) with their own covariates, θ rows (:func:`slice_params`) and per-kg dose scaling, and
:func:`concentrations` predicts them in chunks — through the model, or by closed-form dose trains
(:mod:`nlmefit.pk.trains`).
"""
from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pandas as pd
import torch

from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params
from nlmefit.models.structure import ClosedForm
from nlmefit.panel import Panel
from nlmefit.pk.trains import train_concentration

__all__ = ["template", "copies", "broadcasts", "slice_params", "concentrations"]


def template(model: Model, records: pd.DataFrame, times: np.ndarray, cov_names, device) -> ModelData:
    """ModelData of one subject: ``records`` (dose rows, ID 1) + observation rows at ``times``, of the model's
    endpoint (``DVID = model.dvid`` on every row when the model has one)."""
    obs = pd.DataFrame({"ID": 1, "TIME": times.astype(float), "AMT": 0.0, "EVID": 0, "MDV": 0, "DV": np.nan})
    if "CMT" in records:
        obs_cmt = 2 if model.structure.oral else 1
        obs["CMT"] = obs_cmt
    recs = pd.concat([records.assign(ID=1), obs], ignore_index=True, sort=False)
    if getattr(model, "dvid", None) is not None:  # a model of one endpoint: the template observes that endpoint
        recs["DVID"] = model.dvid
    for c in ("RATE", "II", "ADDL", "SS"):
        if c in recs:
            recs[c] = recs[c].fillna(0.0)
    for n in cov_names:
        recs[n] = 0.0
    order = np.lexsort((-recs["EVID"].to_numpy(), recs["TIME"].to_numpy()))  # doses before observations
    recs = recs.iloc[order].reset_index(drop=True)
    panel = Panel.from_dataframe(recs, require_dv=False)
    return model.prepare(panel, device=device, check_likelihood=False)


def copies(data1: ModelData, cov: dict[str, torch.Tensor], dose_scale: torch.Tensor | None,
           s: int, broadcast: bool) -> ModelData:
    """S copies of a one-subject template with per-copy covariates [S, 1] and dose scaling [S] (mg/kg).

    Closed-form structures broadcast a one-subject design against [S, 1] parameters, so the design tensors stay
    [1, ...] (the dose-by-observation work is done once, not S times); other structures get expanded views."""
    ev = data1.events
    if not broadcast:
        ev = replace(ev, **{f.name: getattr(ev, f.name).expand(s, *getattr(ev, f.name).shape[1:]).contiguous()
                            for f in fields(ev)})
    if dose_scale is not None:
        sc = dose_scale.unsqueeze(-1)
        ev = replace(ev, dose_amt=ev.dose_amt * sc, dose_rate=torch.where(ev.dose_rate > 0, ev.dose_rate * sc,
                                                                             ev.dose_rate))

    def ex(t: torch.Tensor) -> torch.Tensor:
        return t.expand(s, *t.shape[1:])

    return replace(data1, events=ev, y=ex(data1.y), mask=ex(data1.mask), cens=ex(data1.cens),
                   limit=ex(data1.limit), occ=ex(data1.occ), cov={k: cov[k] for k in data1.cov})


def broadcasts(model: Model) -> bool:
    """Whether the model's structure broadcasts a one-subject design against per-subject parameters."""
    return isinstance(model.structure, ClosedForm)


def slice_params(p: Params, sl: slice) -> Params:
    """The rows ``sl`` of per-subject θ (scalar θ, Ω and σ shared)."""
    th = {k: (v[sl] if v.dim() else v) for k, v in p.theta.items()}
    return Params(th, p.omega, p.sigma, p.omega_iov)


def concentrations(model, p, eta, cov_t, scale, recs, times: np.ndarray, trains, chunk: int,
                   residual: bool = False, gen=None, allow_negative: bool = False) -> np.ndarray:
    """DV-scale predictions [S, T] at ``times`` (in the given order) for the S simulated subjects, in chunks;
    by dose trains when ``trains`` is given, else through the model on a one-subject template.

    With ``residual`` a residual error is drawn for every value; draws below 0 (additive or proportional error)
    are set to 0 (censored at 0, as an assay would report them) unless ``allow_negative``."""
    s = eta.shape[0]
    dev = eta.device
    cov_names = list(cov_t)
    if trains is None:
        tmpl = template(model, recs, times, cov_names, dev)
        back = np.empty(len(times), dtype=int)  # the template holds its observation rows in time order
        back[np.argsort(times, kind="stable")] = np.arange(len(times))
    else:
        one = template(model, recs, times[:1], cov_names, dev)  # covariates/params plumbing only
        t_t = torch.as_tensor(np.asarray(times, dtype=float), dtype=torch.float64, device=dev)
    out = np.empty((s, len(times)))
    bc = broadcasts(model)
    with torch.no_grad():
        for a in range(0, s, chunk):  # chunks of copies bound memory; each chunk is one batched call
            sl = slice(a, min(s, a + chunk))
            cv = {k: v[sl] for k, v in cov_t.items()}
            sc = None if scale is None else scale[sl]
            pc = slice_params(p, sl)
            if trains is None:
                d = copies(tmpl, cv, sc, sl.stop - sl.start, bc)
                f, var = model.predict(pc, eta[sl], d)
                f, var = f[:, back], var[:, back]
            else:
                d = copies(one, cv, None, sl.stop - sl.start, bc)
                ind = model.individual_parameters(pc, eta[sl], d)
                conc = train_concentration(ind, trains, t_t, model.structure.ncmt, sc)
                f = model.error.transform(conc.clamp_min(1e-300)) if model.error.log_scale else conc
                var = model.error.variance(f, pc.sigma).expand_as(f)
            if residual:
                f = f + torch.sqrt(var) * torch.randn(f.shape, generator=gen, dtype=f.dtype, device=f.device)
            f = model.error.untransform(f)
            if residual and not allow_negative:
                f = f.clamp_min(0.0)
            out[sl] = f.cpu().numpy()
    return out
