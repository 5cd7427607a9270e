"""NLME against deep generative baselines on the same held-out subjects: ``nlmefit bench`` / ``python -m
nlmefit.benchmark.generative``.

Every model is fitted on the training subjects, then scored on held-out subjects of the training regimen and,
for the pharmacometric question, on regimens not seen in training (default: 300 mg once and 100 mg every 12 h,
after training on single 100 mg doses):

* NLL: −(1/n) Σ_i log p(y_i), per subject, on the original concentration scale, with its kind (exact | bound |
  estimate | none). NLME: importance-sampling estimate of the marginal likelihood at the fitted θ (``estimate``);
  baselines: see :mod:`nlmefit.baselines` (the standardisation's log-Jacobian is included);
* ENERGY, MMD, SLICED_W, C2ST, COVERAGE_MAE between model samples and the held-out subjects
  (:func:`nlmefit.metrics.compare`, standardised per time point by the held-out data).

NLME predicts an unseen regimen through its mechanism (same θ, new doses). A baseline that takes the dose
context as an input (``conditional``) is asked with the new regimen's context; the others get "not applicable".

NLME models: FOCE-I (``nlme_focei``) and per-subject flow VEM (``nlme_vem``, NSF posteriors, started from the
FOCE-I estimates), both with the simulator's structural model and covariate effects (or the model given for a
data set), automatic initial values.

Data sets: :func:`~nlmefit.benchmark.generative_data.bench_from_data` (``nlmefit bench --data DATA --model M``)
splits a data set on a common design by subject; with ``--unseen-dose AMT`` the subjects of one dose level are
held out of training and form the unseen-regimen rows (e.g. the nlmixr2 benchmark sets' 120 mg group after
training on 10–60 mg).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import nlmefit
from nlmefit._io import atomic_write
from nlmefit.baselines import PanelView
from nlmefit.benchmark._util import machine
from nlmefit.benchmark.generative_data import SIMULATORS, BenchData, simulate_benchmark
from nlmefit.errors import DataError, ModelSpecError
from nlmefit.marginal import marginal_loglik
from nlmefit.metrics import compare
from nlmefit.progress import NoBar, logging_redirect, progress_bar

__all__ = ["MODELS", "BenchResult", "run_benchmark", "make_baseline", "main"]

NLME_MODELS = ("nlme_focei", "nlme_vem")
BASELINE_MODELS = ("ppca", "vae", "ddpm", "ebm", "gan", "nf", "flow_matching")
MODELS = NLME_MODELS + BASELINE_MODELS
HELD_OUT = "held-out (training regimen)"
logger = logging.getLogger(__name__)
COLUMNS = ["MODEL", "REGIMEN", "KIND", "NLL", "ENERGY", "MMD", "SLICED_W", "C2ST", "COVERAGE_MAE", "FIT_S",
           "DEVICE", "NOTE"]


_CLASSES = {"ppca": ("ppca", "PPCA"), "vae": ("vae", "VAE"), "ddpm": ("ddpm", "DDPM"), "ebm": ("ebm", "EBM"),
            "gan": ("gan", "WGANGP"), "nf": ("nf", "NormalizingFlow"),
            "flow_matching": ("flow_matching", "FlowMatching")}


def make_baseline(name: str, *, quick: bool = False, device=None, seed: int = 0):
    """The harness's configuration of each baseline (``quick``: a few epochs, for tests and smoke runs)."""
    import importlib  # local: each baseline module is imported only when that baseline is asked for

    if name not in _CLASSES:
        raise ModelSpecError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_MODELS)}")
    module, cls_name = _CLASSES[name]
    cls = getattr(importlib.import_module(f"nlmefit.baselines.{module}"), cls_name)
    kw = dict(device=device, seed=seed)
    tr = {"max_epochs": 3, "patience": None} if quick else {}
    if name == "ppca":
        return cls(2, **kw)
    if name == "vae":
        vem = dict(max_steps=60, min_steps=30) if quick else dict(max_steps=1500, min_steps=500)
        return cls(2, conditional=True, vem_options=vem, n_is=100 if quick else 500, **kw)
    if name == "ebm":
        return cls(trainer_options=tr, **kw)
    if name == "gan":
        return cls(trainer_options=tr, **kw)
    if name == "nf":
        return cls(flow="nsf", conditional=True, trainer_options=tr, **kw)
    return cls(conditional=True, trainer_options=tr, **kw)  # ddpm, flow_matching


