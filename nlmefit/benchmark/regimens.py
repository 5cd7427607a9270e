"""Counterfactual-simulation throughput: ``python -m nlmefit.benchmark.regimens [--subjects 1000000]
[--times 100] [--regimen "100 mg po q12h x14"] [--auc trapezoid] [--device cpu]``.

Simulates N virtual subjects (η ~ N(0, Ω) of a 1-cmt oral model) under a multiple-dose regimen on a grid of T
time points, then their exposure metrics over the last dosing interval (AUC, Cmax, Tmax, Cmin, trough, Cavg,
time above a threshold), in chunks of ``--chunk`` subjects (one batched prediction per chunk). Prints the
wall time of each part and the peak memory; never asserts on time.
"""
from __future__ import annotations

import argparse
import time

import torch

import nlmefit
from nlmefit.benchmark._util import machine, peak_rss_mb

__all__ = ["main", "run"]


def run(n_subjects: int, n_times: int = 100, regimen: str = "100 mg po q12h x14", auc: str = "trapezoid",
        chunk: int = 10000, device: str = "cpu", seed: int = 1) -> dict:
    """Time ``nlmefit.simulate_regimens`` for ``n_subjects`` virtual subjects of a 1-cmt oral model under
    ``regimen`` on ``n_times`` time points; returns one row: seconds, profiles per second, peak memory (MB) and
    the median AUC."""
    model = nlmefit.library.get("1cmt_oral", theta={"cl": 2.0, "v": 30.0, "ka": 1.2},
                                omega={"cl": 0.09, "v": 0.04, "ka": 0.09}, sigma={"add": 0.1})
    t0 = time.perf_counter()
    sim = nlmefit.simulate_regimens(None, regimen, model=model, population=n_subjects, n_times=n_times,
                                    threshold=2.0, auc=auc, chunk=chunk, device=device, seed=seed)
    total = time.perf_counter() - t0
    return {"subjects": n_subjects, "times": n_times, "regimen": regimen, "auc": auc, "seconds": total,
            "profiles_per_s": n_subjects / total, "peak_mb": peak_rss_mb(),
            "median_auc": float(sim.exposures["AUC"].median()), "device": device}


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line (``argv``, default ``sys.argv[1:]``; options in the module docstring): one :func:`run` per
    ``--subjects`` size; prints and returns the rows."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, nargs="*", default=[100000, 1000000])
    ap.add_argument("--times", type=int, default=100)
    ap.add_argument("--regimen", default="100 mg po q12h x14")
    ap.add_argument("--auc", default="trapezoid", choices=["trapezoid", "quadrature"])
    ap.add_argument("--chunk", type=int, default=10000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    print(f"# machine: {machine(args.device)}; device {args.device}; torch threads {torch.get_num_threads()}")
    print(f"# regimen {args.regimen!r}, {args.times} time points, exposures over the last interval ({args.auc})")
    print(f"{'N':>9}{'seconds':>10}{'profiles/s':>13}{'peak MB':>9}")
    rows = []
    for n in args.subjects:
        r = run(n, args.times, args.regimen, args.auc, args.chunk, args.device)
        rows.append(r)
        print(f"{n:>9}{r['seconds']:>10.2f}{r['profiles_per_s']:>13.0f}{r['peak_mb']:>9.0f}")
    return rows


if __name__ == "__main__":
    main()
