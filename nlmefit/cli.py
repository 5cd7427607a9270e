"""The ``nlmefit`` command: ``validate``, ``fit``, ``diagnose``, ``simulate``.

Exit codes: 0 success, 2 bad data or model specification (one clear line on stderr), 1 an estimation failure.
A model is a library name (``1cmt_oral``) or ``path/file.py:object`` (an object that is a Model, or a function
returning one). DATA is a CSV path or the name of a shipped dataset (``theophylline``, ``pheno``, ...).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd

__all__ = ["main"]

#: the model each shipped dataset is fitted with when --model is not given
DEFAULT_MODELS = {"theophylline": "1cmt_oral", "pheno": "pheno_real", "warfarin": "1cmt_oral",
                  "wang2007": "wang2007",
                  "oral_1cpt": "1cmt_oral", "bolus_2cpt": "2cmt_iv", "infusion_1cpt": "1cmt_iv"}


def _read_data(spec: str) -> tuple[pd.DataFrame, str]:
    from nlmefit import datasets

    if os.path.exists(spec):
        sep = "\t" if spec.endswith((".tsv", ".txt")) else ","
        try:
            return pd.read_csv(spec, sep=sep), Path(spec).stem
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
            from nlmefit.errors import DataError

            raise DataError(f"{spec}: cannot be read as CSV ({e})") from None
    if spec in datasets.names():
        return datasets.load(spec), spec
    from nlmefit.errors import DataError

    raise DataError(f"{spec!r} is neither a file nor a shipped dataset ({', '.join(datasets.names())})")


def _load_model(spec: str, error: str | None, dvid: str | None = None):
    from nlmefit.errors import ModelSpecError
    from nlmefit.models import Model, library
    from nlmefit.models.examples import EXAMPLES

    if spec in EXAMPLES:
        return EXAMPLES[spec]()
    if ":" in spec and spec.split(":")[0].endswith(".py"):
        path, obj = spec.rsplit(":", 1)
        if not os.path.exists(path):
            raise ModelSpecError(f"model file {path!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location("nlmefit_user_model", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)  # the user's own code, named by the user on the command line
        if not hasattr(module, obj):
            raise ModelSpecError(f"{path} has no object {obj!r}")
        m = getattr(module, obj)
        m = m() if callable(m) and not isinstance(m, Model) else m
        if not isinstance(m, Model):
            raise ModelSpecError(f"{spec} is not a nlmefit Model (got {type(m).__name__})")
        return m
    return library.get(spec, error=error or "additive", dvid=dvid)


def _params_arg(args) -> dict:
    values: dict = {}
    if args.params:
        with open(args.params) as fh:
            values.update(json.load(fh))
    for item in args.param or []:
        if "=" not in item:
            from nlmefit.errors import ModelSpecError

            raise ModelSpecError(f"--param expects NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        values[k] = float(v)
    return values


def _load_fit(result_dir: str):
    """The FitResult in RESULT_DIR/result.json with its model and data attached again (from the provenance
    ``nlmefit fit`` recorded), ready for diagnostics and simulation."""
    from nlmefit.errors import ModelSpecError
    from nlmefit.results import FitResult

    path = Path(result_dir) / "result.json" if Path(result_dir).is_dir() else Path(result_dir)
    if not path.exists():
        raise ModelSpecError(f"{result_dir}: no result.json (write one with `nlmefit fit ... --out DIR`)")
    with open(path) as fh:
        raw = json.load(fh)
    prov = raw.get("source") or (raw.get("extra") or {}).get("cli")  # schema 1 kept it in "extra"
    if not prov:
        raise ModelSpecError(f"{path} was not written by `nlmefit fit` (no record of its data and model); load it "
                             f"in Python with FitResult.from_json(path, model=...) instead")
    df, _ = _read_data(prov["data"])
    model = _load_model(prov["model"], prov.get("error"), prov.get("dvid"))
    res = FitResult.from_dict(raw, model=model)
    return res.replace(data=model.prepare(df, check_likelihood=False))


def cmd_validate(args) -> int:
    from nlmefit.panel import Panel

    df, _ = _read_data(args.data)
    panel = Panel.from_dataframe(df, sort=args.sort)
    print(repr(panel))
    return 0


def cmd_simulate(args) -> int:
    from nlmefit.errors import ModelSpecError

    if args.fit is not None:
        return _simulate_regimens(args)
    if args.regimen:
        raise ModelSpecError("--regimen needs --fit RESULT_DIR (the fitted model to simulate from)")
    if args.data is None or args.model is None:
        raise ModelSpecError("give DATA and --model (replicates of a dataset), or --fit RESULT_DIR --regimen ...")
    from nlmefit.simulation import simulate

    df, _ = _read_data(args.data)
    model = _load_model(args.model, args.error)
    out = simulate(model, _params_arg(args), df, n=args.n, seed=args.seed, residual=not args.no_residual)
    _atomic_csv(out, args.out)
    print(f"wrote {len(out)} rows ({args.n} replicate(s)) to {args.out}")
    return 0


def cmd_diagnose(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nlmefit import diagnostics as dg

    fit = _load_fit(args.result)
    out = Path(args.out) if args.out else Path(args.result) / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    save(dg.plot_gof(fit), "gof.png")
    for k, fig in enumerate(dg.plot_individuals(fit, per_page=args.per_page), start=1):
        save(fig, f"individuals_{k:02d}.png")
    save(dg.plot_eta_distributions(fit), "eta.png")
    if len(fit.data.panel.covariate_names):
        save(dg.plot_eta_covariates(fit), "eta_covariates.png")
    res_npde = dg.npde(fit, n_rep=args.n_rep, seed=args.seed)
    save(dg.plot_npde(res_npde), "npde.png")
    tests = res_npde.tests()
    _atomic_csv(res_npde.table, str(out / "npde.csv"))
    _atomic_csv(tests.reset_index(), str(out / "npde_tests.csv"))
    written += ["npde.csv", "npde_tests.csv"]
    for pc in (False, True):
        v = dg.vpc(fit, n_rep=args.n_rep, seed=args.seed, pred_corrected=pc)
        name = "pcvpc" if pc else "vpc"
        save(dg.plot_vpc(v), f"{name}.png")
        _atomic_csv(v.percentiles, str(out / f"{name}.csv"))
        written.append(f"{name}.csv")
        if v.blq is not None:
            _atomic_csv(v.blq, str(out / f"{name}_blq.csv"))
            written.append(f"{name}_blq.csv")
        print(f"{name.upper()}: observed percentiles inside the simulated {100 * v.ci:g}% intervals in "
              f"{100 * v.coverage():.0f}% of bins")
    print("NPDE tests:")
    print(tests.to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"\nwrote {len(written)} files to {out}: {', '.join(written)}")
    return 0


def _parse_target(text: str) -> tuple[str, float | None, tuple[float, float] | None]:
    """``AUC>=400`` or ``CTROUGH in 10:20`` → (metric, threshold, window)."""
    from nlmefit.errors import ModelSpecError

    t = text.replace(" ", "")
    if ">=" in t:
        m, v = t.split(">=", 1)
        try:
            return m, float(v), None
        except ValueError:
            pass
    elif "in" in t.lower():
        m, w = t.lower().split("in", 1)
        try:
            lo, hi = (float(x) for x in w.split(":"))
            return m.upper(), None, (lo, hi)
        except ValueError:
            pass
    raise ModelSpecError(f"--target {text!r}: expected METRIC>=VALUE (e.g. AUC>=400) or METRIC in LOW:HIGH "
                         f"(e.g. CTROUGH in 10:20)")


def _simulate_regimens(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import nlmefit
    from nlmefit.errors import ModelSpecError
    from nlmefit.simulation import plot_pta

    if not args.regimen:
        raise ModelSpecError("give at least one --regimen \"...\" (e.g. \"500 mg po q12h x14\")")
    if (args.population is None) == (args.subjects is None):
        raise ModelSpecError("give --population N (virtual subjects) or --subjects observed|ID,ID,...")
    fit = _load_fit(args.fit)
    subjects = None
    if args.subjects is not None:
        if args.subjects == "observed":
            subjects = "observed"
        else:
            ids = fit.data.panel.ids
            conv = type(ids[0].item() if hasattr(ids[0], "item") else ids[0])
            try:
                subjects = [conv(x) for x in args.subjects.split(",")]
            except ValueError:
                raise ModelSpecError(f"--subjects {args.subjects!r}: expected 'observed' or IDs like 1,2,3") from None
    sim = nlmefit.simulate_regimens(fit, args.regimen, population=args.population, subjects=subjects,
                                    n_draws=args.n_draws, residual=not args.no_residual,
                                    steady_state=args.steady_state, threshold=args.threshold, seed=args.seed,
                                    posterior=args.posterior, weight_col=args.weight_col)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_csv(sim.quantiles(), str(out / "profile_quantiles.csv"))
    _atomic_csv(sim.exposures, str(out / "exposures.csv"))
    _atomic_csv(sim.summary().rename_axis("REGIMEN").reset_index(), str(out / "exposure_summary.csv"))
    sim.plot_profiles().savefig(out / "profiles.png", dpi=120)
    metric = "AUC"
    sim.plot_exposures(metric).savefig(out / "exposures.png", dpi=120)
    written = ["profile_quantiles.csv", "exposures.csv", "exposure_summary.csv", "profiles.png", "exposures.png"]
    if args.target:
        m, thr, win = _parse_target(args.target)
        mics = [float(x) for x in args.mic.split(",")] if args.mic else None
        tab = sim.pta(m, thr, mic=mics, window=win)
        _atomic_csv(tab, str(out / "pta.csv"))
        plot_pta(tab).savefig(out / "pta.png", dpi=120)
        written += ["pta.csv", "pta.png"]
        print(tab.to_string(index=False))
    print(sim.summary().T.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"\nwrote {', '.join(written)} to {out}")
    return 0


def _atomic_csv(df: pd.DataFrame, path: str) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def cmd_fit(args) -> int:
    from tqdm import tqdm

    import nlmefit
    from nlmefit.errors import ModelSpecError

    df, label = _read_data(args.data)
    model_name = args.model or DEFAULT_MODELS.get(label)
    if model_name is None:
        raise ModelSpecError(f"give --model for {args.data} (a library name: {', '.join(nlmefit.library.NAMES)})")
    dvid = args.dvid if args.dvid is not None else ("cp" if label == "warfarin" else None)
    model = _load_model(model_name, args.error, dvid)
    init = _params_arg(args) or None
    unit = " iter" if args.method == "saem" else " eval"
    bar = tqdm(desc=f"{args.method} {model.name}", unit=unit, file=sys.stderr, disable=args.quiet)

    def progress(n_eval: int, ofv: float) -> None:
        bar.update(1)
        if ofv == ofv:  # SAEM has no OFV while it runs
            bar.set_postfix(ofv=f"{ofv:.4f}")

    options = dict(progress=progress, device=args.device)
    if args.method == "nuts":
        options = dict(device=args.device, progress=not args.quiet)
        for flag, key in (("chains", "num_chains"), ("draws", "num_samples"), ("warmup", "warmup_steps")):
            if getattr(args, flag) is not None:
                options[key] = getattr(args, flag)
    elif any(getattr(args, f) is not None for f in ("chains", "draws", "warmup")):
        raise ModelSpecError("--chains, --draws and --warmup apply to --method nuts")
    if args.no_cov:
        options["covariance"] = None
    if args.n_nodes is not None:
        if args.method != "agq" and args.loglik != "agq":
            raise ModelSpecError("--n-nodes applies to --method agq or --loglik agq")
        if args.method == "agq":
            options["n_nodes"] = args.n_nodes
    lik_opts = {"n_samples": args.n_samples} if args.loglik == "is" else {}
    if args.loglik == "agq" and args.n_nodes is not None:
        lik_opts["n_nodes"] = args.n_nodes
    if args.method == "saem" and args.n_samples is not None:
        options["n_samples"] = args.n_samples
    lik_opts = {k: v for k, v in lik_opts.items() if v is not None}
    try:
        result = nlmefit.fit(model, df, method=args.method, init=init, seed=args.seed,
                             compute_loglik=args.loglik, loglik_options=lik_opts, **options)
    finally:
        bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_spec = str(Path(args.data).resolve()) if os.path.exists(args.data) else args.data
    result = result.replace(source={"data": data_spec, "model": model_name, "error": args.error, "dvid": dvid})
    result.to_json(out / "result.json")
    _atomic_csv(result.summary().rename_axis("parameter").reset_index(), str(out / "summary.csv"))
    _atomic_csv(result.predictions, str(out / "predictions.csv"))
    _atomic_csv(result.individual_estimates, str(out / "individual_estimates.csv"))
    print(result.summary_text())
    for meth, val in result.likelihoods.items():
        extra = f" (Monte-Carlo SE {val['se']:.3f}, {val['n_samples']} samples)" if meth == "is" else ""
        print(f"  -2LL by {meth}: OFV {val['ofv']:.4f}{extra}")
    print(f"\nwrote {out / 'result.json'}, summary.csv, predictions.csv, individual_estimates.csv")
    return 0 if result.converged else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nlmefit", description="Nonlinear mixed-effects modelling from NONMEM-style data")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a dataset and print its summary")
    v.add_argument("data", help="CSV file or shipped dataset name")
    v.add_argument("--sort", action="store_true", help="sort records by ID and TIME instead of rejecting disorder")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("simulate", help="simulate replicates of a dataset, or regimens from a fit (--fit)")
    s.add_argument("data", nargs="?", help="CSV file (records; DV may be empty) or shipped dataset name")
    s.add_argument("--model", default=None, help="library name or path/file.py:object")
    s.add_argument("--error", default=None, help="error model for a library model (default additive)")
    s.add_argument("--params", help="JSON file {name: value} (names as in result.json estimates)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE", help="one parameter value (repeatable)")
    s.add_argument("-n", type=int, default=1, help="number of replicates")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-residual", action="store_true", help="simulate without residual error")
    s.add_argument("--out", required=True, help="output CSV (replicates) or folder (--fit)")
    s.add_argument("--fit", default=None, metavar="RESULT_DIR", help="simulate regimens from this fit")
    s.add_argument("--regimen", action="append", help='a regimen, e.g. "1000 mg loading then 500 mg q12h x14, '
                   'infusion 1h" (repeatable; grammar: docs/regimens.md)')
    s.add_argument("--population", type=int, default=None, help="number of virtual subjects")
    s.add_argument("--subjects", default=None, help="'observed' or comma-separated IDs of fitted subjects")
    s.add_argument("--n-draws", type=int, default=100, help="posterior draws per observed subject")
    s.add_argument("--posterior", default="laplace", choices=["laplace", "is", "draws"])
    s.add_argument("--steady-state", action="store_true", help="maintenance phase at steady state (SS=1)")
    s.add_argument("--threshold", type=float, default=None, help="concentration for time/%%fT above it")
    s.add_argument("--target", default=None, help="PTA target: AUC>=400 or 'CTROUGH in 10:20'")
    s.add_argument("--mic", default=None, help="comma-separated MICs: PTA of METRIC/MIC >= VALUE")
    s.add_argument("--weight-col", default="WT", help="weight covariate for mg/kg regimens")
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("diagnose", help="GOF, individual, eta, NPDE and VPC figures and tables of a fit")
    d.add_argument("result", metavar="RESULT_DIR", help="folder written by `nlmefit fit --out`")
    d.add_argument("--out", default=None, help="output folder (default RESULT_DIR/diagnostics)")
    d.add_argument("--n-rep", type=int, default=500, help="simulated replicates for NPDE and VPC")
    d.add_argument("--per-page", type=int, default=12, help="subjects per individual-fit page")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_diagnose)

    f = sub.add_parser("fit", help="estimate a model")
    f.add_argument("data", help="CSV file or shipped dataset name")
    f.add_argument("--model", default=None, help="library name or path/file.py:object")
    f.add_argument("--error", default=None,
                   choices=["additive", "proportional", "combined1", "combined2", "exponential"])
    f.add_argument("--method", default="focei", choices=["fo", "foce", "focei", "laplace", "agq", "saem", "nuts"])
    f.add_argument("--chains", type=int, default=None, help="NUTS chains (default 4)")
    f.add_argument("--draws", type=int, default=None, help="NUTS draws per chain after warm-up (default 1000)")
    f.add_argument("--warmup", type=int, default=None, help="NUTS warm-up steps per chain (default 1000)")
    f.add_argument("--loglik", default=None, choices=["is", "agq"],
                   help="add a marginal -2LL evaluation at the estimates (importance sampling or quadrature)")
    f.add_argument("--n-samples", type=int, default=None, help="importance samples per subject (default 2000)")
    f.add_argument("--n-nodes", type=int, default=None, help="quadrature nodes per dimension of eta (agq)")
    f.add_argument("--dvid", default=None, help="the DVID value holding the model's observations (warfarin: cp)")
    f.add_argument("--params", help="JSON file of initial values {name: value}")
    f.add_argument("--param", action="append", metavar="NAME=VALUE", help="one initial value (repeatable)")
    f.add_argument("--out", default="nlmefit-out", help="output folder")
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--device", default=None, help="cpu or cuda")
    f.add_argument("--no-cov", action="store_true", help="skip the covariance step")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_fit)
    return ap


def main(argv: list[str] | None = None) -> int:
    from nlmefit.errors import DataError, EstimationError, ModelSpecError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DataError, ModelSpecError) as e:
        print(f"nlmefit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except EstimationError as e:
        print(f"nlmefit {args.command}: estimation failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
