"""Build-time benchmark: ``python -m nlmefit.panel.bench [n_subjects] [n_obs]`` prints how long
:meth:`Panel.from_dataframe` takes on a synthetic frame (one dose + n_obs observations per subject)."""
from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from nlmefit.panel.panel import Panel

__all__ = ["synthetic_frame", "main"]


def synthetic_frame(n_subjects: int = 10_000, n_obs: int = 10, seed: int = 0) -> pd.DataFrame:
    """One bolus dose at time 0 then ``n_obs`` observations per subject, with WT (numeric) and SEX (text)."""
    rng = np.random.default_rng(seed)
    per = n_obs + 1
    ids = np.repeat(np.arange(1, n_subjects + 1), per)
    t = np.tile(np.concatenate([[0.0], np.geomspace(0.25, 24.0, n_obs)]), n_subjects)
    dose = np.tile(np.r_[1, np.zeros(n_obs, dtype=int)], n_subjects)
    return pd.DataFrame({
        "ID": ids, "TIME": t, "DV": np.where(dose == 1, 0.0, rng.lognormal(1.0, 0.5, len(ids))),
        "AMT": np.where(dose == 1, 100.0, 0.0), "EVID": dose, "MDV": dose, "CMT": np.where(dose == 1, 1, 2),
        "WT": np.repeat(rng.normal(70, 10, n_subjects), per),
        "SEX": np.repeat(rng.choice(["F", "M"], n_subjects), per),
    })


def main(argv: list[str] | None = None) -> float:
    argv = sys.argv[1:] if argv is None else argv
    n = int(argv[0]) if argv else 10_000
    j = int(argv[1]) if len(argv) > 1 else 10
    df = synthetic_frame(n, j)
    t0 = time.perf_counter()
    p = Panel.from_dataframe(df)
    dt = time.perf_counter() - t0
    print(f"{p!r}\nbuilt {len(df)} records ({n} subjects) in {dt:.3f} s")
    return dt


if __name__ == "__main__":
    main()
