"""Robustness benchmark on the twelve nlmixr2 / ACOP 2016 sets: ``python -m nlmefit.benchmark.robust [--sets NAME ...]
[--method focei] [--no-full] [--out FILE.json]``.

For every shipped ACOP 2016 set (``nlmefit.datasets``: ``bolus_1cpt`` … ``oral_2cptmm``) the single-dose subset
(``SD == 1``) is fitted with its library model (``bolus_*``/``infusion_*`` → ``{n}cmt_iv``, ``oral_*`` →
``{n}cmt_oral``, ``_mm`` for the Michaelis–Menten sets) and proportional error, as a new user would:

* **auto**: from the default starts (``nlmefit.fit(model, data)``; automatic initial estimates where the package
  makes them);
* **truth**: from the true population values — the geometric means of the data's true individual-parameter
  columns (``CL``, ``V``/``V1``, ``Q``, ``V2``, ``KA``, ``VM``, ``KM``), Ω from the variance of their logs, σ 0.2.

Printed per set: OFV from each start, their difference (auto − truth; the acceptance is ≤ 0.01), the wall time of
each fit, for the MM sets ``tight``: the OFV at the auto fit's estimates with the ODE solved at rtol 1e-10 minus the
auto fit's OFV (acceptance ≤ 0.01; not timed), and the ratio of the auto fit's wall time to that of its reference —
the linear counterpart's SD fit for an MM set, the SD subset's fit for a full set. Unless ``--no-full``, the full
multiple-dose sets of ``oral_1cpt`` and ``oral_2cpt`` (all rows; their SS=1 records applied as steady state) are
fitted the same way. A fit that raises is reported with its exception's type (``EstimationError``/``DataError`` are
the package's own; anything else is a defect). One thread per process unless ``OMP_NUM_THREADS`` says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch

import nlmefit
from nlmefit.benchmark._util import machine
from nlmefit.benchmark.em import _write_json

__all__ = ["SETS", "library_model_name", "true_values", "run", "main"]

SETS = ("bolus_1cpt", "bolus_2cpt", "infusion_1cpt", "infusion_2cpt", "oral_1cpt", "oral_2cpt",
        "bolus_1cptmm", "bolus_2cptmm", "infusion_1cptmm", "infusion_2cptmm", "oral_1cptmm", "oral_2cptmm")
FULL = ("oral_1cpt", "oral_2cpt")
#: data column of the true individual parameter -> library parameter name
TRUE_COLUMNS = {"CL": "cl", "V": "v", "V1": "v", "Q": "q", "V2": "vp", "KA": "ka", "VM": "vm", "KM": "km"}


def library_model_name(name: str) -> str:
    """``bolus_2cptmm`` -> ``2cmt_iv_mm``."""
    route, rest = name.split("_", 1)
    ncmt = rest[0]
    return f"{ncmt}cmt_{'oral' if route == 'oral' else 'iv'}" + ("_mm" if rest.endswith("mm") else "")


def true_values(df: pd.DataFrame, model) -> dict[str, float]:
    """Typical values = geometric means of the true individual parameters, Ω = variance of their logs, σ 0.2."""
    per_id = df.groupby("ID").first()
    out: dict[str, float] = {}
    for col, p in TRUE_COLUMNS.items():
        if col in per_id and p in model.parameters.theta:
            logs = np.log(per_id[col].to_numpy(float))
            out[p] = float(np.exp(logs.mean()))
            out[f"omega_{p}"] = float(logs.var(ddof=1))
    out["sigma_prop"] = 0.2
    return out


def _fit(model, df, init, method: str) -> dict:
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = nlmefit.fit(model, df, method=method, init=init, covariance=None, progress=False)  # a table
        return {"ofv": float(res.ofv), "s": time.perf_counter() - t0, "converged": bool(res.converged),
                "error": None, "estimates": res.estimates.to_dict(),
                "initial": dict(getattr(res, "initial", {}) or {}).get("values"),
                "warnings": sorted({str(w.message).splitlines()[0][:160] for w in caught})}
    except Exception as err:  # reported, not raised: a benchmark row per set
        return {"ofv": math.nan, "s": time.perf_counter() - t0, "converged": False,
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", "estimates": None,
                "initial": None, "warnings": []}


def _tight_ofv(model, df, auto: dict, method: str) -> float:
    """The OFV at the auto fit's estimates with the ODE solved at rtol 1e-10 / atol 1e-12 (modes found again):
    the acceptance compares it with the default-tolerance OFV (≤ 0.01)."""
    if auto["estimates"] is None:
        return math.nan
    tight = copy.copy(model)
    tight.structure = model.structure.with_tolerance(1e-10, 1e-12)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = nlmefit.fit(tight, df, method=method, init=auto["estimates"], maxiter=0, covariance=None,
                              progress=False)
        return float(res.ofv)
    except Exception:  # reported as NaN: a benchmark row per set
        return math.nan


def run(sets: list[str], method: str = "focei", full: bool = True) -> list[dict]:
    """Fit every set from both starts; print a row each and return the rows."""
    print(f"# machine: {machine('cpu')}; {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.2f}); method {method}; "
          f"proportional error")
    print(f"{'set':<18}{'subset':<7}{'model':<13}{'OFV auto':>13}{'OFV truth':>13}{'diff':>9}{'auto s':>8}"
          f"{'truth s':>8}{'ratio':>7}{'tight':>9}  note")
    jobs = [(s, "SD") for s in sets] + ([(s, "full") for s in FULL if s in sets] if full else [])
    jobs.sort(key=lambda j: (j[1] == "full", j[0].endswith("mm")))  # linear SD first: the MM ratios need them
    rows, sd_time = [], {}
    for name, subset in jobs:
        df = nlmefit.datasets.load(name)
        if subset == "SD":
            df = df[df["SD"] == 1]
        lib = library_model_name(name)
        model = nlmefit.library.get(lib, error="proportional")
        truth = true_values(df, model)
        auto = _fit(model, df, None, method)
        true = _fit(model, df, truth, method)
        if subset == "full":
            ref = sd_time.get(name)
        else:
            ref = sd_time.get(name.removesuffix("mm")) if name.endswith("mm") else None
        if subset == "SD":
            sd_time[name] = auto["s"]
        ratio = auto["s"] / ref if ref else math.nan
        tight = _tight_ofv(model, df, auto, method) if name.endswith("mm") else math.nan
        row = {"set": name, "subset": subset, "model": lib, "n_obs": int((df["EVID"] == 0).sum()),
               "ofv_auto": auto["ofv"], "ofv_truth": true["ofv"], "diff": auto["ofv"] - true["ofv"],
               "auto_s": auto["s"], "truth_s": true["s"], "ratio_to_reference": ratio, "auto": auto, "truth": true,
               "truth_values": truth, "ofv_tight": tight}
        rows.append(row)
        note = auto["error"] or true["error"] or ("" if auto["converged"] else "auto fit not converged")
        print(f"{name:<18}{subset:<7}{lib:<13}{auto['ofv']:>13.3f}{true['ofv']:>13.3f}{row['diff']:>9.3f}"
              f"{auto['s']:>8.1f}{true['s']:>8.1f}{ratio:>7.2f}{tight - auto['ofv']:>9.4f}  {note}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--sets``, ``--method``, ``--no-full``, ``--out``; runs
    :func:`run`, writes the rows to ``--out`` when given, and returns them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="*", default=list(SETS), choices=SETS, metavar="NAME",
                    help="which sets (default: all twelve)")
    ap.add_argument("--method", default="focei", help="estimation method (default focei)")
    ap.add_argument("--no-full", action="store_true", help="skip the full multiple-dose oral_1cpt/oral_2cpt fits")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file (atomically)")
    args = ap.parse_args(argv)
    rows = run(list(args.sets), args.method, full=not args.no_full)
    if args.out:
        _write_json({"machine": machine("cpu"), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                     "method": args.method, "rows": rows}, args.out)
        print(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
