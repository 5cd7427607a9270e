"""Case-resampling bootstrap of a classical (FO, FOCE, FOCE-I, Laplace) fit: ``nlmefit.bootstrap(fit, n=200)``.

Resampling. Subjects are the independent units, so a resample draws N subjects with replacement from the N
fitted (a subject drawn twice is two subjects of the resample, each with its own η). With ``stratify="COV"`` the
draw is made within each level of the baseline covariate COV, so every resample keeps each level's count.

Refits. Every resample b is refitted by the estimator that made the fit (same approximation, ``Conditional(
method_key, inner_tol)``, same L-BFGS-B options), started at the original estimates θ̂ and with the modes
warm-started at the original η̂ of the subjects drawn. The B refits are independent problems and run in lockstep
with one batched objective per step (:func:`nlmefit.estimators.multistart.replica_minimize`): the resampled
subjects of all pending replicas form one data set of Σ_b N virtual subjects, each carrying its replica's
parameters, so one call of the linearisation and one backward pass give every replica's OFV and gradient. Replicas
run in chunks of ``batch`` (default: as many as fit in ~200 000 virtual subjects). A refit whose final OFV is not
finite or whose optimiser did not report success is counted as failed: it is reported (``success`` column,
``success_rate``) and left out of the intervals.

Intervals (level 1 − α, from the B' successful estimates θ*_b of a parameter θ with original estimate θ̂):

* percentile: [q(α/2), q(1 − α/2)], q the empirical quantile of the θ*_b;
* BCa (Efron 1987, J Am Stat Assoc 82:171): [q(α₁), q(α₂)] with
  α_k = Φ(z₀ + (z₀ + z_k) / (1 − a (z₀ + z_k))), z₁ = Φ⁻¹(α/2), z₂ = Φ⁻¹(1 − α/2);
  bias correction z₀ = Φ⁻¹((#{θ*_b < θ̂} + ½ #{θ*_b = θ̂}) / B');
  acceleration a = Σ_i (θ̄₍.₎ − θ₍ᵢ₎)³ / (6 [Σ_i (θ̄₍.₎ − θ₍ᵢ₎)²]^{3/2}) from the jackknife: θ₍ᵢ₎ is the refit
  without subject i, θ̄₍.₎ their mean. The N leave-one-subject-out refits run in the same lockstep as the
  resamples (replica j = every subject but j); failed ones are left out;
* bootstrap SE = sd(θ*_b) (ddof 1); bias = mean(θ*_b) − θ̂.

Several ranks (``nlmefit bootstrap ... --workers K`` or torchrun, :mod:`nlmefit.parallel`): every rank draws
the same resamples (same seed) and refits every K-th of them; the rows are summed over ranks (each row filled on
one rank), so the table and intervals are those of one process, on every rank.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from nlmefit import parallel
from nlmefit._io import atomic_csv
from nlmefit.errors import DataError, EstimationError, ModelSpecError
from nlmefit.estimators.base import get_estimator
from nlmefit.estimators.multistart import replica_minimize
from nlmefit.progress import progress_bar
from nlmefit.threads import check_threads, limit_threads, resolve_threads

logger = logging.getLogger(__name__)

__all__ = ["bootstrap", "BootstrapResult", "resample_subjects", "SUPPORTED_METHODS"]

SUPPORTED_METHODS = ("fo", "foce", "focei", "laplace")
VIRTUAL_SUBJECTS = 200_000  # default chunk: replicas × subjects per lockstep batch
_ESTIMATOR_OPTIONS = ("maxiter", "gtol", "inner_tol", "hessian")


@dataclass(frozen=True)
class BootstrapResult:
    """What :func:`bootstrap` produced.

    ``estimates``: one row per resample (``resample``, the free parameters on the natural scale by reporting name,
    ``ofv``, ``n_iter``, ``success``); ``intervals``: one row per parameter (``estimate`` = original, ``median``,
    ``se``, ``bias``, ``pct_low``/``pct_high``, and with BCa ``bca_low``/``bca_high``, ``z0``, ``acceleration``);
    ``jackknife``: the leave-one-subject-out estimates (BCa), else None."""

    estimates: pd.DataFrame
    intervals: pd.DataFrame
    success_rate: float
    elapsed_s: float
    n: int
    ci: float
    method: str
    stratify: str | None
    seed: int
    original: pd.Series
    jackknife: pd.DataFrame | None = None

    @property
    def parameters(self) -> list[str]:
        return list(self.intervals["parameter"])

    def __repr__(self) -> str:
        return (f"<BootstrapResult {self.method}: {self.n} resamples, {100 * self.success_rate:.0f}% successful, "
                f"{100 * self.ci:g}% intervals, {self.elapsed_s:.1f} s>")

    def summary_text(self, decimals: int = 4) -> str:
        """The interval table and the success rate, as printed by ``nlmefit bootstrap``."""
        ok = int(self.estimates["success"].sum())
        strat = f", stratified on {self.stratify}" if self.stratify else ""
        head = (f"Bootstrap ({self.method}, {self.n} resamples{strat}): {ok}/{self.n} refits successful "
                f"({100 * self.success_rate:.1f}%), {self.elapsed_s:.1f} s; "
                f"{100 * self.ci:g}% intervals")
        table = self.intervals.to_string(index=False, float_format=lambda v: f"{v:.{decimals}g}")
        return head + "\n" + table

    def plot(self, params: list[str] | None = None, ncols: int = 3, bins: int = 30):
        """Histogram grid of the successful bootstrap estimates: original estimate (solid), percentile interval
        (dashed) and BCa interval (dotted) marked. Returns the matplotlib Figure (never shown)."""
        # matplotlib is imported only when plotting
        import matplotlib.pyplot as plt

        names = list(params or self.parameters)
        ok = self.estimates[self.estimates["success"]]
        iv = self.intervals.set_index("parameter")
        nc = max(1, min(ncols, len(names)))
        nrows = max(1, math.ceil(len(names) / nc))
        fig, axes = plt.subplots(nrows, nc, figsize=(3.2 * nc, 2.5 * nrows), squeeze=False)
        for ax, name in zip(axes.ravel(), names):
            x = ok[name].to_numpy(float)
            ax.hist(x[np.isfinite(x)], bins=bins, color="0.75", edgecolor="white")
            ax.axvline(iv.loc[name, "estimate"], color="k", lw=1.5, label="estimate")
            for k, col in enumerate(("pct_low", "pct_high")):
                ax.axvline(iv.loc[name, col], color="C0", ls="--", lw=1, label="percentile" if k == 0 else None)
            if "bca_low" in iv.columns:
                for k, col in enumerate(("bca_low", "bca_high")):
                    ax.axvline(iv.loc[name, col], color="C1", ls=":", lw=1.2, label="BCa" if k == 0 else None)
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[len(names):]:
            ax.set_visible(False)
        axes.ravel()[0].legend(fontsize=7, frameon=False)
        fig.suptitle(f"bootstrap ({self.method}): {len(ok)}/{self.n} successful, {100 * self.ci:g}% intervals",
                     fontsize=9)
        fig.tight_layout()
        return fig

    def to_csv(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``bootstrap_estimates.csv`` and ``bootstrap_intervals.csv`` (and ``bootstrap_jackknife.csv`` with
        BCa) into ``folder``, each atomically. Returns the paths."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        frames = {"bootstrap_estimates.csv": self.estimates, "bootstrap_intervals.csv": self.intervals}
        if self.jackknife is not None:
            frames["bootstrap_jackknife.csv"] = self.jackknife
        paths = []
        for name, df in frames.items():
            atomic_csv(df, out / name)
            paths.append(out / name)
        return paths


def resample_subjects(n_subjects: int, n: int, rng: np.random.Generator,
                      strata: np.ndarray | None = None) -> np.ndarray:
    """[n, N] subject positions drawn with replacement; with ``strata`` (one level per subject) each level's
    subjects are drawn from that level only, so every row keeps each level's count (levels in sorted order)."""
    if strata is None:
        return rng.integers(0, n_subjects, size=(n, n_subjects))
    strata = np.asarray(strata)
    parts = [rng.choice(np.flatnonzero(strata == lv), size=(n, int((strata == lv).sum())), replace=True)
             for lv in np.unique(strata)]
    return np.concatenate(parts, axis=1)


