"""Small-fit benchmark: ``python -m nlmefit.benchmark.small [--repeats 5] [--methods focei]``.

Issue 10's line "theophylline FOCE-I (with covariance step) ≤ 0.5 s and pheno_real ≤ 0.5 s in-process after
warm-up": each problem is fitted once to warm up (imports, dispatcher caches), then ``--repeats`` times; printed are
the median and the fastest wall time of the whole ``nlmefit.fit`` call (automatic starts, covariance step on, as a
user runs it), the number of objective evaluations, and the OFV with its reference (NONMEM/nlmixr2, as in
``tests/results/``). One thread unless ``OMP_NUM_THREADS`` / ``--threads`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import nlmefit
from nlmefit.benchmark._util import machine

__all__ = ["PROBLEMS", "run", "main"]

#: label -> (model factory, data set name, reference OFV and its source)
PROBLEMS = {
    "theophylline 1cmt_oral": (lambda: nlmefit.library.get("1cmt_oral"), "theophylline",
                               "116.80-116.83 (nlmixr2 FOCE-I)"),
    "pheno_real": (lambda: nlmefit.models.examples.pheno_real(), "pheno", "586.27606 (NONMEM 7 FOCE-I)"),
}


def run(repeats: int = 5, methods: tuple[str, ...] = ("focei",), problems: tuple[str, ...] = tuple(PROBLEMS)
        ) -> list[dict]:
    """Fit each problem ``1 + repeats`` times in this process; print and return one row per problem and method."""
    print(f"# machine: {machine('cpu')}; {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.2f}); covariance step on")
    print(f"{'problem':<26}{'method':<8}{'median s':>10}{'min s':>8}{'evals':>7}{'OFV':>16}  reference")
    rows = []
    for label in problems:
        factory, data_name, ref = PROBLEMS[label]
        model, df = factory(), nlmefit.datasets.load(data_name)
        for method in methods:
            nlmefit.fit(model, df, method=method, progress=False)  # warm-up
            times, counter = [], {"n": 0}
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = nlmefit.fit(model, df, method=method, progress=lambda k, v: counter.__setitem__("n", k))
                times.append(time.perf_counter() - t0)
            row = {"problem": label, "method": method, "median_s": statistics.median(times), "min_s": min(times),
                   "evals": counter["n"], "ofv": float(res.ofv), "reference": ref,
                   "covariance_ok": bool(res.covariance_ok)}
            rows.append(row)
            print(f"{label:<26}{method:<8}{row['median_s']:>10.3f}{row['min_s']:>8.3f}{row['evals']:>7}"
                  f"{row['ofv']:>16.6f}  {ref}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--repeats``, ``--methods``, ``--threads``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed fits per problem after the warm-up (default 5)")
    ap.add_argument("--methods", nargs="*", default=["focei"], help="estimation methods (default focei)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    return run(args.repeats, tuple(args.methods))


if __name__ == "__main__":
    main()
