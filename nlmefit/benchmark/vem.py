"""Variational-EM benchmark: ``python -m nlmefit.benchmark.vem [--sizes 1000 10000] [--quick] [--device cuda]
[--out FILE.json]``.

For each simulated population (1-cmt oral, additive error, 10 observations per subject over 24 h; the population
of :func:`nlmefit.benchmark._util.population`) the same data are fitted by

* FOCE-I and SAEM (``covariance=None``): wall time of the whole ``fit`` call and the OFV (SAEM's is its IS −2LL);
* per-subject VEM and amortized VEM (``posterior`` as given, default ``gaussian``; amortized with mini-batches of
  200 subjects): **time to the ELBO plateau** — from the start of ``fit`` (so the Laplace initialisation and the
  encoder's warm start are included) to the step at which the convergence rule of
  :mod:`nlmefit.estimators.vem` first held (the end of phase ``optimise``; the annealing steps after it and the
  final IS/ELBO evaluation are not included) — the steps it took, the seconds per step, the whole call's wall
  time, the IS −2LL with q as the proposal and −2·ELBO.

The −2LL column is −2 log L with all constants for every method (FOCE-I: its linearised objective; SAEM and VEM:
importance sampling), so the rows compare; OFV (without the N·log 2π constant) is in the JSON rows.

Timestamps come from a subclass of :class:`~nlmefit.estimators.vem.VEM` that records ``time.perf_counter()``
after every step (on CUDA after a synchronise); nothing in the package is patched. Every method starts from the
same initial values (the truth × 1.3 for the typical values, Ω 0.2, σ 0.5), so the figures compare like with like.
``--quick``: N = 1,000 only. Thread count and machine are printed; run with ``OMP_NUM_THREADS`` set as you wish
to compare (the package's thread policy applies).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

import nlmefit
from nlmefit.benchmark._util import machine, peak_rss_mb, population, timer
from nlmefit.benchmark.em import _write_json
from nlmefit.estimators.vem import VEM

__all__ = ["main", "run", "TimedVEM"]


class TimedVEM(VEM):
    """VEM that records a timestamp after every step (``stamps``)."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.stamps: list[float] = []

    def _step(self, run):
        out = super()._step(run)
        if str(run.dev).startswith("cuda"):
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return out


def _start(truth: dict) -> dict:
    init = {k: (1.3 * v if not k.startswith(("omega", "sigma")) else v) for k, v in truth.items()}
    init.update({k: 0.2 for k in truth if k.startswith("omega")})
    init.update({k: 0.5 for k in truth if k.startswith("sigma")})
    return init


def _vem_row(label: str, model, df, init: dict, device: str, **options) -> dict:
    est = TimedVEM(covariance=None, device=device, progress=False, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = est.fit(model, df, init=init, seed=1)
        total = time.perf_counter() - t0
    k = res.phases.get("optimise")
    stamps = est.stamps
    plateau = (stamps[k - 1] - t0) if k else float("nan")
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"method": label, "plateau_s": plateau, "plateau_step": k, "steps": len(stamps), "s_per_step": per_step,
            "total_s": total,
            "ofv": float(res.ofv), "m2ll": -2.0 * float(res.loglik), "m2elbo": float(res.likelihoods["elbo"]["m2elbo"]),
            "converged": bool(res.converged), "warnings": sorted({str(w.message).splitlines()[0] for w in caught})}


def _classic_row(label: str, model, df, init: dict, device: str, method: str, **options) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with timer() as t:
            res = nlmefit.fit(model, df, method=method, init=init, seed=1, covariance=None, device=device,
                              progress=False, **options)
    return {"method": label, "plateau_s": None, "plateau_step": None, "steps": int(res.n_iter), "s_per_step": None,
            "total_s": t["s"],
            "ofv": float(res.ofv), "m2ll": -2.0 * float(res.loglik), "m2elbo": None, "converged": bool(res.converged),
            "warnings": sorted({str(w.message).splitlines()[0] for w in caught})}


def run(sizes: list[int], device: str, posterior: str = "gaussian", max_steps: int | None = None) -> list[dict]:
    """Fit every population by each method; print a row each and return the rows. ``max_steps`` is a smoke-test
    mode: it caps both VEM runs (steps, warm start, 200 draws for the final ELBO/IS) and SAEM (max_steps/2
    iterations per phase, 200 IS draws); a capped run may stop before its plateau."""
    cap, saem = {}, {}
    if max_steps is not None:
        cap = {"max_steps": max_steps, "min_steps": min(max_steps, 500), "warm_steps": min(max_steps, 500),
               "n_is": 200, "n_elbo": 200}
        saem = {"n_explore": max(1, max_steps // 2), "n_smooth": max(1, max_steps // 2), "n_samples": 200}
    cpus = os.cpu_count() or 1
    print(f"# machine: {machine(device)}; device {device}; {cpus} CPUs (load {os.getloadavg()[0]:.2f}); "
          f"VEM posterior={posterior}")
    print(f"{'N':>7} {'method':<22}{'plateau s':>10}{'step':>6}{'steps':>7}{'s/step':>9}{'total s':>9}"
          f"{'-2LL':>14}{'-2ELBO':>14}{'conv':>6}")
    rows = []
    for n in sizes:
        model, df, truth = population(n)
        init = _start(truth)
        batch = 200 if n > 200 else None
        results = [_classic_row("FOCE-I", model, df, init, device, "focei"),
                   _classic_row("SAEM", model, df, init, device, "saem", **saem),
                   _vem_row(f"VEM per-subject {posterior}", model, df, init, device, posterior=posterior, **cap),
                   _vem_row(f"VEM amortized {posterior}", model, df, init, device, posterior=posterior,
                            amortized=True, batch_size=batch, **cap)]
        for r in results:
            r.update({"n_subjects": n, "device": device, "machine": machine(device), "cpu_count": cpus,
                      "torch_threads": torch.get_num_threads(), "peak_rss_mb": peak_rss_mb()})
            rows.append(r)

            def f(v, fmt):
                return format(v, fmt) if v is not None and v == v else "-"
            print(f"{n:>7} {r['method']:<22}{f(r['plateau_s'], '10.2f'):>10}{f(r['plateau_step'], 'd'):>6}"
                  f"{r['steps']:>7}{f(r['s_per_step'], '9.4f'):>9}{r['total_s']:>9.2f}{r['m2ll']:>14.3f}"
                  f"{f(r['m2elbo'], '14.3f'):>14}{'yes' if r['converged'] else 'no':>6}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line (``argv``, default ``sys.argv[1:]``; options in the module docstring): runs :func:`run`,
    writes the rows to ``--out`` when given, and returns them."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="population sizes (default 1000 10000)")
    ap.add_argument("--quick", action="store_true", help="N = 1000 only")
    ap.add_argument("--posterior", default="gaussian", choices=("gaussian", "maf", "nsf"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-steps", type=int, default=None, help="smoke-test mode: cap VEM and SAEM (see run())")
    ap.add_argument("--out", default=None, help="also write the rows to this JSON file (atomically)")
    args = ap.parse_args(argv)
    sizes = args.sizes if args.sizes is not None else ([1000] if args.quick else [1000, 10000])
    rows = run(sizes, args.device, args.posterior, args.max_steps)
    if args.out:
        _write_json({"machine": machine(args.device), "device": args.device, "torch": torch.__version__,
                     "cpu_count": os.cpu_count(), "posterior": args.posterior, "rows": rows}, args.out)
        print(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
