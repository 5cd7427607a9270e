"""Progress bars and logging (nlmefit.progress, issue 16 item 5): the CLI shows a tqdm bar with the OFV when one is
asked for (NLMEFIT_PROGRESS=1: a subprocess's stderr is not a terminal) and none with --quiet; ``progress=True``
draws a bar on stderr in process, ``progress=False`` nothing; the automatic mode is off when stderr is not a
terminal; the SCM steps and the bootstrap are logged through ``logging``."""
import io
import logging
import os
import subprocess
import sys
import warnings

import pytest

import nlmefit
from nlmefit import progress as pg
from nlmefit.cli import main


@pytest.fixture(autouse=True)
def _automatic(monkeypatch):
    """Every test starts from the automatic rule (no NLMEFIT_PROGRESS, no package default)."""
    monkeypatch.delenv(pg.ENV_VAR, raising=False)
    pg.set_default(None)
    yield
    pg.set_default(None)


@pytest.fixture(scope="module")
def theo():
    return nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline")


def test_cli_fit_bar_when_forced_and_none_with_quiet(tmp_path, monkeypatch, capfd):
    env = dict(os.environ, NLMEFIT_PROGRESS="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "nlmefit.cli", "fit", "theophylline", "--method", "fo", "--no-cov",
                          "--out", str(tmp_path / "bar")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fo 1cmt_oral" in run.stderr and "eval/s" in run.stderr and "ofv=" in run.stderr
    assert "eval" not in run.stdout  # the bar is on stderr; stdout has the summary only
    # --quiet wins over NLMEFIT_PROGRESS=1 (in process: the same CLI code without a second interpreter start-up)
    monkeypatch.setenv(pg.ENV_VAR, "1")
    capfd.readouterr()
    assert main(["fit", "theophylline", "--method", "fo", "--no-cov", "--quiet", "--out", str(tmp_path / "q")]) == 0
    err = capfd.readouterr().err
    assert "eval/s" not in err and "ofv=" not in err and "\r" not in err


def test_fit_progress_true_draws_a_bar_false_nothing(theo, capsys):
    model, df = theo
    shown = nlmefit.fit(model, df, method="focei", covariance=None, progress=True)
    err = capsys.readouterr().err
    assert "focei 1cmt_oral" in err and "eval" in err and f"ofv={shown.ofv:.4f}" in err
    calls = []
    silent = nlmefit.fit(model, df, method="focei", covariance=None, progress=False)
    callback = nlmefit.fit(model, df, method="fo", covariance=None, progress=lambda k, v: calls.append((k, v)))
    assert capsys.readouterr().err == ""  # False, and a callable (it does its own reporting), draw nothing
    assert silent.ofv == pytest.approx(shown.ofv, abs=1e-9)
    assert calls and calls[-1][1] == pytest.approx(callback.ofv, abs=1e-3)  # (evaluations, current OFV) as before
    with pytest.raises(nlmefit.ModelSpecError, match="progress"):
        nlmefit.fit(model, df, method="focei", progress="yes")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_automatic_mode_follows_the_terminal_env_and_default(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe, a file, CI logs
    assert not pg.auto_enabled() and pg.resolve(None) is False
    bar = pg.progress_bar(5, "x")
    assert isinstance(bar, pg.NoBar)
    with bar:
        bar.update(5)
        bar.set_postfix(ofv="1", refresh=False)
    assert sys.stderr.getvalue() == ""
    assert pg.resolve(True) is True  # forced on
    monkeypatch.setenv(pg.ENV_VAR, "1")
    assert pg.resolve(None) is True and pg.resolve(False) is False
    pg.set_default(False)  # the package default wins over the environment; an explicit argument over both
    assert pg.resolve(None) is False and pg.resolve(True) is True
    pg.set_default(None)
    monkeypatch.setattr(sys, "stderr", _Tty())
    monkeypatch.setenv(pg.ENV_VAR, "0")
    assert pg.auto_enabled() and pg.resolve(None) is False
    monkeypatch.delenv(pg.ENV_VAR)
    assert pg.resolve(None) is True  # a terminal: on
    with pg.progress_bar(3, "terminal", "rep") as bar:
        bar.update(3)
    assert "terminal" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue()
    with pytest.raises(TypeError):
        pg.set_default("on")


def test_scm_and_bootstrap_log_through_logging(theo, caplog, capsys):
    model, df = theo
    caplog.set_level(logging.INFO, logger="nlmefit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nlmefit.scm(model, df, {"cl": ["WT"]}, method="fo", backward=False, progress=False)
        lines = [r.getMessage() for r in caplog.records if r.name == "nlmefit.covariate_search"]
        assert len(lines) == len(res.log) and lines[0].startswith("scm step 0: base model: OFV")
        assert lines[1].startswith("scm step 1: forward +cl-WT") and "ΔOFV" in lines[1]
        caplog.clear()
        boot = nlmefit.bootstrap(res.base_fit, n=2, bca=False, seed=1, progress=False)
    msgs = [r.getMessage() for r in caplog.records if r.name == "nlmefit.resampling"]
    assert msgs[0].startswith("bootstrap: 2 resamples of 12 subjects (fo)")
    assert msgs[-1].startswith(f"bootstrap: {int(boot.estimates['success'].sum())} of 2 refits succeeded")
    assert capsys.readouterr().err == ""  # no prints, no bars
