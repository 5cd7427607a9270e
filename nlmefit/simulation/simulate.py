"""``nlmefit.simulate``: draw η ~ N(0, Ω) and y | η from a model, in the user's own record layout.

Given a DataFrame (NONMEM event records; DV may be missing), the result is that frame repeated ``n`` times
(column ``REP``, 1-based) with DV replaced by simulated values on observation records and everything else —
row order included — untouched. A model of one endpoint (``Model(..., dvid=...)``) simulates only that endpoint's
observation rows: other endpoints' rows keep their observed DV (``other_endpoints="keep"``, default) or are
dropped (``"drop"``); they never receive this model's values. Given a design (``times`` + ``doses`` +
``n_subjects``), the records are built first (:func:`design_frame`). All replicates and subjects are drawn in one
batched tensor program — or, with ``out=`` (a folder), in chunks of subjects streamed to part files, sharded over
ranks (:mod:`nlmefit.simulation.stream`).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.model import Model
from nlmefit.models.parameters import Params
from nlmefit.panel import Panel
from nlmefit.progress import progress_bar
from nlmefit.simulation.stream import StreamedSimulation, simulate_chunks

__all__ = ["simulate", "design_frame", "resolve_params"]


def resolve_params(model: Model, params) -> Params:
    """Params from None (the model's initial values), a dict of reporting names, a FitResult, or Params."""
    if params is None:
        return model.initial_params()
    if isinstance(params, Params):
        return params
    est = getattr(params, "estimates", None)
    if est is not None:  # a FitResult: scalar estimates, tensor-valued weights at full precision
        p = model.parameters.params_from_dict(est.to_dict())
        p.weights.update({k: v.to(torch.float64) for k, v in (getattr(params, "weights", None) or {}).items()})
        return p
    if isinstance(params, Mapping):
        return model.parameters.params_from_dict(params)
    raise ModelSpecError(f"params must be a dict, FitResult or Params, got {type(params).__name__}")


def design_frame(
    times: Sequence[float],
    doses: Iterable[Mapping[str, float]],
    n_subjects: int = 1,
    covariates: pd.DataFrame | Mapping[str, Sequence[float]] | None = None,
    obs_cmt: int | None = None,
) -> pd.DataFrame:
    """NONMEM records for ``n_subjects`` identical designs: dose records (keys TIME, AMT and optional CMT, RATE,
    II, ADDL, SS) then observation records at ``times``. Covariates: one row (or value) per subject."""
    doses = [dict(d) for d in doses]
    for d in doses:
        missing = {"TIME", "AMT"} - {k.upper() for k in d}
        if missing:
            raise ModelSpecError(f"dose {d} lacks {sorted(missing)}")
    rows = []
    for d in doses:
        r = {k.upper(): float(v) for k, v in d.items()}
        r.update(EVID=1, MDV=1, DV=np.nan)
        rows.append(r)
    for t in times:
        r = {"TIME": float(t), "AMT": 0.0, "EVID": 0, "MDV": 0, "DV": np.nan}
        if obs_cmt is not None:
            r["CMT"] = obs_cmt
        rows.append(r)
    one = pd.DataFrame(rows).fillna({c: 0.0 for c in ("RATE", "II", "ADDL", "SS", "CMT") if c in
                                     {k for r in rows for k in r}})
    if "CMT" in one and obs_cmt is None:
        one.loc[one["EVID"] == 0, "CMT"] = one.loc[one["EVID"] == 1, "CMT"].max() + 1 if (
            one["CMT"].max() == 1) else one["CMT"].max()
    one = one.sort_values(["TIME", "EVID"], ascending=[True, False], kind="stable")
    frames = []
    for i in range(n_subjects):
        f = one.copy()
        f.insert(0, "ID", i + 1)
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    if covariates is not None:
        cov = pd.DataFrame(covariates) if not isinstance(covariates, pd.DataFrame) else covariates.copy()
        if len(cov) == 1:
            cov = pd.concat([cov] * n_subjects, ignore_index=True)
        if len(cov) != n_subjects:
            raise ModelSpecError(f"covariates has {len(cov)} rows for {n_subjects} subjects")
        cov = cov.reset_index(drop=True)
        cov["ID"] = np.arange(1, n_subjects + 1)
        out = out.merge(cov, on="ID", how="left")
    return out


def simulate(
    model: Model,
    params=None,
    data: pd.DataFrame | None = None,
    *,
    n: int = 1,
    seed: int | None = None,
    residual: bool = True,
    times: Sequence[float] | None = None,
    doses: Iterable[Mapping[str, float]] | None = None,
    n_subjects: int = 1,
    covariates=None,
    device=None,
    other_endpoints: str = "keep",
    progress: bool | None = None,
    out: str | os.PathLike | None = None,
    chunk_size: int | None = None,
    format: str = "csv",
    **column_map,
) -> pd.DataFrame | StreamedSimulation:
    """Simulate ``n`` replicates of ``data`` (or of a design) from ``model`` at ``params``.

    Returns the records with a ``REP`` column and simulated ``DV`` on the observation rows of the model's endpoint
    (natural scale). Observation rows of other endpoints (another DVID than ``model.dvid``) keep their DV
    (``other_endpoints="keep"``) or are left out (``"drop"``). Reproducible: the same ``seed`` gives the same draws.
    ``progress``: a bar over the replicates' output frames (None: automatic, :mod:`nlmefit.progress`).

    **Streamed** (``out`` a folder): subjects in chunks of ``chunk_size`` (default: about 4 million values per
    chunk), each chunk's ``n`` replicates of its subjects' records written to ``out/part-00000.csv`` …
    (``format="parquet"``: ``.parquet``, needs pyarrow) and a ``manifest.json``; returns a
    :class:`~nlmefit.simulation.stream.StreamedSimulation` (paths, rows, chunks) instead of the DataFrame. Under
    several ranks (:mod:`nlmefit.parallel`) chunk c is simulated and written by rank c % world. Chunk c draws from
    its own generator (chunk 0: ``seed``; c ≥ 1: ``SeedSequence([seed, c])``), so the part files are the same
    whatever the number of ranks, and one chunk reproduces the in-memory result exactly
    (:mod:`nlmefit.simulation.stream`).
    """
    if other_endpoints not in ("keep", "drop"):
        raise ModelSpecError(f"other_endpoints must be 'keep' (their rows keep the observed DV) or 'drop', "
                             f"got {other_endpoints!r}")
    if data is None:
        if times is None or doses is None:
            raise ModelSpecError("give either data (a DataFrame of records) or a design: times= and doses=")
        data = design_frame(times, doses, n_subjects, covariates)
    if n < 1:
        raise ModelSpecError(f"n must be at least 1, got {n}")
    panel = data if isinstance(data, Panel) else Panel.from_dataframe(data, require_dv=False, **column_map)
    frame = panel.to_dataframe() if isinstance(data, Panel) else data
    mdata = model.prepare(panel, device=device, check_likelihood=False)
    p = resolve_params(model, params)
    p = Params({k: v.to(mdata.y.device) for k, v in p.theta.items()}, p.omega.to(mdata.y.device),
               {k: v.to(mdata.y.device) for k, v in p.sigma.items()},
               None if p.omega_iov is None else p.omega_iov.to(mdata.y.device))
    if out is not None:
        return simulate_chunks(model, p, panel, frame, mdata, n=n, seed=seed, residual=residual,
                               other_endpoints=other_endpoints, out=out, chunk_size=chunk_size, format=format,
                               progress=progress)
    if chunk_size is not None:
        raise ModelSpecError("chunk_size applies to a streamed simulation: give out= (a folder) too")
    gen = torch.Generator(device=mdata.y.device)
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    with torch.no_grad():
        eta = model.sample_eta(p, mdata.n_subjects, mdata.n_occ, generator=gen, size=(n,))
        y = model.sample_y(p, eta, mdata, generator=gen, residual=residual).cpu().numpy()  # [n, N, J]
    mk = mdata.mask.cpu().numpy()  # this model's endpoint only (Model.prepare applies dvid)
    rows = panel.obs_row[mk]
    dv_col = panel.columns.get("DV", "DV") if hasattr(panel, "columns") else "DV"
    out = []
    base = frame.reset_index(drop=True)
    other = panel.obs_row[panel.obs_mask & ~mk]  # observation rows of other endpoints
    bar = progress_bar(n, "simulate", "rep", enabled=progress, leave=False)
    for r in range(n):  # replicates only: assembling output frames, not a hot path
        f = base.copy()
        if dv_col not in f:
            f[dv_col] = np.nan
        f[dv_col] = f[dv_col].astype(float)
        f.loc[rows, dv_col] = y[r][mk]
        if other_endpoints == "drop" and len(other):
            f = f.drop(index=other)
        f.insert(0, "REP", r + 1)
        out.append(f)
        bar.update(1)
    bar.close()
    return pd.concat(out, ignore_index=True)