def bootstrap(fit, n: int = 200, *, stratify: str | None = None, seed: int = 0, ci: float = 0.95,
              bca: bool = True, batch: int | None = None, progress: bool | None = None) -> BootstrapResult:
    """Case-resampling (by subject) bootstrap of ``fit``, a FO/FOCE/FOCE-I/Laplace FitResult with its model and
    data attached; the refits run batched in lockstep (see the module docstring for the method and the intervals).

    ``n``: resamples (≥ 2); ``stratify``: a baseline covariate column to resample within; ``seed``: of the numpy
    Generator that draws the resamples; ``ci``: interval level; ``bca``: also BCa intervals (N extra jackknife
    refits); ``batch``: most replicas per lockstep chunk (bounds memory); ``progress``: a bar over the refits
    (None: automatic, :mod:`nlmefit.progress`). Start and end are logged (logger ``nlmefit.resampling``, INFO)."""
    t0 = time.perf_counter()
    est, model, mdata, panel = _check(fit, n, ci, batch)
    nsub = mdata.n_subjects
    strata = None
    if stratify is not None:
        names = list(getattr(panel, "covariate_names", ()))
        if stratify not in names:
            raise DataError(f"stratify: no baseline covariate column {stratify!r} in the fitted data (covariates: "
                            f"{', '.join(names) or 'none'})")
        strata = np.asarray(panel.covariates)[:, names.index(stratify)]
    rng = np.random.default_rng(seed)
    draws = resample_subjects(nsub, int(n), rng, strata)
    idx = list(draws)
    if bca:
        every = np.arange(nsub)
        idx += [np.delete(every, j) for j in range(nsub)]

    pset = model.parameters
    lin = est.linearisation
    lin.check(model)
    dev = mdata.y.device
    p_hat = fit.population_parameters(device=dev)
    u_hat = pset.to_unconstrained(p_hat).detach().cpu().numpy()
    eta_hat = lin.modes(model, p_hat, mdata, torch.zeros(nsub, mdata.q, dtype=torch.float64, device=dev)).detach()
    n_unc = (mdata.mask & (mdata.cens == 0)).sum(1).cpu().numpy()
    options = dict(maxiter=est.maxiter, maxcor=30, ftol=1e-13, gtol=est.gtol, maxls=50)  # as ClassicalEstimator
    chunk = int(batch) if batch is not None else max(1, VIRTUAL_SUBJECTS // nsub)
    threads = resolve_threads(est.threads, min(chunk, len(idx)) * nsub, min(chunk, len(idx)) * mdata.n_obs)
    results = []
    n_chunks = -(-len(idx) // chunk)
    logger.info("bootstrap: %d resamples%s of %d subjects (%s), %d refit(s) in %d batched chunk(s)", int(n),
                f" + {nsub} jackknife" if bca else "", nsub, fit.method, len(idx), n_chunks)
    shard = parallel.current()  # several ranks: each refits every world-th resample, the rows are all-reduced
    mine = list(range(len(idx))) if shard is None else list(range(shard.rank, len(idx), shard.world))
    bar = progress_bar(len(mine), "bootstrap refits", "refit",
                       enabled=progress if shard is None or shard.rank == 0 else False)
    with limit_threads(threads), bar:
        for start in range(0, len(mine), chunk):
            part = [idx[i] for i in mine[start:start + chunk]]
            eta0 = eta_hat[torch.as_tensor(np.concatenate(part), device=dev)]
            live: list[set[int]] = [set(range(len(part)))]

            def tick(reps: list[int], live=live) -> None:
                bar.update(len(live[0] - set(reps)))
                live[0] = set(reps)

            results += replica_minimize(model, lin, mdata, part, np.tile(u_hat, (len(part), 1)), options,
                                        eta0=eta0, on_batch=tick)
            bar.update(len(live[0]))

    names = pset.natural_names
    rows = np.zeros((len(idx), len(names) + 3))
    for i, r in zip(mine, results):
        ix = idx[i]
        x = pset.to_natural_vector(pset.from_unconstrained(torch.as_tensor(r.x, dtype=torch.float64)))
        ofv = float(r.fun) - float(n_unc[ix].sum()) * _LOG_2PI if r.fun < 1e20 else math.nan
        ok = bool(r.success) and math.isfinite(ofv) and bool(np.isfinite(r.x).all())
        rows[i] = [*x.detach().cpu().numpy().tolist(), ofv, int(r.nit), float(ok)]
    if shard is not None:  # each row was filled on exactly one rank (zeros elsewhere): the sum is the table
        rows = shard.allreduce_sum(torch.as_tensor(rows, dtype=torch.float64)).numpy()
    table = pd.DataFrame(rows, columns=[*names, "ofv", "n_iter", "success"])
    table["n_iter"] = table["n_iter"].astype(int)
    table["success"] = table["success"] > 0.5
    boot = table.iloc[: int(n)].reset_index(drop=True)
    boot.insert(0, "resample", np.arange(int(n)))
    jack = None
    if bca:
        jack = table.iloc[int(n):].reset_index(drop=True)
        jack.insert(0, "left_out", np.asarray(mdata.ids))
    rate = float(boot["success"].mean())
    logger.info("bootstrap: %d of %d refits succeeded (%.0f%%) in %.1f s", int(boot["success"].sum()), int(n),
                100 * rate, time.perf_counter() - t0)
    if not boot["success"].any():
        raise EstimationError(f"bootstrap: none of the {n} refits succeeded (the optimiser reported no success or "
                              f"the OFV was not finite); check the original fit")
    original = fit.estimates[names].astype(float)
    intervals = _intervals(boot[boot["success"]], original, ci, None if jack is None else jack[jack["success"]])
    return BootstrapResult(estimates=boot, intervals=intervals, success_rate=rate,
                           elapsed_s=time.perf_counter() - t0, n=int(n), ci=float(ci), method=str(fit.method),
                           stratify=stratify, seed=int(seed), original=original, jackknife=jack)


# ---------------------------------------------------------------------- helpers
_LOG_2PI = math.log(2 * math.pi)


def _check(fit, n, ci, batch, what: str = "bootstrap"):
    """(estimator rebuilt from the fit's options, model, bound data, panel), after checking the arguments."""
    method = str(getattr(fit, "method", ""))
    if method not in SUPPORTED_METHODS:
        raise ModelSpecError(f"{what} supports fits by {', '.join(SUPPORTED_METHODS)} (the classical estimators, "
                             f"refitted in batched lockstep); this fit is by {method!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ModelSpecError(f"bootstrap: n (number of resamples) must be an integer >= 2, got {n!r}")
    if not (isinstance(ci, (int, float)) and 0.0 < float(ci) < 1.0):
        raise ModelSpecError(f"{what}: ci must be in (0, 1), got {ci!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1):
        raise ModelSpecError(f"bootstrap: batch must be a positive integer or None, got {batch!r}")
    model, mdata = fit.model, fit.data
    if model is None or mdata is None:
        raise ModelSpecError(f"{what} needs the fit's model and data attached (a FitResult read from JSON has "
                             f"neither): use `nlmefit {what} RESULT_DIR`, or fit.replace(model=..., "
                             "data=model.prepare(panel))")
    if not hasattr(mdata, "y"):
        mdata = model.prepare(mdata)
    if model.parameters.n_weights:
        raise ModelSpecError(f"{what} needs a model without tensor-valued weights")
    if not model.parameters.n_free:
        raise ModelSpecError(f"{what}: the model has no free parameter to re-estimate")
    opts = {k: fit.options[k] for k in _ESTIMATOR_OPTIONS if k in (fit.options or {})}
    threads = (fit.options or {}).get("threads")
    with contextlib.suppress(ModelSpecError):
        opts["threads"] = check_threads(threads)
    est = get_estimator(method, **opts)
    if not est.maxiter:
        raise ModelSpecError(f"{what}: the fit was run with maxiter=0 (no estimation), so there is nothing to "
                             "refit; refit with maxiter > 0 first")
    if mdata.n_subjects < 2:
        raise DataError(f"{what} needs at least 2 subjects, the fit has {mdata.n_subjects}")
    return est, model, mdata, getattr(mdata, "panel", None)


def _intervals(boot: pd.DataFrame, original: pd.Series, ci: float, jack: pd.DataFrame | None) -> pd.DataFrame:
    """Percentile (and BCa) intervals, SE and bias per parameter (formulas in the module docstring)."""
    alpha = 1.0 - ci
    z = norm.ppf([alpha / 2, 1 - alpha / 2])
    rows = []
    for name, theta in original.items():
        x = boot[name].to_numpy(float)
        x = x[np.isfinite(x)]
        row = {"parameter": name, "estimate": float(theta), "median": float(np.median(x)),
               "se": float(np.std(x, ddof=1)) if len(x) > 1 else math.nan, "bias": float(x.mean() - theta),
               "pct_low": float(np.quantile(x, alpha / 2)), "pct_high": float(np.quantile(x, 1 - alpha / 2))}
        if jack is not None:
            z0 = norm.ppf((np.sum(x < theta) + 0.5 * np.sum(x == theta)) / len(x))
            tj = jack[name].to_numpy(float)
            d = tj[np.isfinite(tj)].mean() - tj[np.isfinite(tj)]
            ss = float(np.sum(d ** 2))
            a = float(np.sum(d ** 3) / (6.0 * ss ** 1.5)) if len(d) >= 3 and ss > 0 else (0.0 if len(d) >= 3
                                                                                         else math.nan)
            lo, hi = math.nan, math.nan
            if math.isfinite(z0) and math.isfinite(a):
                lev = norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
                lo, hi = (float(v) for v in np.quantile(x, lev))
            row.update(bca_low=lo, bca_high=hi, z0=float(z0), acceleration=a)
        rows.append(row)
    return pd.DataFrame(rows)
