"""The ``nlmefit`` command: ``validate``, ``fit``, ``scm``, ``diagnose``, ``simulate``, ``bootstrap`` (reference:
docs/cli.md).

Exit codes: 0 success; 2 bad arguments, data, model specification, output location or saved result (one line on
stderr, naming what is wrong, checked before any estimation starts); 1 an estimation failure (or a fit that did not
converge); 130 interrupted (Ctrl-C). A model is a library name (``1cmt_oral``), an example (``pheno_real``) or
``path/file.py:object`` (an object that is a Model, or a function returning one). DATA is a CSV path or the name of
a shipped dataset (``theophylline``, ``pheno``, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

__all__ = ["main", "build_parser", "CliError"]

#: the model each shipped dataset is fitted with when --model is not given
DEFAULT_MODELS = {"theophylline": "1cmt_oral", "pheno": "pheno_real", "warfarin": "1cmt_oral",
                  "wang2007": "wang2007",
                  "oral_1cpt": "1cmt_oral", "bolus_2cpt": "2cmt_iv", "infusion_1cpt": "1cmt_iv"}
CLASSICAL = ("fo", "foce", "focei", "laplace", "agq")
SHARDED = CLASSICAL + ("saem",)  # estimators that run on torch.distributed ranks (--workers, torchrun)
METHODS = CLASSICAL + ("saem", "nuts", "vem")


class CliError(Exception):
    """A bad argument, path or saved result: reported as one line, exit status 2."""


# ---------------------------------------------------------------------- argument types (argparse `type=`)
def _int(text: str, low: int, what: str) -> int:
    try:
        v = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    return _int(text, 0, "a non-negative integer")


def seed_int(text: str) -> int:
    v = _int(text, 0, "a non-negative integer seed")
    if v >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"seed {text!r} is too large (below 2**63)")
    return v


def memory_size(text: str) -> int:
    from nlmefit.memory import parse_memory  # local: argument parsing only

    try:
        return int(parse_memory(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def finite_float(text: str) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.,\[\]]*$")


def name_value(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` with a finite number."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. cl=2.8), got {text!r}")
    k, v = (s.strip() for s in text.split("=", 1))
    if not _NAME.match(k):
        raise argparse.ArgumentTypeError(f"{text!r}: {k!r} is not a parameter name")
    try:
        return k, finite_float(v)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value of {k} must be a finite number, got {v!r}") from None


def _pair(text: str, usage: str) -> tuple[str, str]:
    """``KEY=value`` split and stripped; ``usage`` (e.g. ``COLUMN=UNIT (e.g. TIME=h)``) names the form."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected {usage}, got {text!r}")
    k, v = (s.strip() for s in text.split("=", 1))
    return k, v


def unit_pair(text: str) -> tuple[str, str]:
    """``COLUMN=unit`` (``TIME=h``, ``DV=mg/L``)."""
    k, v = _pair(text, "COLUMN=UNIT (e.g. TIME=h or DV=mg/L)")
    if not k or not v:
        raise argparse.ArgumentTypeError(f"{text!r}: both a column and a unit are needed (e.g. AMT=mg)")
    return k.upper(), v


def column_pair(text: str) -> tuple[str, str]:
    """``CANONICAL=column`` (``DV=CONC``)."""
    from nlmefit.panel.columns import CANONICAL

    k, v = _pair(text, "NAME=COLUMN (e.g. DV=CONC)")
    if k.upper() not in CANONICAL:
        raise argparse.ArgumentTypeError(f"{text!r}: {k!r} is not a NONMEM column name (one of {', '.join(CANONICAL)})")
    if not v:
        raise argparse.ArgumentTypeError(f"{text!r}: no data column given after '='")
    return k.upper(), v


def cov_formula(text: str) -> tuple[str, str]:
    """``param ~ formula`` (``cl ~ log(WT/70)``); the formula's syntax is checked here."""
    from nlmefit.errors import ModelSpecError
    from nlmefit.models.formula import parse_formula

    if "~" not in text:
        raise argparse.ArgumentTypeError(f"expected PARAM ~ FORMULA (e.g. \"cl ~ log(WT/70)\"), got {text!r}")
    p, f = (s.strip() for s in text.split("~", 1))
    if not p.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: {p!r} is not a parameter name")
    if not f:
        raise argparse.ArgumentTypeError(f"{text!r}: empty formula after '~'")
    try:
        parse_formula(p, f)
    except ModelSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return p, f


def omega_block(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(","))
    if len(names) < 2 or not all(n.isidentifier() for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected two or more distinct parameter names separated by commas "
                                         f"(e.g. cl,v), got {text!r}")
    return names


def error_name(text: str) -> str:
    """An error model name or alias (``prop``, ``add``, ``combined`` ...), as the Python API accepts."""
    from nlmefit.errors import ModelSpecError
    from nlmefit.models.error import _ALIASES, get_error_model

    try:
        return get_error_model(text).name
    except ModelSpecError:
        raise argparse.ArgumentTypeError(f"unknown error model {text!r} (choose from additive, proportional, "
                                         f"combined1, combined2, exponential, or {', '.join(_ALIASES)})") from None


def separator(text: str) -> str:
    named = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "space": " ", "whitespace": r"\s+",
             "pipe": "|"}
    if text.lower() in named:
        return named[text.lower()]
    if len(text) != 1 or text.isalnum() or text in "\"'":
        raise argparse.ArgumentTypeError(f"expected one separator character or tab/comma/semicolon/space/"
                                         f"whitespace/pipe, got {text!r}")
    return text


def nonempty(text: str) -> str:
    if not str(text).strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text.strip()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text.strip()


def regimen_text(text: str) -> str:
    from nlmefit.errors import ModelSpecError
    from nlmefit.simulation.regimen import Regimen

    try:
        Regimen.parse(text)
    except (ModelSpecError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).splitlines()[0]) from None
    return text


def target_text(text: str) -> str:
    try:
        _parse_target(text)
    except CliError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return text


