"""Scaling benchmark: ``python -m nlmefit.benchmark.scaling [--sizes 1000 10000 100000] [--workers 1 2]
[--method focei|saem] [--loglik is] [--seed S]``.

For each size N, simulates N 1-compartment oral subjects (10 samples each, ``nlmefit.benchmark._util.population``,
in blocks of 100 000 subjects with their own seeds, so a million subjects never sit in memory at once) into a CSV
once, then runs ``nlmefit fit CSV --model 1cmt_oral --method M --no-cov --workers K`` as a separate process tree
for each K and prints wall time (the whole command: start-up, reading the data on every rank, the fit, rank 0
writing), the fit's own time, peak resident memory of the largest rank, the OFV (and the IS −2LL with ``--loglik
is``), and the speed-up over K = 1. Every configuration starts from the same default initial values and seed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nlmefit.benchmark._util import machine, population

__all__ = ["main", "run"]


BLOCK = 100_000  # subjects simulated at a time


def write_population(csv: Path, n: int) -> None:
    """N simulated subjects into ``csv``, BLOCK at a time (block b: seed b, IDs after the previous blocks)."""
    with open(csv, "w") as fh:
        for b, start in enumerate(range(0, n, BLOCK)):
            _, df, _ = population(min(BLOCK, n - start), seed=b)
            df["ID"] = df["ID"] + start
            df.to_csv(fh, index=False, header=b == 0)


def _run_fit(csv: Path, out: Path, workers: int, threads: int, extra: list[str]) -> tuple[float, float, dict]:
    """(wall s, peak RSS MB of the largest rank, result.json) of one ``nlmefit fit --workers K`` process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "nlmefit", "fit", str(csv), "--model", "1cmt_oral", "--no-cov", "--quiet", "--out",
           str(out), "--threads", str(threads), *extra]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"fit with {workers} worker(s) failed: {proc.stderr.strip()[-500:]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024.0
    return wall, peak, json.loads((out / "result.json").read_text())


def run(sizes: list[int], workers: list[int], threads: int = 1, method: str = "focei", loglik: str | None = None,
        seed: int = 1) -> list[dict]:
    """The benchmark rows (printed as they come)."""
    extra = ["--method", method, "--seed", str(seed)] + (["--loglik", loglik] if loglik else [])
    print(f"# machine: {machine('cpu')}; {threads} thread(s) per rank; {' '.join(extra)}")
    print(f"{'N':>9}{'ranks':>6}{'wall s':>9}{'fit s':>9}{'peak MB':>9}{'OFV':>18}{'IS OFV':>18}{'speed-up':>10}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            csv = Path(tmp) / f"sim_{n}.csv"
            write_population(csv, n)
            base = None
            for k in workers:
                wall, peak, res = _run_fit(csv, Path(tmp) / f"out_{n}_{k}", k, threads, extra)
                base = base or wall
                fit_s = float(res.get("elapsed_s", float("nan")))
                is_ofv = float((res.get("likelihoods") or {}).get("is", {}).get("ofv", float("nan")))
                row = {"n": n, "ranks": k, "wall_s": wall, "fit_s": fit_s, "peak_mb": peak, "ofv": res["ofv"],
                       "is_ofv": is_ofv, "speedup": base / wall, "estimates": res.get("estimates")}
                rows.append(row)
                print(f"{n:>9}{k:>6}{wall:>9.1f}{fit_s:>9.1f}{peak:>9.0f}{res['ofv']:>18.6f}{is_ofv:>18.6f}"
                      f"{base / wall:>10.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--sizes``, ``--workers``, ``--threads``."""
    ap = argparse.ArgumentParser(prog="python -m nlmefit.benchmark.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    ap.add_argument("--method", default="focei", help="estimation method (default focei)")
    ap.add_argument("--loglik", default=None, choices=["is", "agq"], help="also the marginal -2LL at the estimates")
    ap.add_argument("--seed", type=int, default=1, help="seed of the fit (SAEM, IS)")
    args = ap.parse_args(argv)
    rows = run(args.sizes, args.workers, args.threads, args.method, args.loglik, args.seed)
    for n in args.sizes:  # the estimates of every rank count against the first
        same = [r for r in rows if r["n"] == n]
        if len(same) > 1 and same[0]["estimates"]:
            ref = same[0]["estimates"]
            for r in same[1:]:
                dev = max(abs(r["estimates"][k] - v) / max(abs(v), 1e-12) for k, v in ref.items())
                print(f"# N={n}: {r['ranks']} ranks vs {same[0]['ranks']}: OFV rel. diff "
                      f"{abs(r['ofv'] - same[0]['ofv']) / abs(same[0]['ofv']):.2e}, largest estimate rel. diff "
                      f"{dev:.2e}")


if __name__ == "__main__":  # pragma: no cover
    main()
