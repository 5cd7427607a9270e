"""Thread-count benchmark: ``python -m nlmefit.benchmark.threads [--busy 2] [--repeats 1] [--maxiter 500]``.

Times a theophylline FOCE-I fit (``1cmt_oral``, additive error, no covariance step) on 1 thread and on torch's
default thread count, on an idle machine and while ``--busy`` competing processes (default: one per core) spin
on numpy matrix products for the duration. Prints one row per condition; the ratio column is the time relative
to 1 thread on the idle machine. See :mod:`nlmefit.threads` for the policy this motivates.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

import nlmefit
from nlmefit.benchmark._util import timer

__all__ = ["main", "run", "busy_processes"]

_SPIN = ("import numpy as np\n"
         "x = np.random.default_rng(0).random((300, 300))\n"
         "while True:\n"
         "    x = x @ x\n"
         "    x /= np.abs(x).max()\n")


def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` single-threaded processes spinning on numpy (stop them with :func:`stop`)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(n)]
    time.sleep(0.5)  # let them start spinning
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _fit_seconds(threads: int, maxiter: int, repeats: int) -> tuple[float, float]:
    model = nlmefit.library.get("1cmt_oral")
    df = nlmefit.datasets.load("theophylline")
    best, ofv = float("inf"), float("nan")
    for _ in range(repeats):
        with timer() as t:
            res = nlmefit.fit(model, df, method="focei", covariance=None, maxiter=maxiter, threads=threads,
                              progress=False)
        best, ofv = min(best, t["s"]), res.ofv
    return best, ofv


def run(busy: int, repeats: int, maxiter: int) -> list[dict]:
    """Time the theophylline FOCE-I fit on 1 thread and on torch's default count, idle and with ``busy``
    competing processes (fastest of ``repeats``); prints and returns one row per condition (machine, threads,
    seconds, OFV)."""
    default = torch.get_num_threads()
    print(f"# torch {torch.__version__}; {os.cpu_count()} cores; torch's default {default} threads; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; busy processes: {busy}")
    print(f"{'machine':<10}{'threads':>8}{'fit s':>10}{'ratio':>8}{'OFV':>14}")
    rows = []
    base = None
    for label, n_busy in (("idle", 0), ("busy", busy)):
        procs = busy_processes(n_busy) if n_busy else []
        try:
            for threads in sorted({1, default}):
                s, ofv = _fit_seconds(threads, maxiter, repeats)
                base = base or s
                rows.append({"machine": label, "threads": threads, "seconds": s, "ofv": ofv})
                print(f"{label:<10}{threads:>8}{s:>10.2f}{s / base:>8.1f}{ofv:>14.4f}", flush=True)
        finally:
            stop(procs)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--busy``, ``--repeats``, ``--maxiter``; runs :func:`run`."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="competing processes (default: cores)")
    ap.add_argument("--repeats", type=int, default=1, help="fits per condition; the fastest is reported")
    ap.add_argument("--maxiter", type=int, default=500, help="L-BFGS iterations per fit")
    args = ap.parse_args(argv)
    run(args.busy, args.repeats, args.maxiter)


if __name__ == "__main__":
    main()
