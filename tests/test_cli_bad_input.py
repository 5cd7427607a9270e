"""Bad input to every ``nlmefit`` subcommand: one line naming what is wrong, a non-zero exit, never a traceback.

Arguments, paths, data, corrupted results and interrupted runs. Almost every case fails before any estimation;
the corrupted-result and ``--fit`` cases share one small FO fit (module fixture).
"""
import json
import shutil

import pytest

import nlmefit
from nlmefit.cli import main


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    assert main(["fit", "theophylline", "--method", "fo", "--no-cov", "--out", str(d), "--quiet"]) == 0
    return d


@pytest.fixture
def env(tmp_path, fit_dir):
    """Paths the cases refer to as {name}."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "not.json").write_text("{ nope")
    (tmp_path / "nofolder").mkdir()
    df = nlmefit.datasets.load("theophylline")
    df.rename(columns={"ID": "Subject"}).to_csv(tmp_path / "noid.csv", index=False)
    df.iloc[[0, 2, 1] + list(range(3, len(df)))].to_csv(tmp_path / "unsorted.csv", index=False)
    w = nlmefit.datasets.load("warfarin")
    w.to_csv(tmp_path / "pkpd.csv", index=False)
    base = json.loads((fit_dir / "result.json").read_text())

    def corrupt(name, change):
        folder = tmp_path / name
        folder.mkdir()
        if isinstance(change, str):
            (folder / "result.json").write_text(change)
        else:
            (folder / "result.json").write_text(json.dumps(change(json.loads(json.dumps(base)))))
        return folder

    paths = {
        "tmp": tmp_path, "fit": fit_dir, "file": a_file, "nofolder": tmp_path / "nofolder",
        "empty_csv": tmp_path / "empty.csv", "notjson": tmp_path / "not.json", "noid": tmp_path / "noid.csv",
        "unsorted": tmp_path / "unsorted.csv", "pkpd": tmp_path / "pkpd.csv",
        "r_empty": corrupt("r_empty", ""),
        "r_trunc": corrupt("r_trunc", (fit_dir / "result.json").read_text()[:300]),
        "r_list": corrupt("r_list", "[1, 2, 3]"),
        "r_noofv": corrupt("r_noofv", lambda d: {k: v for k, v in d.items() if k != "ofv"}),
        "r_nobs": corrupt("r_nobs", lambda d: {**d, "n_obs": "many"}),
        "r_version": corrupt("r_version", lambda d: {**d, "schema_version": 99}),
        "r_est": corrupt("r_est", lambda d: {**d, "estimates": {**d["estimates"], "cl": "fast"}}),
        "r_pred": corrupt("r_pred", lambda d: {**d, "predictions": {**d["predictions"], "data": [[1, 2]]
                                                                    + d["predictions"]["data"][1:]}}),
        "r_nosource": corrupt("r_nosource", lambda d: {**d, "source": {}, "model_spec": None}),
        "r_conv": corrupt("r_conv", lambda d: {**d, "converged": "yes"}),
    }
    return paths


REG = "320 mg po q12h x2"
CASES = [
    # validate: data and data options
    ("validate-missing-file", ["validate", "/nonexistent/file.csv"], 2, "neither a file"),
    ("validate-folder", ["validate", "{nofolder}"], 2, "is a folder"),
    ("validate-empty-csv", ["validate", "{empty_csv}"], 2, "cannot be read"),
    ("validate-col-no-eq", ["validate", "theophylline", "--col", "DV"], 2, "NAME=COLUMN"),
    ("validate-col-unknown-canon", ["validate", "theophylline", "--col", "FOO=DV"], 2, "not a NONMEM column"),
    ("validate-col-missing-column", ["validate", "theophylline", "--col", "DV=CONC"], 2, "no column 'CONC'"),
    ("validate-where-bad-column", ["validate", "theophylline", "--where", "NOPE > 0"], 2, "--where"),
    ("validate-where-keeps-none", ["validate", "theophylline", "--where", "ID < 0"], 2, "keeps none"),
    ("validate-where-empty", ["validate", "theophylline", "--where", " "], 2, "--where"),
    ("validate-sep", ["validate", "theophylline", "--sep", "ab"], 2, "--sep"),
    ("validate-no-data", ["validate"], 2, "required"),
    ("unknown-command", ["frobnicate"], 2, "invalid choice"),
    ("validate-missing-id-hint", ["validate", "{noid}"], 2, "--col ID="),
    ("validate-unsorted-hint", ["validate", "{unsorted}"], 2, "--sort"),
    # fit: arguments
    ("fit-n-nodes-0", ["fit", "theophylline", "--n-nodes", "0"], 2, "--n-nodes"),
    ("fit-param-abc", ["fit", "theophylline", "--param", "cl=abc"], 2, "cl=abc"),
    ("fit-param-no-eq", ["fit", "theophylline", "--param", "cl"], 2, "NAME=VALUE"),
    ("fit-param-inf", ["fit", "theophylline", "--param", "cl=inf"], 2, "finite"),
    ("fit-param-unknown", ["fit", "theophylline", "--param", "nope=1", "--out", "{tmp}/o"], 2, "nope"),
    ("fit-params-not-json", ["fit", "theophylline", "--params", "{notjson}", "--out", "{tmp}/o"], 2, "--params"),
    ("fit-params-missing", ["fit", "theophylline", "--params", "{tmp}/none.json", "--out", "{tmp}/o"], 2,
     "--params"),
    ("fit-maxiter-negative", ["fit", "theophylline", "--maxiter", "-1"], 2, "--maxiter"),
    ("fit-maxiter-saem", ["fit", "theophylline", "--method", "saem", "--maxiter", "5", "--out", "{tmp}/o"], 2,
     "--maxiter"),
    ("fit-threads-0", ["fit", "theophylline", "--threads", "0"], 2, "--threads"),
    ("fit-seed-negative", ["fit", "theophylline", "--seed", "-1"], 2, "--seed"),
    ("fit-error-unknown", ["fit", "theophylline", "--error", "bogus"], 2, "bogus"),
    ("fit-method-unknown", ["fit", "theophylline", "--method", "magic"], 2, "--method"),
    ("fit-cov-no-tilde", ["fit", "theophylline", "--cov", "cl log(WT)"], 2, "PARAM ~ FORMULA"),
    ("fit-cov-syntax", ["fit", "theophylline", "--cov", "cl ~ __import__('os')"], 2, "unsupported syntax"),
    ("fit-cov-unknown-covariate", ["fit", "theophylline", "--cov", "cl ~ log(NOPE/70)", "--method", "fo",
                                   "--no-cov", "--out", "{tmp}/o", "--quiet"], 2, "NOPE"),
    ("fit-cov-unknown-param", ["fit", "theophylline", "--cov", "zz ~ WT", "--out", "{tmp}/o"], 2, "zz"),
    ("fit-cov-custom-model", ["fit", "pheno", "--cov", "cl ~ WGT", "--out", "{tmp}/o"], 2, "library models"),
    ("fit-omega-block-one", ["fit", "theophylline", "--omega-block", "cl"], 2, "two or more"),
    ("fit-omega-block-unknown", ["fit", "theophylline", "--omega-block", "cl,foo", "--out", "{tmp}/o"], 2, "foo"),
    ("fit-chains-not-nuts", ["fit", "theophylline", "--chains", "2", "--out", "{tmp}/o"], 2, "--chains"),
    ("fit-draws-0", ["fit", "theophylline", "--method", "nuts", "--draws", "0"], 2, "--draws"),
    ("fit-n-samples-without-is", ["fit", "theophylline", "--n-samples", "10", "--out", "{tmp}/o"], 2,
     "--n-samples"),
    ("fit-device-bad", ["fit", "theophylline", "--device", "gpu"], 2, "--device"),
    ("fit-model-unknown", ["fit", "theophylline", "--model", "4cmt_magic", "--out", "{tmp}/o"], 2, "4cmt_magic"),
    ("fit-model-file-missing", ["fit", "theophylline", "--model", "{tmp}/none.py:m", "--out", "{tmp}/o"], 2,
     "does not exist"),
    ("fit-no-model-for-csv", ["fit", "{noid}", "--out", "{tmp}/o"], 2, "--model"),
    ("fit-dvid-hint", ["fit", "{pkpd}", "--model", "1cmt_oral", "--out", "{tmp}/o"], 2, "--dvid"),
    # fit: output location, checked before the fit
    ("fit-out-is-file", ["fit", "theophylline", "--out", "{file}"], 2, "not a folder"),
    ("fit-out-under-file", ["fit", "theophylline", "--out", "{file}/sub"], 2, "is a file"),
    ("fit-out-empty", ["fit", "theophylline", "--out", ""], 2, "--out"),
    # diagnose
    ("diagnose-missing", ["diagnose", "{tmp}/nothing"], 2, "no such folder"),
    ("diagnose-no-result", ["diagnose", "{nofolder}"], 2, "no result.json"),
    ("diagnose-empty-result", ["diagnose", "{r_empty}"], 2, "empty"),
    ("diagnose-truncated-result", ["diagnose", "{r_trunc}"], 2, "not valid JSON"),
    ("diagnose-json-list", ["diagnose", "{r_list}"], 2, "JSON object"),
    ("diagnose-missing-key", ["diagnose", "{r_noofv}"], 2, "'ofv'"),
    ("diagnose-wrong-type", ["diagnose", "{r_nobs}"], 2, "'n_obs' should be"),
    ("diagnose-bad-version", ["diagnose", "{r_version}"], 2, "schema version"),
    ("diagnose-bad-estimate", ["diagnose", "{r_est}"], 2, "estimate 'cl'"),
    ("diagnose-ragged-table", ["diagnose", "{r_pred}"], 2, "predictions"),
    ("diagnose-bool-type", ["diagnose", "{r_conv}"], 2, "'converged'"),
    ("diagnose-no-source", ["diagnose", "{r_nosource}"], 2, "not written by"),
    ("diagnose-n-rep-0", ["diagnose", "{fit}", "--n-rep", "0"], 2, "--n-rep"),
    ("diagnose-out-is-file", ["diagnose", "{fit}", "--out", "{file}"], 2, "not a folder"),
    ("diagnose-threads-x", ["diagnose", "{fit}", "--threads", "x"], 2, "--threads"),
    # simulate
    ("simulate-nothing", ["simulate", "--out", "{tmp}/s.csv"], 2, "--model"),
    ("simulate-no-out", ["simulate", "theophylline", "--model", "1cmt_oral"], 2, "--out"),
    ("simulate-n-0", ["simulate", "theophylline", "--model", "1cmt_oral", "-n", "0", "--out", "{tmp}/s.csv"], 2,
     "-n"),
    ("simulate-out-folder", ["simulate", "theophylline", "--model", "1cmt_oral", "--out", "{tmp}"], 2,
     "is a folder"),
    ("simulate-out-under-file", ["simulate", "theophylline", "--model", "1cmt_oral", "--out", "{file}/s.csv"], 2,
     "is a file"),
    ("simulate-param-nan", ["simulate", "theophylline", "--model", "1cmt_oral", "--param", "cl=nan", "--out",
                            "{tmp}/s.csv"], 2, "finite"),
    ("simulate-param-unknown", ["simulate", "theophylline", "--model", "1cmt_oral", "--param", "qq=1", "--out",
                                "{tmp}/s.csv"], 2, "qq"),
    ("simulate-regimen-without-fit", ["simulate", "--regimen", REG, "--out", "{tmp}/s"], 2, "--fit"),
    ("simulate-regimen-grammar", ["simulate", "--fit", "{fit}", "--regimen", "320 mg sometimes", "--population",
                                  "5", "--out", "{tmp}/s"], 2, "--regimen"),
    ("simulate-no-population", ["simulate", "--fit", "{fit}", "--regimen", REG, "--out", "{tmp}/s"], 2,
     "--population"),
    ("simulate-population-0", ["simulate", "--fit", "{fit}", "--regimen", REG, "--population", "0", "--out",
                               "{tmp}/s"], 2, "--population"),
    ("simulate-target-bad", ["simulate", "--fit", "{fit}", "--regimen", REG, "--population", "5", "--target",
                             "AUC>>3", "--out", "{tmp}/s"], 2, "--target"),
    ("simulate-mic-0", ["simulate", "--fit", "{fit}", "--regimen", REG, "--population", "5", "--target",
                        "AUC>=3", "--mic", "0,1", "--out", "{tmp}/s"], 2, "--mic"),
    ("simulate-out-file-for-fit", ["simulate", "--fit", "{fit}", "--regimen", REG, "--population", "5", "--out",
                                   "{file}"], 2, "not a folder"),
    ("simulate-corrupt-fit", ["simulate", "--fit", "{r_trunc}", "--regimen", REG, "--population", "5", "--out",
                              "{tmp}/s"], 2, "not valid JSON"),
    ("simulate-unknown-subjects", ["simulate", "--fit", "{fit}", "--regimen", REG, "--subjects", "1,999",
                                   "--out", "{tmp}/s"], 2, "999"),
    ("simulate-model-with-fit", ["simulate", "--fit", "{fit}", "--model", "1cmt_iv", "--regimen", REG,
                                 "--population", "5", "--out", "{tmp}/s"], 2, "--model"),
]


def _argv(template, env):
    return [a.format(**{k: str(v) for k, v in env.items()}) for a in template]


def _one_error_line(capsys):
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    lines = [ln for ln in cap.err.splitlines() if ln.strip() and not ln.startswith("nlmefit: warning:")]
    return lines


@pytest.mark.parametrize("argv, rc, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_nonzero_exit(argv, rc, needle, env, capsys, monkeypatch):
    def no_fit(*a, **k):  # every case must fail before estimation
        raise AssertionError("nlmefit.fit was called")

    monkeypatch.setattr(nlmefit, "fit", no_fit)
    capsys.readouterr()
    got = main(_argv(argv, env))
    lines = _one_error_line(capsys)
    assert got == rc
    assert len(lines) == 1, lines
    assert needle in lines[0], lines[0]
    assert lines[0].startswith("nlmefit")


def _interrupt(*a, **k):
    raise KeyboardInterrupt


INTERRUPTS = [
    ("validate", ["validate", "theophylline"], "nlmefit.panel.Panel.from_dataframe"),
    ("fit", ["fit", "theophylline", "--out", "{tmp}/o", "--quiet"], "nlmefit.fit"),
    ("diagnose", ["diagnose", "{fit}", "--out", "{tmp}/d", "--n-rep", "5"], "nlmefit.diagnostics.plot_gof"),
    ("simulate", ["simulate", "theophylline", "--model", "1cmt_oral", "--out", "{tmp}/s.csv"],
     "nlmefit.simulation.simulate"),
    ("simulate-fit", ["simulate", "--fit", "{fit}", "--regimen", REG, "--population", "5", "--out", "{tmp}/s"],
     "nlmefit.simulate_regimens"),
]


@pytest.mark.parametrize("argv, target", [c[1:] for c in INTERRUPTS], ids=[c[0] for c in INTERRUPTS])
def test_interrupt_is_one_line_exit_130(argv, target, env, capsys, monkeypatch):
    monkeypatch.setattr(target, _interrupt)
    capsys.readouterr()
    assert main(_argv(argv, env)) == 130
    lines = _one_error_line(capsys)
    assert len(lines) == 1 and "interrupted" in lines[0]


def test_interrupted_fit_keeps_the_previous_result(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "again"
    shutil.copytree(env["fit"], out)
    before = (out / "result.json").read_bytes()
    monkeypatch.setattr("nlmefit.fit", _interrupt)
    assert main(["fit", "theophylline", "--out", str(out), "--quiet"]) == 130
    assert (out / "result.json").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    assert "Traceback" not in capsys.readouterr().err


def test_suite_is_large_enough():
    assert len(CASES) + len(INTERRUPTS) >= 30
