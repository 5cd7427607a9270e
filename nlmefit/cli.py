"""The ``nlmefit`` command: ``validate``, ``simulate``, ``fit``.

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
    prov = (raw.get("extra") or {}).get("cli")
    if not prov:
        raise ModelSpecError(f"{path} was not written by `nlmefit fit` (no record of its data and model); load it "
                             f"in Python with FitResult.from_json(path, model=...) instead")
    df, _ = _read_data(prov["data"])
    model = _load_model(prov["model"], prov.get("error"), prov.get("dvid"))
    res = FitResult.from_dict(raw, model=model)
    res.data = model.prepare(df, check_likelihood=False)
    return res


def cmd_validate(args) -> int:
    from nlmefit.panel import Panel

    df, _ = _read_data(args.data)
    panel = Panel.from_dataframe(df, sort=args.sort)
    print(repr(panel))
    return 0


def cmd_simulate(args) -> int:
    from nlmefit.simulation import simulate

    df, _ = _read_data(args.data)
    model = _load_model(args.model, args.error)
    out = simulate(model, _params_arg(args), df, n=args.n, seed=args.seed, residual=not args.no_residual)
    _atomic_csv(out, args.out)
    print(f"wrote {len(out)} rows ({args.n} replicate(s)) to {args.out}")
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
    result.extra["cli"] = {"data": data_spec, "model": model_name, "error": args.error, "dvid": dvid}
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

    s = sub.add_parser("simulate", help="simulate replicates of a dataset's design from a model")
    s.add_argument("data", help="CSV file (records; DV may be empty) or shipped dataset name")
    s.add_argument("--model", required=True, help="library name or path/file.py:object")
    s.add_argument("--error", default=None, help="error model for a library model (default additive)")
    s.add_argument("--params", help="JSON file {name: value} (names as in result.json estimates)")
    s.add_argument("--param", action="append", metavar="NAME=VALUE", help="one parameter value (repeatable)")
    s.add_argument("-n", type=int, default=1, help="number of replicates")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-residual", action="store_true", help="simulate without residual error")
    s.add_argument("--out", required=True, help="output CSV")
    s.set_defaults(func=cmd_simulate)

    f = sub.add_parser("fit", help="estimate a model")
    f.add_argument("data", help="CSV file or shipped dataset name")
    f.add_argument("--model", default=None, help="library name or path/file.py:object")
    f.add_argument("--error", default=None,
                   choices=["additive", "proportional", "combined1", "combined2", "exponential"])
    f.add_argument("--method", default="focei", choices=["fo", "foce", "focei", "laplace", "agq", "saem"])
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