def mic_list(text: str) -> list[float]:
    try:
        vals = [positive_float(x) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive MICs (e.g. 0.5,1,2), got {text!r}") \
            from None
    return vals


def subjects_arg(text: str) -> str:
    if text != "observed" and not all(x.strip() for x in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected 'observed' or comma-separated IDs (e.g. 1,2,3), got {text!r}")
    return text


# ---------------------------------------------------------------------- paths
def _writable_folder(folder: Path, flag: str, shown: str) -> None:
    """``folder`` (existing) accepts a new file: probed by creating and removing one."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".nlmefit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"{flag} {shown}: cannot write in {folder} ({e.strerror or e})") from None


def _existing_ancestor(p: Path) -> Path:
    a = p.absolute()
    while not a.exists():
        a = a.parent
    return a


def check_out_dir(path: str, flag: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CliError(f"{flag} {path}: exists and is not a folder")
    anc = _existing_ancestor(p)
    if not anc.is_dir():
        raise CliError(f"{flag} {path}: {anc} is a file, not a folder")
    _writable_folder(anc, flag, path)
    return p


def check_out_file(path: str, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that is a folder, lies under a file, or cannot be written."""
    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise CliError(f"{flag} {path}: is a folder; give a file name such as sim.csv")
    anc = _existing_ancestor(p.parent if str(p.parent) else Path("."))
    if not anc.is_dir():
        raise CliError(f"{flag} {path}: {anc} is a file, not a folder")
    _writable_folder(anc, flag, path)
    return p


# ---------------------------------------------------------------------- data and models
def _read_data(spec: str, sep: str | None = None, where: str | None = None) -> tuple[pd.DataFrame, str]:
    from nlmefit import datasets
    from nlmefit.errors import DataError

    if os.path.exists(spec):
        if os.path.isdir(spec):
            raise DataError(f"{spec}: is a folder, not a CSV file")
        s = sep if sep is not None else ("\t" if spec.endswith((".tsv", ".txt")) else ",")
        try:
            df = pd.read_csv(spec, sep=s, engine="python" if len(s) > 1 else "c")
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as e:
            raise DataError(f"{spec}: cannot be read as CSV ({str(e).strip().splitlines()[0]})") from None
        label = Path(spec).stem
    elif spec in datasets.names():
        df, label = datasets.load(spec), spec
    else:
        raise DataError(f"{spec!r} is neither a file nor a shipped dataset ({', '.join(datasets.names())})")
    if where:
        try:
            kept = df.query(where)
        except Exception as e:  # pandas raises many kinds for a bad expression; all are the user's input
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"--where {where!r}: cannot be applied ({msg}; columns: {list(df.columns)})") from None
        if not isinstance(kept, pd.DataFrame):
            raise DataError(f"--where {where!r}: expected a condition on the columns (e.g. \"EVID == 0 or AMT > 0\")")
        if len(kept) == 0:
            raise DataError(f"--where {where!r} keeps none of the {len(df)} records")
        df = kept.reset_index(drop=True)
    return df, label


def _column_map(df: pd.DataFrame, cols) -> dict[str, str]:
    from nlmefit.errors import DataError

    out: dict[str, str] = {}
    for canon, user in cols or []:
        if user not in df.columns:
            near = [c for c in df.columns if str(c).lower() == user.lower()]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise DataError(f"--col {canon}={user}: the data has no column {user!r} (columns: {list(df.columns)})"
                            f"{hint}")
        if canon in out:
            raise DataError(f"--col {canon} given twice ({out[canon]!r} and {user!r})")
        out[canon] = user
    return out


def _panel(df: pd.DataFrame, columns: dict, sort: bool, require_dv: bool = True):
    from nlmefit.panel import Panel

    return Panel.from_dataframe(df, sort=sort, require_dv=require_dv, **{k.lower(): v for k, v in columns.items()})


def _load_model(spec: str, error: str | None, dvid: str | None = None, covariates: dict | None = None,
                blocks: list | None = None):
    from nlmefit.errors import ModelSpecError
    from nlmefit.models import Omega, library
    from nlmefit.models.examples import EXAMPLES
    from nlmefit.models.spec import attach_reference, load_reference

    custom = spec in EXAMPLES or (":" in spec and spec.split(":")[0].endswith(".py"))
    if custom and (covariates or blocks):
        raise ModelSpecError(f"--cov and --omega-block apply to library models ({', '.join(library.NAMES)}); "
                             f"write them into {spec} instead")
    if spec in EXAMPLES:
        return attach_reference(EXAMPLES[spec](), f"nlmefit.models.examples:{spec}")
    if ":" in spec and spec.split(":")[0].endswith(".py"):
        path, obj = spec.rsplit(":", 1)
        ref = f"{os.path.abspath(path)}:{obj}"
        try:
            return attach_reference(load_reference(ref), ref)
        except ValueError as e:
            raise ModelSpecError(f"--model {spec}: {e}") from None
    if spec not in library.NAMES:
        raise ModelSpecError(f"--model {spec!r}: not a library model ({', '.join(library.NAMES)}), an example "
                             f"({', '.join(EXAMPLES)}) or path/file.py:object")
    kw: dict = {"dvid": dvid}
    if covariates:
        kw["covariates"] = covariates
    if blocks:
        params = library.structure(spec).param_names
        for b in blocks:
            bad = [n for n in b if n not in params]
            if bad:
                raise ModelSpecError(f"--omega-block {','.join(b)}: {bad} not parameters of {spec} ({list(params)})")
        kw["omega"] = Omega({p: 0.1 for p in params}, blocks=[tuple(b) for b in blocks])
    return library.get(spec, error=error or "additive", **kw)


def _params_arg(args, model=None) -> dict:
    from nlmefit.errors import ModelSpecError

    values: dict = {}
    if args.params:
        try:
            with open(args.params) as fh:
                raw = json.load(fh)
        except OSError as e:
            raise CliError(f"--params {args.params}: cannot be read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CliError(f"--params {args.params}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise CliError(f"--params {args.params}: expected a JSON object {{name: value}}")
        for k, v in raw.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CliError(f"--params {args.params}: value of {k!r} must be a finite number, got {v!r}")
        values.update(raw)
    for k, v in args.param or []:
        values[k] = v
    if model is not None and values:
        try:
            model.parameters.params_from_dict(values)
        except ModelSpecError as e:
            raise CliError(f"--param/--params: {e}") from None
    return values


def _init_arg(args, model):
    """``init`` for nlmefit.fit: --param/--params values win; the others start from automatic values (library
    models, or --init auto) or the model's own (--init model)."""
    values = _params_arg(args, model)
    mode = getattr(args, "init", None)
    if mode == "model" and values:
        return model.parameters.params_from_dict(values)
    if mode == "auto" and values:
        from nlmefit.models.initial import library_given

        if library_given(model) is None:
            raise CliError("--init auto with --param/--params works for library models only; for a custom model "
                           "put those values in the model and use --init auto alone, or use --init model")
    return values or mode


def _check_device(device: str | None) -> None:
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")


def _load_fit(result_dir: str):
    """The FitResult in RESULT_DIR/result.json with its model (restored from the saved specification, else from
    the ``source`` record ``nlmefit fit`` wrote) and data attached again, ready for diagnostics and simulation."""
    from nlmefit.results import FitResult

    p = Path(result_dir)
    path = p / "result.json" if p.is_dir() else p
    if not path.exists():
        raise CliError(f"{result_dir}: no result.json (write one with `nlmefit fit ... --out DIR`)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            res = FitResult.from_json(path)
        except ValueError as e:
            raise CliError(str(e)) from None
    why = "; ".join(str(w.message) for w in caught)
    prov = dict(res.source or {})
    if not isinstance(prov.get("data"), str) or not isinstance(prov.get("model", ""), str):
        raise CliError(f"{path} was not written by `nlmefit fit` (no record of its data and model); load it in "
                       f"Python with FitResult.from_json(path, model=...) instead")
    model = res.model
    if str(prov.get("data", "")).lower().endswith((".mod", ".ctl")):  # a control stream: model and data from it
        from nlmefit.nonmem import from_nonmem  # local: pharmpy is imported only for control streams

        run = from_nonmem(prov["data"])
        model = model or run.model
        panel = _panel(run.data, dict(prov.get("columns") or {}), bool(prov.get("sort", False)))
        return res.replace(model=model, data=model.prepare(panel, check_likelihood=False))
    if model is None:
        if not prov.get("model"):
            raise CliError(f"{path}: the model cannot be rebuilt ({why or 'no model record'})")
        model = _load_model(prov["model"], prov.get("error"), prov.get("dvid"),
                            dict(prov.get("covariates") or {}) or None, prov.get("omega_blocks"))
    df, _ = _read_data(prov["data"], prov.get("sep"), prov.get("where"))
    cols = dict(prov.get("columns") or {})
    panel = _panel(df, cols, bool(prov.get("sort", False)))
    return res.replace(model=model, data=model.prepare(panel, check_likelihood=False))


# ---------------------------------------------------------------------- writing
def _atomic_csv(df: pd.DataFrame, path: str) -> None:
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _atomic_fig(fig, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".tmp-{path.name}")
    try:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip("."))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def _retire_old_outputs(out: Path, result) -> list[str]:
    """Outputs in OUT that described an older fit: diagnostics/ is moved aside, a stale result.pt or table file
    (``result.<table>.npz``) removed."""
    notes = []
    diag = out / "diagnostics"
    if diag.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, k = out / f"diagnostics.old-{stamp}", 1
        while dest.exists():
            dest, k = out / f"diagnostics.old-{stamp}-{k}", k + 1
        os.replace(diag, dest)
        notes.append(f"moved diagnostics/ of the previous fit to {dest.name}/ (run `nlmefit diagnose {out}` again)")
    pt = out / "result.pt"
    if not result.weights and pt.exists():
        pt.unlink()
        notes.append("removed result.pt of the previous fit")
    from nlmefit.results.fit_result import EMBED_ROWS  # local: the CLI imports the package lazily

    for table in ("predictions", "individual_estimates"):  # large tables beside result.json (FitResult.to_json)
        f, df = out / f"result.{table}.npz", getattr(result, table, None)
        if f.exists() and (df is None or len(df) <= EMBED_ROWS):
            f.unlink()
            notes.append(f"removed {f.name} of the previous fit")
    return notes


# ---------------------------------------------------------------------- commands
def cmd_validate(args) -> int:
    df, _ = _read_data(args.data, args.sep, args.where)
    panel = _panel(df, _column_map(df, args.col), args.sort, require_dv=not args.no_dv)
    print(repr(panel))
    return 0


def cmd_simulate(args) -> int:
    if args.fit is not None:
        return _simulate_regimens(args)
    if args.regimen:
        raise CliError("--regimen needs --fit RESULT_DIR (the fitted model to simulate from)")
    if args.data is None or args.model is None:
        raise CliError("give DATA and --model (replicates of a dataset), or --fit RESULT_DIR --regimen ...")
    for flag in ("population", "subjects", "target", "mic", "threshold"):
        if getattr(args, flag) is not None:
            raise CliError(f"--{flag} applies to regimen simulation (--fit RESULT_DIR --regimen ...)")
    from nlmefit.simulation import simulate

    # --out is one CSV file, as always, unless --chunk-size, --format or --workers (ranks) ask for part files
    ranks = (args.workers or 1) > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    streamed = args.chunk_size is not None or args.format is not None or ranks
    if streamed:
        if args.out.lower().endswith((".csv", ".parquet")) and not Path(args.out).is_dir():
            raise CliError(f"--out {args.out}: --chunk-size/--format/--workers write part files into a folder; "
                           f"give a folder name (not a .csv/.parquet file)")
        check_out_dir(args.out)
    else:
        check_out_file(args.out)
    fmt = args.format or "csv"
    if fmt == "parquet":
        from nlmefit.simulation.stream import check_format

        check_format(fmt)  # before any work: parquet needs pyarrow
    shard = _join_ranks(args) if streamed else None  # under torchrun or --workers: one rank of several
    df, _ = _read_data(args.data, args.sep, args.where)
    cols = _column_map(df, args.col)
    model = _load_model(args.model, args.error, args.dvid)
    params = _params_arg(args, model)
    data = _panel(df, cols, True, require_dv=False) if (cols or args.sort) else df
    residual = True if args.residual is None else args.residual
    progress = _progress(args) if shard is None or shard.rank == 0 else False
    if streamed:
        res = simulate(model, params, data, n=args.n, seed=args.seed, residual=residual, progress=progress,
                       out=args.out, chunk_size=args.chunk_size, format=fmt)
        if shard is not None:
            _leave_ranks()
        if shard is None or shard.rank == 0:
            print(f"wrote {res.n_rows} rows ({args.n} replicate(s)) in {res.n_chunks} part file(s) of at most "
                  f"{res.chunk_size} subjects to {args.out} (manifest.json lists them; seed {res.seed})")
        return 0
    out = simulate(model, params, data, n=args.n, seed=args.seed, residual=residual, progress=progress)
    _atomic_csv(out, args.out)
    print(f"wrote {len(out)} rows ({args.n} replicate(s)) to {args.out}")
    return 0


def _result_output_dir(args, name: str) -> Path:
    """``--out``, or RESULT_DIR/``name``, checked before any work (RESULT_DIR must exist)."""
    p = Path(args.result)
    if not p.exists():
        raise CliError(f"{args.result}: no such folder (write one with `nlmefit fit ... --out DIR`)")
    res_dir = p if p.is_dir() else p.parent
    out = Path(args.out) if args.out else res_dir / name
    check_out_dir(str(out), "--out" if args.out else f"{name} folder")
    return out


def cmd_diagnose(args) -> int:
    import matplotlib

    matplotlib.use("Agg")

    from nlmefit import diagnostics as dg

    out = _result_output_dir(args, "diagnostics")
    fit = _load_fit(args.result)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig, name: str) -> None:
        _atomic_fig(fig, out / name, 110)
        written.append(name)

    save(dg.plot_gof(fit), "gof.png")
    for k, fig in enumerate(dg.plot_individuals(fit, per_page=args.per_page), start=1):
        save(fig, f"individuals_{k:02d}.png")
    save(dg.plot_eta_distributions(fit), "eta.png")
    if len(fit.data.panel.covariate_names):
        save(dg.plot_eta_covariates(fit), "eta_covariates.png")
    if fit.traces is not None and len(fit.traces):
        save(fit.plot_traces(), "traces.png")
    res_npde = dg.npde(fit, n_rep=args.n_rep, seed=args.seed, progress=_progress(args))
    save(dg.plot_npde(res_npde), "npde.png")
    tests = res_npde.tests()
    _atomic_csv(res_npde.table, str(out / "npde.csv"))
    _atomic_csv(tests.reset_index(), str(out / "npde_tests.csv"))
    written += ["npde.csv", "npde_tests.csv"]
    for pc in (False, True):
        v = dg.vpc(fit, n_rep=args.n_rep, seed=args.seed, pred_corrected=pc, progress=_progress(args))
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
    if args.decomposition:
        dec = dg.decomposition(fit, seed=args.seed)
        _atomic_csv(dec.table, str(out / "decomposition.csv"))
        save(dg.plot_q_kl(dec), "q_kl.png")
        save(dg.plot_aggregate_posterior(dec), "aggregate_posterior.png")
        written.append("decomposition.csv")
        agg = dec.aggregate
        print(f"decomposition: mean KL_i {agg['mean_kl']:.4f}, aggregate KL {agg['aggregate_kl']:.4f} "
              f"(MC SE {agg['aggregate_kl_se']:.4f}), mutual information {agg['mutual_information']:.4f}")
    if args.one_step_ahead:
        osa = dg.one_step_ahead(fit, method=args.osa_method, seed=args.seed)
        _atomic_csv(osa.table, str(out / "one_step_ahead.csv"))
        _atomic_csv(osa.per_subject, str(out / "one_step_ahead_subjects.csv"))
        save(dg.plot_one_step(osa), "one_step_ahead.png")
        written += ["one_step_ahead.csv", "one_step_ahead_subjects.csv"]
        print(f"one-step-ahead log-likelihood ({args.osa_method}): {osa.total:.4f} ± {osa.total_se:.4f}")
    print(f"\nwrote {len(written)} files to {out}: {', '.join(written)}")
    return 0


def _parse_target(text: str) -> tuple[str, float | None, tuple[float, float] | None]:
    """``AUC>=400`` or ``CTROUGH in 10:20`` → (metric, threshold, window)."""
    t = text.replace(" ", "")
    if ">=" in t:
        m, v = t.split(">=", 1)
        try:
            val = float(v)
            if m and math.isfinite(val):
                return m, val, None
        except ValueError:
            pass
    elif "in" in t.lower():
        m, w = t.lower().split("in", 1)
        try:
            lo, hi = (float(x) for x in w.split(":"))
            if m and math.isfinite(lo) and math.isfinite(hi) and lo < hi:
                return m.upper(), None, (lo, hi)
        except ValueError:
            pass
    raise CliError(f"--target {text!r}: expected METRIC>=VALUE (e.g. AUC>=400) or METRIC in LOW:HIGH "
                   f"(e.g. CTROUGH in 10:20)")


def _simulate_regimens(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import nlmefit
    from nlmefit.simulation import plot_pta

    if not args.regimen:
        raise CliError("give at least one --regimen \"...\" (e.g. \"500 mg po q12h x14\")")
    if (args.population is None) == (args.subjects is None):
        raise CliError("give --population N (virtual subjects) or --subjects observed|ID,ID,...")
    for flag in ("model", "params", "param", "data", "col", "sep", "where", "sort", "dvid", "error"):
        if getattr(args, flag, None):
            raise CliError(f"--{flag} does not apply to --fit (the fit's own data and model are used)")
    out = check_out_dir(args.out)
    if args.format == "parquet":
        from nlmefit.simulation.stream import check_format

        check_format(args.format)  # before any work: parquet needs pyarrow
    shard = _join_ranks(args)  # under torchrun or --workers: this process is one rank of several
    fit = _load_fit(args.fit)
    subjects = None
    if args.subjects is not None:
        if args.subjects == "observed":
            subjects = "observed"
        else:
            ids = fit.data.panel.ids
            conv = type(ids[0].item() if hasattr(ids[0], "item") else ids[0])
            try:
                subjects = [conv(x.strip()) for x in args.subjects.split(",")]
            except ValueError:
                raise CliError(f"--subjects {args.subjects!r}: expected 'observed' or IDs like 1,2,3") from None
            known = set(ids.tolist() if hasattr(ids, "tolist") else ids)
            missing = [s for s in subjects if s not in known]
            if missing:
                raise CliError(f"--subjects: ID(s) {missing} were not fitted")
    residual = bool(args.residual)  # regimen simulation: no residual error unless --residual
    sim = nlmefit.simulate_regimens(fit, args.regimen, population=args.population, subjects=subjects,
                                    n_draws=args.n_draws, residual=residual,
                                    steady_state=args.steady_state, threshold=args.threshold, seed=args.seed,
                                    posterior=args.posterior, weight_col=args.weight_col,
                                    progress=_progress(args) if shard is None or shard.rank == 0 else False,
                                    chunk_size=args.chunk_size, format=args.format or "csv",
                                    out=out if (args.chunk_size is not None or args.format is not None) else None)
    if shard is not None:
        _leave_ranks()
        if shard.rank != 0:  # only rank 0 prints and writes the summaries
            return 0
    out.mkdir(parents=True, exist_ok=True)
    _atomic_csv(sim.quantiles(), str(out / "profile_quantiles.csv"))
    _atomic_csv(sim.exposures, str(out / "exposures.csv"))
    _atomic_csv(sim.summary().rename_axis("REGIMEN").reset_index(), str(out / "exposure_summary.csv"))
    _atomic_fig(sim.plot_profiles(), out / "profiles.png", 120)
    _atomic_fig(sim.plot_exposures("AUC"), out / "exposures.png", 120)
    written = ["profile_quantiles.csv", "exposures.csv", "exposure_summary.csv", "profiles.png", "exposures.png"]
    if args.target:
        m, thr, win = _parse_target(args.target)
        tab = sim.pta(m, thr, mic=args.mic, window=win)
        _atomic_csv(tab, str(out / "pta.csv"))
        _atomic_fig(plot_pta(tab), out / "pta.png", 120)
        written += ["pta.csv", "pta.png"]
        print(tab.to_string(index=False))
    print(sim.summary().T.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.chunk_size is not None or args.format is not None:
        written.append("profiles-part-*.{} and manifest.json".format(args.format or "csv"))
    print(f"\nwrote {', '.join(written)} to {out} ({'with' if residual else 'without'} residual error)")
    return 0


def cmd_fit(args) -> int:
    import nlmefit
    from nlmefit.errors import ModelSpecError

    out = check_out_dir(args.out)
    _check_device(args.device)
    shard = _join_ranks(args)  # under torchrun or --workers: this process is one rank of several
    run = _control_stream(args)  # a NONMEM control stream brings its model, data and $ESTIMATION
    covariates: dict = {}
    if run is not None:
        df, model_name, dvid, model = run.data, args.data, None, run.model
        cols = _column_map(df, args.col)
        stream_options = dict(run.options)
        args.method = args.method or run.method
        if args.loglik is None and stream_options.get("compute_loglik"):
            args.loglik = stream_options["compute_loglik"]
            args.n_samples = args.n_samples or stream_options.get("loglik_options", {}).get("n_samples")
        if args.maxiter is None and "maxiter" in stream_options:
            args.maxiter = stream_options["maxiter"]
    else:
        args.method = args.method or "focei"
        stream_options = {}
        for p, f in args.cov or []:
            covariates.setdefault(p, []).append(f)
        df, cols, model_name, dvid, model = _data_and_model(args, covariates or None, args.omega_block)
    panel = _panel(df, cols, args.sort)
    init = _init_arg(args, model)
    with warnings.catch_warnings():  # model/data mismatches surface here, before the fit (which warns itself)
        warnings.simplefilter("ignore")
        model.prepare(panel, device=args.device, check_likelihood=False)
    progress = _progress(args) if shard is None or shard.rank == 0 else False  # one bar: rank 0's
    if shard is not None and args.method not in SHARDED:
        raise ModelSpecError(f"--workers/torchrun: --method {args.method} runs in one process in this version "
                             f"(sharded: {', '.join(SHARDED)})")
    if args.method == "nuts":
        options = dict(device=args.device, progress=progress)
        for flag, key in (("chains", "num_chains"), ("draws", "num_samples"), ("warmup", "warmup_steps")):
            if getattr(args, flag) is not None:
                options[key] = getattr(args, flag)
    elif any(getattr(args, f) is not None for f in ("chains", "draws", "warmup")):
        raise ModelSpecError("--chains, --draws and --warmup apply to --method nuts")
    elif args.method == "vem":
        options = dict(device=args.device, progress=progress)
        for flag, key in (("posterior", "posterior"), ("max_steps", "max_steps"), ("batch_size", "batch_size"),
                          ("checkpoint", "checkpoint")):
            if getattr(args, flag) is not None:
                options[key] = getattr(args, flag)
        if args.stl is not None:
            options["stl"] = args.stl
        if args.amortized:
            options["amortized"] = True
        if args.resume:
            if args.checkpoint is None:
                raise ModelSpecError("--resume needs --checkpoint PATH")
            options["resume"] = True
    else:
        options = dict(device=args.device, progress=progress)  # the bar shows the OFV (classical) or the phase
    if args.method != "vem" and (args.posterior is not None or args.max_steps is not None or args.batch_size is
                                 not None or args.stl is not None or args.amortized or args.checkpoint is not None
                                 or args.resume):
        raise ModelSpecError("--posterior, --amortized, --max-steps, --batch-size, --stl, --checkpoint and --resume "
                             "apply to --method vem")
    if args.maxiter is not None:
        if args.method not in CLASSICAL:
            raise ModelSpecError(f"--maxiter applies to --method {'/'.join(CLASSICAL)} (not {args.method})")
        options["maxiter"] = args.maxiter
    if "covariance" in stream_options and args.method in CLASSICAL:
        options["covariance"] = stream_options["covariance"]  # $COVARIANCE (or none) in the control stream
    if args.method == "saem":
        options.update({k: v for k, v in stream_options.items() if k in ("n_explore", "n_smooth")})
    if args.max_memory is not None:
        if args.method not in SHARDED:
            raise ModelSpecError(f"--max-memory applies to --method {'/'.join(SHARDED)} (not {args.method})")
        options["max_memory"] = args.max_memory
    for key in ("n_explore", "n_smooth"):
        if getattr(args, key) is not None:
            if args.method != "saem":
                raise ModelSpecError(f"--{key.replace('_', '-')} applies to --method saem")
            options[key] = getattr(args, key)
    if args.no_cov:
        options["covariance"] = None
    if getattr(args, "threads", None) is not None and args.method != "nuts":
        options["threads"] = args.threads  # the estimator's thread policy would otherwise choose for itself
    if args.n_nodes is not None:
        if args.method != "agq" and args.loglik != "agq":
            raise ModelSpecError("--n-nodes applies to --method agq or --loglik agq")
        if args.method == "agq":
            options["n_nodes"] = args.n_nodes
    if args.n_samples is not None and args.loglik != "is" and args.method != "saem":
        raise ModelSpecError("--n-samples applies to --loglik is or --method saem")
    lik_opts = {"n_samples": args.n_samples} if args.loglik == "is" else {}
    if args.loglik == "agq" and args.n_nodes is not None:
        lik_opts["n_nodes"] = args.n_nodes
    if args.method == "saem" and args.n_samples is not None:
        options["n_samples"] = args.n_samples
    lik_opts = {k: v for k, v in lik_opts.items() if v is not None}
    if args.starts > 1:
        if args.method not in ("fo", "foce", "focei", "laplace"):
            raise ModelSpecError(f"--starts applies to --method fo, foce, focei or laplace, not {args.method}")
        options["n_starts"] = args.starts
    result = nlmefit.fit(model, panel, method=args.method, init=init, seed=args.seed,
                         compute_loglik=args.loglik, loglik_options=lik_opts, **options)
    if shard is not None and shard.rank != 0:  # only rank 0 prints and publishes files; the others format
        _write_tables(result, out, shard)      # their share of the large CSVs (the same calls as rank 0's)
        return 0 if result.converged else 1
    out.mkdir(parents=True, exist_ok=True)
    data_spec = str(Path(args.data).resolve()) if os.path.exists(args.data) else args.data
    source = {"data": data_spec, "model": model_name, "error": args.error, "dvid": dvid}
    units = {**(result.source or {}).get("units", {}), **dict(args.units or [])}
    for key, val in (("units", units), ("sep", args.sep), ("where", args.where), ("columns", cols), ("sort", args.sort),
                     ("covariates", covariates), ("omega_blocks", [list(b) for b in args.omega_block or []])):
        if val:
            source[key] = val
    result = result.replace(source=source)
    if args.init == "model" and isinstance(init, nlmefit.Params):  # --param values are the user's, the rest the model's
        given = set(_params_arg(args, model))
        rec = dict(result.initial)
        rec["source"] = {k: ("user" if k in given else "model") for k in rec.get("source", {})}
        result = result.replace(initial=rec)
    result.to_json(out / "result.json")
    _atomic_csv(result.summary().rename_axis("parameter").reset_index(), str(out / "summary.csv"))
    _write_tables(result, out, shard)
    tables = [p.name for p in result.tables(out)] if args.tables else []
    notes = _retire_old_outputs(out, result)
    print(result.summary_text())
    for meth, val in result.likelihoods.items():
        if "ofv" not in val:  # a bound (the VEM ELBO), not an OFV
            if "m2elbo" in val:
                print(f"  -2*ELBO {val['m2elbo']:.4f} (a bound on -2LL with every constant; not an OFV)")
            continue
        extra = f" (Monte-Carlo SE {val['se']:.3f}, {val['n_samples']} samples)" if meth == "is" else ""
        print(f"  -2LL by {meth}: OFV {val['ofv']:.4f}{extra}")
    print(f"\nwrote {out / 'result.json'}, summary.csv, predictions.csv, individual_estimates.csv"
          + "".join(f", {t}" for t in tables))
    for n in notes:
        print(n)
    return 0 if result.converged else 1


def _write_tables(result, out: Path, shard) -> None:
    """predictions.csv and individual_estimates.csv, their formatting shared by the ranks (rank 0 publishes)."""
    from nlmefit._io import sharded_csv  # local: the CLI imports the package lazily

    for name, frame in (("predictions", result.predictions), ("individual_estimates", result.individual_estimates)):
        if frame is not None:  # the same on every rank (the result is)
            sharded_csv(frame, out / f"{name}.csv", shard)


def _data_and_model(args, covariates: dict | None = None, omega_blocks=None):
    """(DataFrame, column map, model name, DVID, model) from DATA and --model/--error/--dvid (fit, scm)."""
    import nlmefit

    df, label = _read_data(args.data, args.sep, args.where)
    cols = _column_map(df, args.col)
    model_name = args.model or DEFAULT_MODELS.get(label)
    if model_name is None:
        raise CliError(f"give --model for {args.data} (a library name: {', '.join(nlmefit.library.NAMES)})")
    dvid = args.dvid if args.dvid is not None else ("cp" if label == "warfarin" and "DVID" not in cols else None)
    return df, cols, model_name, dvid, _load_model(model_name, args.error, dvid, covariates, omega_blocks)


def _join_ranks(args):
    """This process's :class:`nlmefit.parallel.Shard` when torchrun or ``--workers`` started it as a rank."""
    from nlmefit import parallel  # local: torch.distributed only when ranks are asked for

    timeout = float(os.environ.get("NLMEFIT_TIMEOUT_S", parallel.DEFAULT_TIMEOUT_S))
    return parallel.init_from_env(timeout=timeout, device=getattr(args, "device", None))


def _leave_ranks() -> None:
    """Leave the process group before this rank exits (a gloo rank that exits inside it can abort)."""
    from nlmefit import parallel  # local: torch.distributed only when ranks are asked for

    parallel.leave()


def _control_stream(args):
    """The :class:`nlmefit.nonmem.NonmemRun` when ``args.data`` is a NONMEM control stream (.mod/.ctl), else None."""
    if not str(args.data).lower().endswith((".mod", ".ctl")):
        return None
    given = [flag for flag, val in (("--model", args.model), ("--error", args.error), ("--cov", args.cov),
                                    ("--omega-block", args.omega_block), ("--dvid", args.dvid),
                                    ("--where", args.where), ("--sep", args.sep if args.sep != "," else None))
             if val]
    if given:
        raise CliError(f"{', '.join(given)}: a control stream defines its model and data ($PK/$ERROR, $DATA); edit "
                       f"{args.data} instead")
    from nlmefit.nonmem import from_nonmem  # local: pharmpy is imported only for control streams

    try:
        return from_nonmem(args.data)
    except ImportError as exc:
        raise CliError(str(exc)) from exc


def cov_candidates(text: str) -> dict:
    """``cl:WT,AGE,SEX;v:WT`` (a relationship per column optional: ``cl:WT=exponential,SEX``)."""
    out: dict[str, list] = {}
    for part in (q.strip() for q in text.split(";")):
        if not part:
            continue
        if ":" not in part:
            raise argparse.ArgumentTypeError(f"expected PARAM:COL,COL;PARAM:COL (e.g. \"cl:WT,AGE;v:WT\"), "
                                             f"got {part!r}")
        p, cols = (q.strip() for q in part.split(":", 1))
        if not p.isidentifier():
            raise argparse.ArgumentTypeError(f"{part!r}: {p!r} is not a parameter name")
        items = [c.strip() for c in cols.split(",") if c.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{part!r}: no covariate column after ':'")
        for c in items:
            col, _, rel = (q.strip() for q in c.partition("="))
            out.setdefault(p, []).append((col, rel) if rel else col)
    if not out:
        raise argparse.ArgumentTypeError(f"no candidates in {text!r}")
    return out


def cmd_scm(args) -> int:
    import nlmefit

    out = check_out_dir(args.out)
    df, cols, model_name, dvid, model = _data_and_model(args)
    panel = _panel(df, cols, args.sort)
    options = {"maxiter": args.maxiter} if args.maxiter is not None else {}
    res = nlmefit.scm(model, panel, args.cov_candidates, method=args.method, p_forward=args.p_forward,
                      p_backward=args.p_backward, backward=not args.no_backward, progress=_progress(args),
                      seed=args.seed, **options)
    out.mkdir(parents=True, exist_ok=True)
    written = [q.name for q in res.to_csv(out)]
    data_spec = str(Path(args.data).resolve()) if os.path.exists(args.data) else args.data
    source = {"data": data_spec, "model": model_name, "error": args.error, "dvid": dvid}
    for key, val in (("sep", args.sep), ("where", args.where), ("columns", cols), ("sort", args.sort),
                     ("covariates", res.formulas)):
        if val:
            source[key] = val
    final = res.final_fit.replace(source=source)
    final.to_json(out / "result.json")
    print(res.summary_text())
    print(f"\nwrote {', '.join(written)}, result.json (the final model's fit) to {out}")
    return 0 if final.converged else 1


# ---------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: ``nlmefit fit: error: argument --n-nodes: expected a positive integer, got '0'``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _data_options(p: argparse.ArgumentParser, sort_help: str) -> None:
    p.add_argument("--col", action="append", type=column_pair, metavar="NAME=COLUMN",
                   help="map a NONMEM column to the data's column, e.g. --col DV=CONC --col ID=Subject (repeatable)")
    p.add_argument("--sep", type=separator, default=None,
                   help="CSV field separator: one character, or tab/comma/semicolon/space/whitespace/pipe "
                        "(default: tab for .tsv/.txt, else comma)")
    p.add_argument("--where", type=nonempty, default=None, metavar="CONDITION",
                   help='keep only the records meeting CONDITION (pandas DataFrame.query), e.g. "DOSE > 0"; '
                        "NONMEM's IGNORE/ACCEPT")
    p.add_argument("--sort", action="store_true", help=sort_help)


def _quiet_option(p: argparse.ArgumentParser, text: str = "no progress bar and no log lines (warnings only)") -> None:
    p.add_argument("--quiet", action="store_true", help=text)


def _progress(args) -> bool | None:
    """``progress=`` of the library call: False with --quiet, else None (a bar when stderr is a terminal or
    NLMEFIT_PROGRESS=1; see nlmefit.progress)."""
    return False if getattr(args, "quiet", False) else None


def _configure_logging(quiet: bool) -> int:
    """The ``nlmefit`` loggers' INFO lines (SCM steps, bootstrap, bench) on stderr, WARNING only with --quiet; a
    handler is added only when the root logger has none (an application's own configuration is kept). Returns the
    ``nlmefit`` logger's previous level, restored by :func:`main`."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # no-op when the root has handlers
    lg = logging.getLogger("nlmefit")
    old = lg.level
    lg.setLevel(logging.WARNING if quiet else logging.INFO)
    return old


def _threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nlmefit", description="Nonlinear mixed-effects modelling from NONMEM-style data "
                                             "(reference: docs/cli.md)")
    sub = ap.add_subparsers(dest="command", required=True,
                            metavar="{validate,fit,scm,diagnose,simulate,bootstrap,bench}")
    v = sub.add_parser("validate", help="check a dataset and print its summary")
    v.add_argument("data", help="CSV file or shipped dataset name")
    _data_options(v, "sort records by ID and TIME instead of rejecting disorder")
    v.add_argument("--no-dv", action="store_true", help="DV may be missing (a simulation template)")
    v.set_defaults(func=cmd_validate)

    s = sub.add_parser("simulate", help="simulate replicates of a dataset, or regimens from a fit (--fit)")
    s.add_argument("data", nargs="?", help="CSV file (records; DV may be empty) or shipped dataset name")
    s.add_argument("--model", default=None, help="library name, example, or path/file.py:object")
    s.add_argument("--error", type=error_name, default=None,
                   help="error model for a library model (default additive; aliases add, prop, combined ...)")
    s.add_argument("--dvid", default=None, help="the DVID value the model describes")
    s.add_argument("--params", help="JSON file {name: value} (names as in result.json estimates)")
    s.add_argument("--param", action="append", type=name_value, metavar="NAME=VALUE",
                   help="one parameter value (repeatable)")
    _data_options(s, "sort records by ID and TIME")
    s.add_argument("-n", type=positive_int, default=1, help="number of replicates")
    s.add_argument("--seed", type=seed_int, default=None)
    s.add_argument("--residual", dest="residual", action="store_const", const=True, default=None,
                   help="add residual error (default: yes for replicates, no for --fit regimens)")
    s.add_argument("--no-residual", dest="residual", action="store_const", const=False,
                   help="no residual error")
    s.add_argument("--out", required=True, type=nonempty,
                   help="replicates: one output CSV file, or with --chunk-size/--format/--workers a folder of part "
                        "files (part-00000.csv ..., manifest.json); --fit: the output folder")
    s.add_argument("--chunk-size", type=positive_int, default=None, metavar="N",
                   help="simulate N subjects per chunk and stream each chunk to its own part file in the --out "
                        "folder (replicates: part-XXXXX.csv; --fit: profiles-part-XXXXX.csv too); default for "
                        "--workers: about 4 million values per chunk (docs/scaling.md)")
    s.add_argument("--format", choices=["csv", "parquet"], default=None,
                   help="format of the part files (default csv; parquet needs pyarrow); implies part files")
    s.add_argument("--workers", type=positive_int, default=None, metavar="K",
                   help="K local ranks (torch.distributed, gloo over loopback): chunks of subjects sharded, "
                        "exposures all-reduced (see docs/scaling.md; torchrun works too)")
    s.add_argument("--fit", default=None, metavar="RESULT_DIR", help="simulate regimens from this fit")
    s.add_argument("--regimen", action="append", type=regimen_text,
                   help='a regimen, e.g. "1000 mg loading then 500 mg q12h x14, infusion 1h" (repeatable; '
                        'grammar: docs/regimens.md)')
    s.add_argument("--population", type=positive_int, default=None, help="number of virtual subjects")
    s.add_argument("--subjects", type=subjects_arg, default=None,
                   help="'observed' or comma-separated IDs of fitted subjects")
    s.add_argument("--n-draws", type=positive_int, default=100, help="posterior draws per observed subject")
    s.add_argument("--posterior", default="laplace", choices=["laplace", "is", "draws"])
    s.add_argument("--steady-state", action="store_true", help="maintenance phase at steady state (SS=1)")
    s.add_argument("--threshold", type=positive_float, default=None, help="concentration for time/%%fT above it")
    s.add_argument("--target", type=target_text, default=None, help="PTA target: AUC>=400 or 'CTROUGH in 10:20'")
    s.add_argument("--mic", type=mic_list, default=None, help="comma-separated MICs: PTA of METRIC/MIC >= VALUE")
    s.add_argument("--weight-col", type=nonempty, default="WT", help="weight covariate for mg/kg regimens")
    _quiet_option(s)
    _threads_option(s)
    s.set_defaults(func=cmd_simulate)

    d = sub.add_parser("diagnose", help="GOF, individual, eta, NPDE, VPC (and trace) figures and tables of a fit")
    d.add_argument("result", metavar="RESULT_DIR", help="folder written by `nlmefit fit --out`")
    d.add_argument("--out", type=nonempty, default=None, help="output folder (default RESULT_DIR/diagnostics)")
    d.add_argument("--n-rep", type=positive_int, default=500, help="simulated replicates for NPDE and VPC")
    d.add_argument("--per-page", type=positive_int, default=12, help="subjects per individual-fit page")
    d.add_argument("--seed", type=seed_int, default=0)
    d.add_argument("--decomposition", action="store_true",
                   help="per-subject Q/KL/ELBO/log p/gap table and figures (docs/decomposition.md)")
    d.add_argument("--one-step-ahead", action="store_true",
                   help="one-step-ahead predictive log-likelihood per observation, subject and in total")
    d.add_argument("--osa-method", choices=["is", "agq"], default="is",
                   help="one-step-ahead by importance sampling (default) or adaptive quadrature (dim eta <= 3)")
    _quiet_option(d)
    _threads_option(d)
    d.set_defaults(func=cmd_diagnose)

    f = sub.add_parser("fit", help="estimate a model")
    f.add_argument("data", help="CSV file, shipped dataset name, or NONMEM control stream (.mod/.ctl; needs "
                                "nlmefit[nonmem])")
    f.add_argument("--model", default=None, help="library name, example, or path/file.py:object")
    f.add_argument("--error", type=error_name, default=None,
                   help="additive, proportional, combined1, combined2, exponential (or add, prop, combined, "
                        "exp, log ...)")
    f.add_argument("--cov", action="append", type=cov_formula, metavar='"PARAM ~ FORMULA"',
                   help='covariate formula, e.g. "cl ~ log(WT/70)" (repeatable; library models)')
    f.add_argument("--omega-block", action="append", type=omega_block, metavar="P1,P2,...",
                   help="a block of correlated random effects, e.g. cl,v (repeatable; library models)")
    f.add_argument("--method", default=None, choices=list(METHODS),
                   help="estimation method (default focei; a control stream's $ESTIMATION)")
    f.add_argument("--maxiter", type=nonneg_int, default=None,
                   help="maximum optimiser iterations (classical methods; 0 evaluates at the initial values)")
    f.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                   help="memory budget for one chunk of subjects, e.g. 2GB (classical methods, saem; default: a "
                        "sixteenth of the machine's memory per rank, at most 2GB)")
    f.add_argument("--n-explore", type=positive_int, default=None,
                   help="SAEM: exploration iterations, step size 1 (default 150; Monolix K1)")
    f.add_argument("--n-smooth", type=positive_int, default=None,
                   help="SAEM: smoothing iterations, decreasing step size (default 150; Monolix K2)")
    f.add_argument("--chains", type=positive_int, default=None, help="NUTS chains (default 4)")
    f.add_argument("--draws", type=positive_int, default=None, help="NUTS draws per chain after warm-up (default 1000)")
    f.add_argument("--warmup", type=positive_int, default=None, help="NUTS warm-up steps per chain (default 1000)")
    f.add_argument("--units", action="append", type=unit_pair, metavar="COLUMN=UNIT",
                   help="units the data use, e.g. --units TIME=h --units AMT=mg --units DV=mg/L (repeatable); "
                        "the summary then gives parameter units (CL in L/h)")
    f.add_argument("--posterior", choices=["gaussian", "maf", "nsf"], default=None,
                   help="VEM posterior family (default gaussian; maf/nsf: normalizing flows)")
    f.add_argument("--max-steps", type=positive_int, default=None,
                   help="VEM: most gradient steps (default 2000; 6000 amortized)")
    f.add_argument("--batch-size", type=positive_int, default=None, help="VEM: subjects per mini-batch (all)")
    f.add_argument("--stl", action=argparse.BooleanOptionalAction, default=None,
                   help="VEM: sticking-the-landing gradient estimator (default: on per subject, off amortized)")
    f.add_argument("--amortized", action="store_true",
                   help="VEM: one encoder maps each subject's records to its posterior (new subjects need no refit)")
    f.add_argument("--checkpoint", type=nonempty, default=None, metavar="PATH", help="VEM: checkpoint file (.pt)")
    f.add_argument("--resume", action="store_true", help="VEM: continue from --checkpoint")
    f.add_argument("--loglik", default=None, choices=["is", "agq"],
                   help="add a marginal -2LL evaluation at the estimates (importance sampling or quadrature)")
    f.add_argument("--n-samples", type=positive_int, default=None,
                   help="importance samples per subject (default 2000)")
    f.add_argument("--n-nodes", type=positive_int, default=None, help="quadrature nodes per dimension of eta (agq)")
    f.add_argument("--dvid", default=None, help="the DVID value holding the model's observations (warfarin: cp)")
    f.add_argument("--params", help="JSON file of initial values {name: value}")
    f.add_argument("--param", action="append", type=name_value, metavar="NAME=VALUE",
                   help="one initial value (repeatable)")
    f.add_argument("--workers", type=positive_int, default=None, metavar="K",
                   help="K local ranks (torch.distributed, gloo over loopback): subjects sharded, totals all-reduced; "
                        "fo/foce/focei/laplace/agq (see docs/scaling.md; torchrun works too)")
    f.add_argument("--starts", type=positive_int, default=1, metavar="K",
                   help="K starts (the initial values and K-1 perturbed by up to ±50 %%), optimised together in one "
                        "batched objective; the best is kept (fo, foce, focei, laplace)")
    f.add_argument("--init", choices=["auto", "model"], default=None,
                   help="starting values of the parameters not given by --param: auto (NCA and a naive-pooled fit; "
                        "the default for library models) or model (the model's own values)")
    _data_options(f, "sort records by ID and TIME instead of rejecting disorder")
    f.add_argument("--out", type=nonempty, default="nlmefit-out", help="output folder")
    f.add_argument("--seed", type=seed_int, default=None)
    f.add_argument("--device", type=device_name, default=None, help="cpu or cuda")
    f.add_argument("--no-cov", action="store_true", help="skip the covariance step")
    _quiet_option(f)
    f.add_argument("--tables", action="store_true",
                   help="also write NONMEM-style sdtab1, patab1, cotab1/catab1, run1.ext (and run1_names.csv)")
    _threads_option(f)
    f.set_defaults(func=cmd_fit)

    sc = sub.add_parser("scm", help="stepwise covariate modelling: forward inclusion, backward elimination "
                                    "(docs/scm.md)")
    sc.add_argument("data", help="CSV file or shipped dataset name")
    sc.add_argument("--model", default=None, help="library model name (covariate formulas are added to it)")
    sc.add_argument("--error", type=error_name, default=None,
                    help="error model (default additive; aliases add, prop, combined ...)")
    sc.add_argument("--cov-candidates", required=True, type=cov_candidates, metavar="PARAM:COL,...;PARAM:COL",
                    help='candidate relationships, e.g. "cl:WT,AGE,SEX;v:WT" (COL=power|exponential|categorical '
                         "to choose; default power, categorical for text or two-valued columns)")
    sc.add_argument("--method", default="focei", choices=list(CLASSICAL))
    sc.add_argument("--p-forward", type=finite_float, default=0.05, help="forward inclusion level (default 0.05)")
    sc.add_argument("--p-backward", type=finite_float, default=0.01, help="backward elimination level (0.01)")
    sc.add_argument("--no-backward", action="store_true", help="forward inclusion only")
    sc.add_argument("--maxiter", type=nonneg_int, default=None, help="maximum optimiser iterations per fit")
    sc.add_argument("--dvid", default=None, help="the DVID value holding the model's observations (warfarin: cp)")
    _data_options(sc, "sort records by ID and TIME instead of rejecting disorder")
    sc.add_argument("--out", type=nonempty, default="nlmefit-scm", help="output folder")
    sc.add_argument("--seed", type=seed_int, default=None)
    _quiet_option(sc, "no progress bar and no line per fit on stderr")
    _threads_option(sc)
    sc.set_defaults(func=cmd_scm)

    from nlmefit.benchmark.generative import add_arguments as bench_arguments

    bs = sub.add_parser("bootstrap", help="case-resampling bootstrap of a fit (fo, foce, focei, laplace): percentile "
                                          "and BCa intervals")
    bs.add_argument("result", metavar="RESULT_DIR", help="folder written by `nlmefit fit --out`")
    bs.add_argument("-n", "--n", dest="n", type=positive_int, default=200, help="resamples (default 200, at least 2)")
    bs.add_argument("--stratify", type=nonempty, default=None, metavar="COV",
                    help="resample within the levels of this baseline covariate column")
    bs.add_argument("--seed", type=seed_int, default=0)
    bs.add_argument("--ci", type=finite_float, default=0.95, help="interval level, in (0, 1) (default 0.95)")
    bs.add_argument("--no-bca", action="store_true", help="percentile intervals only (no jackknife refits)")
    bs.add_argument("--batch", type=positive_int, default=None, metavar="R",
                    help="most refits per batched lockstep chunk (default: ~200000 virtual subjects per chunk)")
    bs.add_argument("--out", type=nonempty, default=None, help="output folder (default RESULT_DIR/bootstrap)")
    bs.add_argument("--workers", type=positive_int, default=None, metavar="K",
                    help="K local ranks (torch.distributed), each refitting every K-th resample (docs/scaling.md)")
    _quiet_option(bs)
    _threads_option(bs)
    bs.set_defaults(func=cmd_bootstrap)

    pr = sub.add_parser("profile", help="likelihood-profile confidence intervals of a fit (fo, foce, focei, laplace)")
    pr.add_argument("result", metavar="RESULT_DIR", help="folder written by `nlmefit fit --out`")
    pr.add_argument("--param", action="append", type=nonempty, default=None, metavar="NAME",
                    help="parameter to profile (repeatable; default: every typical value)")
    pr.add_argument("--ci", type=finite_float, default=0.95, help="interval level, in (0, 1) (default 0.95)")
    pr.add_argument("--out", type=nonempty, default=None, help="output folder (default RESULT_DIR/profile)")
    _quiet_option(pr)
    _threads_option(pr)
    pr.set_defaults(func=cmd_profile)

    b = sub.add_parser("bench", help="NLME against deep generative baselines (PPCA, VAE, DDPM, EBM, GAN, NF, flow "
                                     "matching) on a simulated population, with unseen regimens")
    bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return ap


def cmd_bootstrap(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import nlmefit

    out = _result_output_dir(args, "bootstrap")
    shard = _join_ranks(args)
    fit = _load_fit(args.result)
    boot = nlmefit.bootstrap(fit, n=args.n, stratify=args.stratify, seed=args.seed, ci=args.ci,
                             bca=not args.no_bca, batch=args.batch, progress=_progress(args))
    if shard is not None and shard.rank != 0:  # only rank 0 writes
        return 0
    written = [q.name for q in boot.to_csv(out)]
    _atomic_fig(boot.plot(), out / "bootstrap.png", 110)
    written.append("bootstrap.png")
    print(boot.summary_text())
    print(f"\nwrote {', '.join(written)} to {out}")
    return 0


def cmd_profile(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import nlmefit

    out = _result_output_dir(args, "profile")
    fit = _load_fit(args.result)
    prof = nlmefit.profile(fit, args.param, level=args.ci, progress=_progress(args))
    out.mkdir(parents=True, exist_ok=True)
    _atomic_csv(prof.intervals, str(out / "profile_intervals.csv"))
    _atomic_csv(prof.points, str(out / "profile_points.csv"))
    _atomic_fig(prof.plot(), out / "profile.png", 110)
    print(f"likelihood-profile {100 * prof.level:g} % intervals ({prof.method}, OFV {prof.ofv:.4f}; "
          f"{prof.n_refits} refits in {prof.elapsed_s:.1f} s)")
    print(prof.intervals.to_string(index=False, float_format=lambda v: f"{v:.5g}"))
    print(f"\nwrote profile_intervals.csv, profile_points.csv, profile.png to {out}")
    return 0 if bool(prof.intervals[["lower_ok", "upper_ok"]].to_numpy().all()) else 1


def cmd_bench(args) -> int:
    from nlmefit.benchmark.generative import run_from_args
    from nlmefit.benchmark.generative_data import bench_from_data

    if args.data is None:
        if args.model or args.where or args.unseen_dose is not None:
            raise CliError("--model, --where and --unseen-dose apply to --data")
        return run_from_args(args)
    if not args.model:
        raise CliError("--data needs --model (the NLME library model to fit, e.g. --model 1cmt_oral)")
    if not 0.0 < args.test_fraction < 1.0:
        raise CliError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    df, name = _read_data(args.data, where=args.where)
    model = _load_model(args.model, args.error)
    bench = bench_from_data(df, model, name=name, test_fraction=args.test_fraction, unseen_dose=args.unseen_dose,
                            seed=args.seed)
    return run_from_args(args, bench)


# ---------------------------------------------------------------------- errors as one line
_HINTS = [  # Python-API hints in library messages → the CLI flag that does the same
    (re.compile(r"; pass require_dv=False for a simulation template"), ""),
    (re.compile(r"e\.g\. (\w+)='\.\.\.'"), lambda m: f"e.g. --col {m.group(1).upper()}=COLUMN"),
    (re.compile(r"pass (\w+)=\.\.\. to say which one to use"),
     lambda m: f"pass --col {m.group(1).upper()}=COLUMN to say which one to use"),
    (re.compile(r"pass sort=True"), "pass --sort"),
    (re.compile(r"sort=True to sort"), "--sort to sort"),
    (re.compile(r"Model\(\.\.\., dvid=\.\.\.\)"), "--dvid VALUE"),
    (re.compile(r"use params=\.\.\. for custom parameter models"),
     "use --model file.py:object for custom parameter models"),
    (re.compile(r"pass weight_col="), "pass --weight-col"),
    (re.compile(r"^subjects=\.\.\."), "--subjects"),
    (re.compile(r"^column map: "), "--col: "),
    (re.compile(r"^covariate formula for"), "--cov: covariate formula for"),
]


def cli_message(e: BaseException) -> str:
    """One line: the error's first line with API hints rewritten as CLI flags."""
    text = str(e).strip() or type(e).__name__
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    for pat, rep in _HINTS:
        text = pat.sub(rep, text)
    return text


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"nlmefit: warning: {' '.join(str(message).split())}\n"


def _without_workers(argv: list[str]) -> list[str]:
    """``argv`` less its ``--workers K`` / ``--workers=K`` (the ranks it starts run the rest)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    from nlmefit.errors import DataError, EstimationError, ModelSpecError
    from nlmefit.results.schema import ResultSchemaError

    command = "nlmefit"
    log_level = None
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # usage errors (one line, exit 2) and --help (exit 0)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        command = f"nlmefit {args.command}"
        workers = getattr(args, "workers", None)
        if workers is not None and workers > 1 and "RANK" not in os.environ:  # start the ranks, then wait for them
            from nlmefit.parallel import launch_local  # local: only for --workers

            return launch_local(_without_workers(sys.argv[1:] if argv is None else list(argv)), workers)
        log_level = _configure_logging(getattr(args, "quiet", False) or int(os.environ.get("RANK", "0")) > 0)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{command}: interrupted (Ctrl-C); files written before were left intact (each is written "
              f"atomically), nothing half-written", file=sys.stderr)
        return 130
    except (DataError, ModelSpecError, CliError, ResultSchemaError) as e:
        print(f"{command}: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except EstimationError as e:
        print(f"{command}: estimation failed: {cli_message(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{command}: error: {cli_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: one line, unless NLMEFIT_DEBUG asks for the traceback
        if os.environ.get("NLMEFIT_DEBUG"):
            raise
        print(f"{command}: unexpected error: {type(e).__name__}: {cli_message(e)} (set NLMEFIT_DEBUG=1 for "
              f"the traceback)", file=sys.stderr)
        return 1
    finally:
        if "RANK" in os.environ:  # a rank of torchrun/--workers
            _leave_ranks()
        warnings.formatwarning = old_format
        if log_level is not None:
            logging.getLogger("nlmefit").setLevel(log_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
