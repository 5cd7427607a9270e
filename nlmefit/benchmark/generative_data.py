"""The shipped simulators of the NLME-vs-generative benchmark: 1- or 2-cmt oral populations with covariates.

Truth (per 70 kg; log-normal IIV; proportional residual error 15 %; body weight WT = 70·exp(N(0, 0.2²)) kg
with allometric exponents 0.75 on clearances and 1 on volumes):

* ``1cmt_oral``: CL 2 L/h, V 30 L, KA 1.2 /h; ω² 0.09, 0.04, 0.16;
* ``2cmt_oral``: CL 2 L/h, V1 20 L, Q 4 L/h, V2 40 L, KA 1.2 /h; ω² 0.09, 0.04, 0.04, 0.04, 0.16.

Training and test subjects receive the training regimen (default one 100 mg oral dose) on a common design
(default 0.5–24 h, 9 samples); the unseen regimens (default 300 mg once, 100 mg every 12 h) use the same
sampling times, so the same subjects-as-vectors view applies with a different dose context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import nlmefit
from nlmefit.baselines.design import PanelView
from nlmefit.errors import ModelSpecError

__all__ = ["SIMULATORS", "BenchData", "simulate_benchmark", "bench_from_data", "regimen_doses", "DEFAULT_TIMES",
           "DEFAULT_UNSEEN"]

DEFAULT_TIMES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 24.0)
DEFAULT_UNSEEN = {"300 mg once": [(0.0, 300.0)], "100 mg q12h": [(0.0, 100.0), (12.0, 100.0)]}

SIMULATORS = {
    "1cmt_oral": dict(theta={"cl": 2.0, "v": 30.0, "ka": 1.2}, omega={"cl": 0.09, "v": 0.04, "ka": 0.16},
                      covariates={"cl": "log(WT/70)", "v": "log(WT/70)"}, beta={"cl": 0.75, "v": 1.0}),
    "2cmt_oral": dict(theta={"cl": 2.0, "v1": 20.0, "q": 4.0, "v2": 40.0, "ka": 1.2},
                      omega={"cl": 0.09, "v1": 0.04, "q": 0.04, "v2": 0.04, "ka": 0.16},
                      covariates={"cl": "log(WT/70)", "v1": "log(WT/70)", "q": "log(WT/70)", "v2": "log(WT/70)"},
                      beta={"cl": 0.75, "v1": 1.0, "q": 0.75, "v2": 1.0}),
}
SIGMA_PROP = 0.15


@dataclass
class BenchData:
    """Training and test frames (NONMEM events), the unseen regimens' test frames, the NLME model to fit (its
    starting values automatic) and, for a simulation, the true model and values."""

    name: str
    fit_model: nlmefit.Model
    train: pd.DataFrame
    test: pd.DataFrame
    unseen: dict[str, pd.DataFrame] = field(default_factory=dict)
    times: tuple = DEFAULT_TIMES
    model: nlmefit.Model | None = None
    truth: dict | None = None


def regimen_doses(doses) -> list[dict]:
    """[(time, amount), …] → the dose records nlmefit.simulate takes (oral, depot compartment 1)."""
    return [{"TIME": float(t), "AMT": float(a), "CMT": 1} for t, a in doses]


def _model(name: str) -> tuple[nlmefit.Model, dict]:
    if name not in SIMULATORS:
        raise ModelSpecError(f"unknown simulator {name!r}; choose one of {sorted(SIMULATORS)}")
    s = SIMULATORS[name]
    model = nlmefit.library.get(name, error="proportional", theta=s["theta"], omega=s["omega"],
                                sigma={"prop": SIGMA_PROP}, covariates=s["covariates"])
    truth = {**s["theta"], **{f"omega_{k}": v for k, v in s["omega"].items()}, "sigma_prop": SIGMA_PROP,
             **{f"beta_{k}_log(WT/70)": v for k, v in s["beta"].items()}}
    return model, truth


def _population(model, truth, n: int, times, doses, rng: np.random.Generator, id0: int, seed: int) -> pd.DataFrame:
    wt = np.round(70.0 * np.exp(0.2 * rng.standard_normal(n)), 1)
    sim = nlmefit.simulate(model, truth, times=list(times), doses=regimen_doses(doses), n_subjects=n,
                           covariates={"WT": wt}, seed=seed)
    sim = sim.drop(columns=[c for c in ("REP",) if c in sim.columns])
    sim["ID"] = sim["ID"] + id0
    return sim


def simulate_benchmark(name: str = "1cmt_oral", n_train: int = 500, n_test: int = 200, *, times=DEFAULT_TIMES,
                       train_doses=((0.0, 100.0),), unseen: dict | None = None, n_unseen: int | None = None,
                       seed: int = 0) -> BenchData:
    """Simulate the benchmark's populations (see the module docstring). ``unseen`` maps a label to its dose
    list [(time, amount), …] (default :data:`DEFAULT_UNSEEN`; ``{}`` for none); ``n_unseen`` subjects each
    (default ``n_test``)."""
    if n_train < 2 or n_test < 2:
        raise ModelSpecError(f"n_train and n_test must be at least 2, got {n_train} and {n_test}")
    model, truth = _model(name)
    rng = np.random.default_rng(seed)
    train = _population(model, truth, n_train, times, train_doses, rng, 0, seed)
    test = _population(model, truth, n_test, times, train_doses, rng, n_train, seed + 1)
    out = {}
    for k, (label, doses) in enumerate((DEFAULT_UNSEEN if unseen is None else unseen).items()):
        out[label] = _population(model, truth, n_unseen or n_test, times, doses, rng, n_train + n_test * (k + 2),
                                 seed + 2 + k)
    fit_model = nlmefit.library.get(name, error="proportional", covariates=SIMULATORS[name]["covariates"])
    return BenchData(name=name, fit_model=fit_model, train=train, test=test, unseen=out, times=tuple(times),
                     model=model, truth=truth)


def bench_from_data(df: pd.DataFrame, fit_model: nlmefit.Model, *, name: str = "data", test_fraction: float = 0.25,
                    unseen_dose: float | None = None, seed: int = 0) -> BenchData:
    """The benchmark's frames from a data set on a common design: subjects whose (first) dose amount equals
    ``unseen_dose`` form the unseen-regimen set (held out of training: a dose level none of the models saw), the
    rest is split by subject into training and ``test_fraction`` held-out subjects. Subjects with a missing
    design time are dropped (most baselines need complete vectors), with the count in ``BenchData.name``."""
    view = PanelView.from_panel(df, common_regimen=False)
    keep = view.complete_cases
    ids = view.ids[keep]
    unseen_ids = ids[np.isclose(_first_dose(df, ids), unseen_dose)] if unseen_dose is not None else ids[:0]
    if unseen_dose is not None and len(unseen_ids) == 0:
        raise ModelSpecError(f"unseen_dose {unseen_dose:g}: no subject's first dose has that amount")
    rest = np.setdiff1d(ids, unseen_ids)
    if len(rest) < 4:
        raise ModelSpecError(f"{len(rest)} complete subjects left for training and testing; need at least 4")
    perm = np.random.default_rng(seed).permutation(rest)
    k = min(max(int(round(test_fraction * len(rest))), 2), len(rest) - 2)
    test_ids, train_ids = perm[:k], perm[k:]
    sel = lambda which: df[df["ID"].isin(which)].reset_index(drop=True)  # noqa: E731
    unseen = {f"dose {unseen_dose:g} (held out of training)": sel(unseen_ids)} if len(unseen_ids) else {}
    dropped = int((~keep).sum())
    label = name + (f" ({dropped} incomplete subjects dropped)" if dropped else "")
    return BenchData(name=label, fit_model=fit_model, train=sel(train_ids), test=sel(test_ids), unseen=unseen,
                     times=tuple(view.times))


def _first_dose(df: pd.DataFrame, ids) -> np.ndarray:
    doses = df[(df.get("EVID", pd.Series(0, index=df.index)) == 1) | (df["AMT"] > 0)]
    first = doses.groupby("ID", sort=False)["AMT"].first()
    return first.reindex(ids).to_numpy(dtype=float)