@dataclass
class BenchResult:
    """The table (one row per model × regimen), the samples behind it and the machine it ran on."""

    table: pd.DataFrame
    samples: dict = field(default_factory=dict)  # (model, regimen) -> [m, d] on the original scale
    views: dict = field(default_factory=dict)  # regimen -> PanelView of the held-out subjects
    machine: str = ""
    total_s: float = 0.0

    def format(self) -> str:
        t = self.table.copy()
        for c in ("NLL", "ENERGY", "MMD", "SLICED_W", "C2ST", "COVERAGE_MAE", "FIT_S"):
            t[c] = t[c].map(lambda v: "n/a" if pd.isna(v) else f"{v:.4g}")
        return t.drop(columns=["DEVICE"]).to_string(index=False)


class _Nlme:
    """An NLME fit behind the same three calls as a baseline: fit, NLL of new subjects, samples for a design."""

    kind = "estimate"
    conditional = True

    def __init__(self, name: str, model: nlmefit.Model, method: str, *, quick: bool, device, seed: int, start=None,
                 progress: bool | None = None):
        self.name, self.model, self.method = name, model, method
        self.quick, self.device, self.seed, self.start = quick, device, seed, start
        self.progress = progress

    def fit(self, train: pd.DataFrame):
        model = self.model
        t0 = time.perf_counter()
        if self.method == "focei":
            self.result = nlmefit.fit(model, train, method="focei", covariance=None, device=self.device,
                                      progress=self.progress)
        else:
            opts = dict(max_steps=40, min_steps=20) if self.quick else {}
            init = None if self.start is None else self.start.estimates.to_dict()
            self.result = nlmefit.fit(model, train, method="vem", posterior="nsf", init=init, covariance=None,
                                      seed=self.seed, device=self.device, progress=self.progress, **opts)
        self.fit_time_s = time.perf_counter() - t0
        return self

    def log_prob(self, frame: pd.DataFrame) -> np.ndarray:
        model = self.result.model
        data = model.prepare(frame, device=self.device)
        p = self.result.population_parameters(device=data.y.device)
        est = marginal_loglik(model, p, data, "is", n_samples=200 if self.quick else 1000, seed=self.seed,
                              progress=False)
        lp = np.asarray(est.loglik_i)
        if getattr(getattr(model, "error", None), "log_scale", False):  # density of log(DV) → of DV
            lp = lp - torch.where(data.mask, data.y, torch.zeros_like(data.y)).sum(-1).cpu().numpy()
        return lp

    def sample(self, frame: pd.DataFrame, times, n: int) -> np.ndarray:
        ids = frame["ID"].nunique()
        reps = max(1, int(np.ceil(n / ids)))
        sim = nlmefit.simulate(self.result.model, self.result, data=frame, n=reps, seed=self.seed + 7)
        sim["ID"] = sim["REP"].astype(np.int64) * (int(frame["ID"].max()) + 1) + sim["ID"]
        view = PanelView.from_panel(sim.drop(columns="REP"), times=times, common_regimen=False)
        return view.y[:n]


def _nll(lp: np.ndarray) -> float:
    return float(-np.mean(lp))


