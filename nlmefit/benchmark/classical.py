"""Classical-estimator benchmark: ``python -m nlmefit.benchmark.classical [--sizes 1000 10000] [--device cuda]``.

Prints, per problem and device: fit time, number of objective evaluations, objective evaluations per second
(one evaluation = inner modes for every subject + OFV + exact gradient), and peak memory.
"""
from __future__ import annotations

import argparse

import torch

import nlmefit
from nlmefit.benchmark._util import machine, peak_rss_mb, population, timer

__all__ = ["main"]


def _eval_rate(model, df, method: str, device: str, repeats: int = 3) -> float:
    est = nlmefit.get_estimator(method, device=device)
    data = model.prepare(nlmefit.Panel.from_dataframe(df), device=device)
    pset = model.parameters
    u = pset.to_unconstrained(pset.initial(torch.float64, data.y.device)).detach().requires_grad_(True)
    eta = torch.zeros(data.n_subjects, data.q, dtype=torch.float64, device=data.y.device)
    est.evaluate(model, pset.from_unconstrained(u), data, eta, backward_to=u)  # warm-up
    with timer() as t:
        for _ in range(repeats):
            u.grad = None
            est.evaluate(model, pset.from_unconstrained(u), data, eta, backward_to=u)
        if data.y.is_cuda:
            torch.cuda.synchronize()
    return repeats / t["s"]


def run(sizes: list[int], device: str, methods: list[str], fit_max: int) -> None:
    print(f"# machine: {machine(device)}; device {device}")
    print(f"{'problem':<28}{'method':<8}{'N':>8}{'fit s':>10}{'evals':>7}{'eval/s':>9}{'OFV':>14}{'peak MB':>10}")
    problems = [("theophylline 1cmt_oral", nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline")),
                ("pheno_real", nlmefit.models.examples.pheno_real(), nlmefit.datasets.load("pheno"))]
    for n in sizes:
        model, df, _ = population(n)
        problems.append(("sim 1cmt_oral x10 obs", model, df))
    for label, model, df in problems:
        n = int(df["ID"].nunique())
        for method in methods:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            rate = _eval_rate(model, df, method, device)
            fit_s, n_eval, ofv = float("nan"), 0, float("nan")
            if n <= fit_max:
                counter = {"n": 0}
                with timer() as t:
                    res = nlmefit.fit(model, df, method=method, device=device, covariance=None,
                                      progress=lambda k, v: counter.__setitem__("n", k))
                fit_s, n_eval, ofv = t["s"], counter["n"], res.ofv
            mem = (torch.cuda.max_memory_allocated() / 2**20) if device.startswith("cuda") else peak_rss_mb()
            print(f"{label:<28}{method:<8}{n:>8}{fit_s:>10.2f}{n_eval:>7}{rate:>9.2f}{ofv:>14.3f}{mem:>10.0f}")


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--sizes``, ``--device``, ``--methods``, ``--fit-max``;
    prints one row per problem, method and size."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", nargs="*", default=["fo", "focei"])
    ap.add_argument("--fit-max", type=int, default=100000, help="fit only problems with at most this many subjects")
    args = ap.parse_args(argv)
    run(args.sizes, args.device, args.methods, args.fit_max)


if __name__ == "__main__":
    main()
