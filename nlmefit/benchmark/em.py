"""SAEM and IS -2LL benchmark: ``python -m nlmefit.benchmark.em [--sizes 10000] [--quick] [--out FILE.json]``.

Prints, per problem (theophylline 1cmt_oral additive, pheno_real, a simulated 1-cmt oral population with 10
observations per subject for each of ``--sizes``) and device:

* the wall time of ``nlmefit.fit(model, data, method="saem", seed=1, covariance=None)`` — the whole call, which
  includes the fit's own IS −2LL (2000 samples) at the end — and the time per SAEM iteration (mean over
  iterations 2…n, from the progress callback, so data preparation and the post-loop work are excluded);
* the wall time, OFV and Monte-Carlo SE of ``nlmefit.loglik(fit, method="is", n_samples=2000)`` at the SAEM
  estimates;
* the peak resident memory of the process so far (``resource.getrusage``; on CUDA also the peak allocated).

``--quick``: a 1,000-subject population and ``n_explore = n_smooth = 50`` (under a minute on a laptop CPU).
``--device cuda`` runs on the GPU (the default when one is available). ``--out FILE.json`` also writes the rows
(and the machine) as JSON, atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings

import torch

import nlmefit
from nlmefit.benchmark._util import machine, peak_rss_mb, population, timer
from nlmefit.models.examples import pheno_real

__all__ = ["main", "run"]


def _problems(sizes: list[int]) -> list[tuple[str, object, object]]:
    problems = [("theophylline 1cmt_oral", nlmefit.library.get("1cmt_oral", error="additive"),
                 nlmefit.datasets.load("theophylline")),
                ("pheno_real", pheno_real(), nlmefit.datasets.load("pheno"))]
    for n in sizes:
        model, df, _ = population(n)
        problems.append(("sim 1cmt_oral x10 obs", model, df))
    return problems


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def run(sizes: list[int], device: str, n_explore: int = 150, n_smooth: int = 150,
        n_samples: int = 2000) -> list[dict]:
    """Fit every problem by SAEM, then evaluate the IS −2LL at the estimates; print a row each, return the rows."""
    cpus = os.cpu_count() or 1
    print(f"# machine: {machine(device)}; device {device}; {cpus} CPUs (load {os.getloadavg()[0]:.2f}); "
          f"SAEM n_explore={n_explore} n_smooth={n_smooth}; IS n_samples={n_samples}")
    print(f"{'problem':<24}{'N':>7}{'n_obs':>8}{'saem s':>9}{'s/iter':>9}{'IS s':>8}{'IS OFV':>14}{'IS se':>8}"
          f"{'conv':>6}{'peak MB':>9}")
    rows = []
    for label, model, df in _problems(sizes):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        stamps: list[float] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with timer() as t_fit:
                res = nlmefit.fit(model, df, method="saem", seed=1, covariance=None, device=device,
                                  n_explore=n_explore, n_smooth=n_smooth,
                                  progress=lambda k, v: stamps.append(_now(device)))
            with timer() as t_is:
                ll = nlmefit.loglik(res, method="is", n_samples=n_samples)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
        n_iter = len(stamps)
        per_iter = (stamps[-1] - stamps[0]) / (n_iter - 1) if n_iter > 1 else float("nan")
        row = {
            "problem": label, "n_subjects": int(res.n_subjects), "n_obs": int(res.n_obs),
            "saem_s": t_fit["s"], "saem_iterations": n_iter, "saem_s_per_iter": per_iter,
            "saem_converged": bool(res.converged), "saem_ofv": float(res.ofv),
            "is_s": t_is["s"], "is_ofv": float(ll.ofv), "is_se": float(ll.se), "is_n_samples": n_samples,
            "is_ess_min": float(ll.ess_i.min()),
            "peak_rss_mb": peak_rss_mb(),
            "cuda_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else None,
            "device": device, "machine": machine(device), "torch": torch.__version__, "cpu_count": cpus,
            "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
            "warnings": sorted({str(w.message).splitlines()[0] for w in caught}),
        }
        rows.append(row)
        mem = row["cuda_peak_mb"] if row["cuda_peak_mb"] is not None else row["peak_rss_mb"]
        print(f"{label:<24}{row['n_subjects']:>7}{row['n_obs']:>8}{row['saem_s']:>9.2f}{per_iter:>9.4f}"
              f"{row['is_s']:>8.2f}{row['is_ofv']:>14.3f}{row['is_se']:>8.3f}"
              f"{'yes' if row['saem_converged'] else 'no':>6}{mem:>9.0f}")
    return rows


def _clean(x):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _write_json(obj: dict, path: str) -> None:
    """Write atomically (temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_clean(obj), fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line (``argv``, default ``sys.argv[1:]``; options in the module docstring): runs :func:`run`,
    prints the rows, writes them to ``--out`` when given, and returns them."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=None,
                    help="simulated population sizes (default 10000; 1000 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1,000 subjects and n_explore = n_smooth = 50")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-explore", type=int, default=None, help="SAEM exploration iterations (150; 50 --quick)")
    ap.add_argument("--n-smooth", type=int, default=None, help="SAEM smoothing iterations (150; 50 --quick)")
    ap.add_argument("--n-samples", type=int, default=2000, help="IS draws per subject")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    sizes = args.sizes if args.sizes is not None else ([1000] if args.quick else [10000])
    default_iter = 50 if args.quick else 150
    n_explore = args.n_explore if args.n_explore is not None else default_iter
    n_smooth = args.n_smooth if args.n_smooth is not None else default_iter
    rows = run(sizes, args.device, n_explore, n_smooth, args.n_samples)
    if args.out:
        _write_json({"machine": machine(args.device), "device": args.device, "torch": torch.__version__,
                     "cpu_count": os.cpu_count(), "quick": args.quick, "n_explore": n_explore,
                     "n_smooth": n_smooth, "n_samples": args.n_samples, "rows": rows}, args.out)
        print(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
