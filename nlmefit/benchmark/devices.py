"""CPU versus CUDA, per subject: ``python -m nlmefit.benchmark.devices [--sizes 1000 10000 100000]``.

For N simulated 1-compartment oral subjects (10 samples each) prints, for each task, the cost per subject in
microseconds on the CPU and on CUDA side by side (CUDA "n/a" without a device) and their ratio:

* ``fo`` / ``focei`` / ``laplace``: one objective evaluation (modes of every subject, −2LL, exact gradient);
* ``saem``: one E-step sweep (the default kernels) of every chain;
* ``is``: 100 importance draws of every subject;
* ``simulate``: one simulated replicate of every subject.

All in float64; CUDA timings are synchronised. The first call of each task is a warm-up, not timed.
"""
from __future__ import annotations

import argparse
import time

import torch

import nlmefit
from nlmefit.benchmark._util import machine, population
from nlmefit.estimators.mcmc import init_chains, mcmc_sweep
from nlmefit.marginal import marginal_loglik

__all__ = ["main", "run", "TASKS"]

TASKS = ("fo", "focei", "laplace", "saem", "is", "simulate")


def _timed(fn, device: str, repeats: int) -> float:
    """Seconds per call of ``fn`` after one warm-up call."""
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _task(task: str, model, df, truth: dict, device: str):
    """A no-argument callable doing one unit of ``task`` on ``device``."""
    data = model.prepare(nlmefit.Panel.from_dataframe(df), device=device)
    pset = model.parameters
    p = pset.params_from_dict(truth)
    p = nlmefit.Params({k: v.to(data.y.device) for k, v in p.theta.items()}, p.omega.to(data.y.device),
                       {k: v.to(data.y.device) for k, v in p.sigma.items()})
    eta = torch.zeros(data.n_subjects, data.q, dtype=torch.float64, device=data.y.device)
    if task in ("fo", "focei", "laplace"):
        est = nlmefit.get_estimator(task, device=device)
        u = pset.to_unconstrained(p).detach().requires_grad_(True)

        def one():
            u.grad = None
            est.evaluate(model, pset.from_unconstrained(u), data, eta, backward_to=u)
        return one
    if task == "saem":
        gen = torch.Generator(device=data.y.device)
        gen.manual_seed(0)
        state = init_chains(1, eta)
        return lambda: mcmc_sweep(model, p, data, state, {"prior": 2, "block": 2, "component": 2}, gen)
    if task == "is":
        return lambda: marginal_loglik(model, p, data, "is", n_samples=100, seed=0, proposal="laplace",
                                       min_ess=0.0)
    if task == "simulate":
        return lambda: nlmefit.simulate(model, truth, df, seed=0, device=device)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def run(sizes: list[int], tasks: list[str], repeats: int = 3) -> list[dict]:
    """The rows (printed as they come)."""
    cuda = torch.cuda.is_available()
    print(f"# CPU: {machine('cpu')}")
    print(f"# CUDA: {machine('cuda') if cuda else 'not available'}")
    print(f"{'task':<10}{'N':>9}{'CPU us/subj':>14}{'CUDA us/subj':>14}{'CPU/CUDA':>10}")
    rows = []
    for n in sizes:
        model, df, truth = population(n)
        for task in tasks:
            cpu = _timed(_task(task, model, df, truth, "cpu"), "cpu", repeats) / n * 1e6
            gpu = _timed(_task(task, model, df, truth, "cuda"), "cuda", repeats) / n * 1e6 if cuda else float("nan")
            rows.append({"task": task, "n": n, "cpu_us": cpu, "cuda_us": gpu})
            shown = f"{gpu:>14.2f}{cpu / gpu:>10.1f}" if cuda else f"{'n/a':>14}{'':>10}"
            print(f"{task:<10}{n:>9}{cpu:>14.2f}{shown}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv``, default ``sys.argv[1:]``): ``--sizes``, ``--tasks``, ``--repeats``."""
    ap = argparse.ArgumentParser(prog="python -m nlmefit.benchmark.devices", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    run(args.sizes, args.tasks, args.repeats)


if __name__ == "__main__":  # pragma: no cover
    main()
