"""Scaling benchmark: ``python -m nlmefit.benchmark.scaling [--sizes 1000 10000 100000] [--workers 1 2]``.

For each size N, simulates N 1-compartment oral subjects (10 samples each, ``nlmefit.benchmark._util.population``)
into a CSV once, then runs ``nlmefit fit CSV --model 1cmt_oral --method focei --no-cov --workers K`` as a separate
process tree for each K and prints wall time (the whole command: start-up, reading the data on every rank, the fit,
rank 0 writing), the fit's own minimisation time, peak resident memory of the largest rank, the OFV, and the
speed-up over K = 1. Every configuration starts from the same default initial values.
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


def _run_fit(csv: Path, out: Path, workers: int, threads: int) -> tuple[float, float, dict]:
    """(wall s, peak RSS MB of the largest rank, result.json) of one ``nlmefit fit --workers K`` process tree."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "nlmefit", "fit", str(csv), "--model", "1cmt_oral", "--method", "focei",
           "--no-cov", "--quiet", "--out", str(out), "--threads", str(threads)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"fit with {workers} worker(s) failed: {proc.stderr.strip()[-500:]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024.0
    return wall, peak, json.loads((out / "result.json").read_text())


def run(sizes: list[int], workers: list[int], threads: int = 1) -> list[dict]:
    """The benchmark rows (printed as they come)."""
    print(f"# machine: {machine('cpu')}; {threads} thread(s) per rank")
    print(f"{'N':>9}{'ranks':>6}{'wall s':>9}{'fit s':>9}{'peak MB':>9}{'OFV':>16}{'speed-up':>10}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            _, df, _ = population(n)
            csv = Path(tmp) / f"sim_{n}.csv"
            df.to_csv(csv, index=False)
            base = None
            for k in workers:
                wall, peak, res = _run_fit(csv, Path(tmp) / f"out_{n}_{k}", k, threads)
                base = base or wall
                fit_s = float(res.get("elapsed_s", float("nan")))
                row = {"n": n, "ranks": k, "wall_s": wall, "fit_s": fit_s, "peak_mb": peak, "ofv": res["ofv"],
                       "speedup": base / wall}
                rows.append(row)
                print(f"{n:>9}{k:>6}{wall:>9.1f}{fit_s:>9.1f}{peak:>9.0f}{res['ofv']:>16.4f}{base / wall:>10.2f}",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--sizes``, ``--workers``, ``--threads``."""
    ap = argparse.ArgumentParser(prog="python -m nlmefit.benchmark.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    args = ap.parse_args(argv)
    run(args.sizes, args.workers, args.threads)


if __name__ == "__main__":  # pragma: no cover
    main()