def run_benchmark(bench: BenchData, *, models=MODELS, n_samples: int = 1000, quick: bool = False, device=None,
                  seed: int = 0, progress: bool | None = None) -> BenchResult:
    """Fit every model in ``models`` on ``bench.train`` and score it (see the module docstring). ``progress``: a bar
    over the models (None: automatic, :mod:`nlmefit.progress`); each model's start is logged (INFO)."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ModelSpecError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    t_start = time.perf_counter()
    times = np.asarray(bench.times, dtype=float)
    train_view = PanelView.from_panel(bench.train, times=times, common_regimen=False)
    frames = {HELD_OUT: bench.test, **bench.unseen}
    views = {k: PanelView.from_panel(f, times=times, common_regimen=False) for k, f in frames.items()}
    dev = "cpu" if device is None else str(device)
    rows, samples = [], {}

    def score(name, kind, fit_s, regimen, lp, smp, note=""):
        met = compare(smp, views[regimen].y, times=times, seed=seed).set_index("METRIC")["VALUE"]
        rows.append({"MODEL": name, "REGIMEN": regimen, "KIND": kind, "NLL": np.nan if lp is None else _nll(lp),
                     **{k: float(met[k]) for k in ("ENERGY", "MMD", "SLICED_W", "C2ST", "COVERAGE_MAE")},
                     "FIT_S": fit_s, "DEVICE": dev, "NOTE": note})
        samples[(name, regimen)] = smp

    focei = None
    bar = progress_bar(len(models), "bench", "model", enabled=progress)
    for k, name in enumerate(models):
        with logging_redirect(bar):
            logger.info("bench: fitting %s …", name)
        bar.set_postfix_str(name, refresh=False)
        bar.update(k - bar.n)  # the models done so far
        if name in NLME_MODELS:
            method = "focei" if name == "nlme_focei" else "vem"
            m = _Nlme(name, bench.fit_model, method, quick=quick, device=device, seed=seed,
                      start=focei.result if (focei is not None and method == "vem") else None,
                      progress=False if isinstance(bar, NoBar) else None).fit(bench.train)
            if method == "focei":
                focei = m
            for regimen, frame in frames.items():
                score(name, m.kind, m.fit_time_s, regimen, m.log_prob(frame), m.sample(frame, times, n_samples))
            continue
        b = make_baseline(name, quick=quick, device=device, seed=seed).fit(train_view)
        for regimen, view in views.items():
            if regimen != HELD_OUT and not b.conditional:
                rows.append({"MODEL": name, "REGIMEN": regimen, "KIND": b.kind, "NLL": np.nan, **dict.fromkeys(
                    ("ENERGY", "MMD", "SLICED_W", "C2ST", "COVERAGE_MAE"), np.nan), "FIT_S": b.fit_time_s,
                    "DEVICE": dev, "NOTE": "not applicable (no dose input)"})
                continue
            lp = None if b.kind == "none" else b.log_prob(view, seed=seed)
            # each draw under the regimen of one held-out subject (cycling), like NLME's simulation of each subject
            smp = b.sample(n_samples, context=view.context[np.arange(n_samples) % view.n], seed=seed + 3)
            note = "dose as input; regimen not seen in training" if regimen != HELD_OUT else ""
            score(name, b.kind, b.fit_time_s, regimen, lp, smp, note)
    bar.update(len(models) - bar.n)
    bar.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    return BenchResult(table=table, samples=samples, views=views, machine=machine(dev),
                       total_s=time.perf_counter() - t_start)


# ---------------------------------------------------------------------- figures and files
def save(result: BenchResult, out: str | os.PathLike) -> list[Path]:
    """Write ``table.csv``, ``table.txt``, ``metrics.png`` (bar chart) and ``profiles.png`` into ``out``."""
    # local: matplotlib only when figures are written. Figure objects, not pyplot: no backend is chosen or
    # switched (matplotlib.use("Agg") here would end inline figures in the notebook that calls save)
    from matplotlib.figure import Figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def atomic(path: Path, write, binary: bool = False) -> None:
        atomic_write(path, write, binary=binary)
        written.append(path)

    atomic(out / "table.csv", lambda fh: result.table.to_csv(fh, index=False))
    atomic(out / "table.txt", lambda fh: fh.write(result.format() + f"\n\nmachine: {result.machine}\n"))
    regimens = list(result.views)
    metrics = ["NLL", "ENERGY", "MMD", "SLICED_W", "C2ST", "COVERAGE_MAE"]
    fig = Figure(figsize=(3.2 * len(metrics), 2.8 * len(regimens)))
    axes = fig.subplots(len(regimens), len(metrics), squeeze=False)
    for r, reg in enumerate(regimens):
        sub = result.table[result.table["REGIMEN"] == reg]
        for c, met in enumerate(metrics):
            ax = axes[r, c]
            ax.bar(sub["MODEL"], sub[met].to_numpy(dtype=float), color="C0")
            ax.set_title(f"{met} — {reg}" if c == 0 else met, fontsize=8)
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    atomic(out / "metrics.png", lambda fh: fig.savefig(fh, format="png", dpi=90), binary=True)
    names = list(dict.fromkeys(m for m, _ in result.samples))
    fig = Figure(figsize=(2.6 * len(names), 2.4 * len(regimens)))
    axes = fig.subplots(len(regimens), len(names), squeeze=False, sharey="row")
    for r, reg in enumerate(regimens):
        v = result.views[reg]
        obs_q = np.nanquantile(v.y, [0.05, 0.5, 0.95], axis=0)
        for c, name in enumerate(names):
            ax = axes[r, c]
            smp = result.samples.get((name, reg))
            if smp is not None:
                q = np.quantile(smp, [0.05, 0.5, 0.95], axis=0)
                ax.fill_between(v.times, q[0], q[2], alpha=0.3, color="C1")
                ax.plot(v.times, q[1], color="C1", lw=1)
            else:
                ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center")
            for k in range(3):
                ax.plot(v.times, obs_q[k], "k--" if k != 1 else "k-", lw=0.8)
            ax.set_title(name if r == 0 else "", fontsize=8)
            if c == 0:
                ax.set_ylabel(reg, fontsize=7)
    fig.tight_layout()
    atomic(out / "profiles.png", lambda fh: fig.savefig(fh, format="png", dpi=90), binary=True)
    return written


# ---------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--simulate", default="1cmt_oral", choices=sorted(SIMULATORS),
                   help="shipped simulator (1- or 2-cmt oral population with covariates; default 1cmt_oral)")
    p.add_argument("--data", default=None, metavar="DATA",
                   help="benchmark on a data set (CSV or shipped name) on a common design instead of a simulation; "
                        "needs --model")
    p.add_argument("--model", default=None, help="with --data: the NLME library model to fit (e.g. 1cmt_oral)")
    p.add_argument("--error", default="proportional", help="with --data: residual error model (default proportional)")
    p.add_argument("--where", default=None, metavar="CONDITION", help="with --data: keep the records meeting "
                   "CONDITION (pandas query), e.g. \"SD == 1\"")
    p.add_argument("--test-fraction", type=float, default=0.25, help="with --data: held-out fraction of subjects")
    p.add_argument("--unseen-dose", type=float, default=None, metavar="AMT",
                   help="with --data: hold the subjects whose first dose is AMT out of training (unseen-regimen rows)")
    p.add_argument("--n-train", type=int, default=500, help="training subjects (default 500)")
    p.add_argument("--n-test", type=int, default=200, help="held-out subjects per regimen (default 200)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--samples", type=int, default=1000, help="model samples per regimen for the metrics")
    p.add_argument("--no-unseen", action="store_true", help="skip the unseen-regimen rows")
    p.add_argument("--quick", action="store_true", help="a few training epochs per model (smoke test)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for table.csv, table.txt, metrics.png, profiles.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no line per model on stderr")


def run_from_args(args, bench: BenchData | None = None) -> int:
    """Run the benchmark described by parsed arguments (``bench``: frames already built, e.g. by the CLI's
    ``--data`` path) and print the table."""
    if args.n_train < 2 or args.n_test < 2:
        raise DataError("--n-train and --n-test must be at least 2")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if bench is None:
        if args.data is not None:
            raise ModelSpecError("--data is read by the nlmefit command (nlmefit bench --data ...)")
        bench = simulate_benchmark(args.simulate, args.n_train, args.n_test, unseen={} if args.no_unseen else None,
                                   seed=args.seed)
    elif args.no_unseen:
        bench.unseen = {}
    if args.device and str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError("--device cuda: no CUDA device is available")
    res = run_benchmark(bench, models=models, n_samples=args.samples, quick=args.quick, device=args.device,
                        seed=args.seed, progress=False if getattr(args, "quiet", False) else None)
    n_train, n_test = bench.train["ID"].nunique(), bench.test["ID"].nunique()
    print(f"nlmefit bench: {bench.name}, {n_train} training / {n_test} held-out subjects; NLL per subject on the "
          f"concentration scale; {res.machine}; {res.total_s:.1f} s")
    print(res.format())
    if args.out:
        for path in save(res, args.out):
            print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """Command line (``argv``, default ``sys.argv[1:]``; the options of ``nlmefit bench``, see
    :func:`add_arguments`): runs the benchmark, prints the table, writes it to ``--out`` when given; returns 0."""
    ap = argparse.ArgumentParser(prog="python -m nlmefit.benchmark.generative", description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    return run_from_args(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
