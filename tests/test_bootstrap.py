"""nlmefit.bootstrap: case resampling by subject, batched lockstep refits, percentile and BCa intervals, the CLI."""
import time

import matplotlib
import numpy as np
import pandas as pd
import pytest

import nlmefit
from nlmefit.cli import main
from nlmefit.models.examples import EXAMPLES
from nlmefit.resampling import BootstrapResult, resample_subjects

matplotlib.use("Agg")

CL, V = "tvcl", "tvv"  # pheno_real's typical clearance and volume (per kg)


@pytest.fixture(scope="module")
def pheno():
    df = nlmefit.datasets.load("pheno")
    return df, nlmefit.fit(EXAMPLES["pheno_real"](), df, method="focei")


@pytest.fixture(scope="module")
def boot20(pheno):
    t0 = time.perf_counter()
    b = nlmefit.bootstrap(pheno[1], n=20, seed=0)
    print(f"pheno FOCE-I bootstrap n=20 with BCa ({20 + 59} batched refits): {time.perf_counter() - t0:.1f} s")
    return b


def _resampled_frame(df: pd.DataFrame, ids: np.ndarray, draw: np.ndarray) -> pd.DataFrame:
    """The data set of one resample, each drawn subject re-IDed 1..N so that repeats are distinct subjects."""
    parts = []
    for k, pos in enumerate(draw):
        d = df[df["ID"] == ids[pos]].copy()
        d["ID"] = k + 1
        parts.append(d)
    return pd.concat(parts, ignore_index=True)


def test_pheno_bootstrap_intervals(pheno, boot20):
    _, fit = pheno
    b = boot20
    assert isinstance(b, BootstrapResult) and b.n == 20 and b.method == "focei"
    assert b.success_rate >= 0.9
    assert list(b.estimates.columns[:1]) == ["resample"] and {CL, V, "ofv", "n_iter", "success"} <= set(b.estimates)
    assert len(b.estimates) == 20 and len(b.jackknife) == fit.n_subjects
    iv = b.intervals.set_index("parameter")
    assert {"estimate", "se", "bias", "pct_low", "pct_high", "bca_low", "bca_high"} <= set(iv.columns)
    for name in (CL, V):
        assert iv.loc[name, "estimate"] == pytest.approx(fit.estimates[name])
        assert iv.loc[name, "pct_low"] < fit.estimates[name] < iv.loc[name, "pct_high"]
        assert iv.loc[name, "bca_low"] < fit.estimates[name] < iv.loc[name, "bca_high"]
        assert iv.loc[name, "se"] > 0
    assert b.elapsed_s > 0 and "successful" in b.summary_text()


def test_batched_refit_equals_plain_fit_of_the_resample(pheno, boot20):
    df, fit = pheno
    draw = resample_subjects(fit.n_subjects, 20, np.random.default_rng(0))[0]  # resample 0 of seed 0
    ref = nlmefit.fit(fit.model, _resampled_frame(df, fit.data.ids, draw), method="focei",
                      init=fit.estimates.to_dict(), covariance=None)
    row = boot20.estimates.iloc[0]
    assert row["ofv"] == pytest.approx(ref.ofv, abs=1e-4)
    for name in boot20.parameters:
        assert row[name] == pytest.approx(ref.estimates[name], rel=1e-3)


def test_stratified_resampling_keeps_counts_and_seeded_runs_repeat(pheno):
    _, fit = pheno
    names = list(fit.data.panel.covariate_names)
    strata = fit.data.panel.covariates[:, names.index("APGR")]
    draws = resample_subjects(fit.n_subjects, 50, np.random.default_rng(5), strata)
    for lv in np.unique(strata):
        assert ((strata[draws] == lv).sum(1) == (strata == lv).sum()).all()
    assert len(np.unique(draws[:, 0])) > 1  # not a copy of the data
    a = nlmefit.bootstrap(fit, n=2, stratify="APGR", seed=7, bca=False, batch=1)
    b = nlmefit.bootstrap(fit, n=2, stratify="APGR", seed=7, bca=False)
    pd.testing.assert_frame_equal(a.estimates, b.estimates, rtol=1e-8)
    assert a.stratify == "APGR" and a.jackknife is None and "bca_low" not in a.intervals
    assert not np.array_equal(resample_subjects(59, 2, np.random.default_rng(7)),
                              resample_subjects(59, 2, np.random.default_rng(8)))


def test_bad_inputs_raise_clear_errors(pheno):
    _, fit = pheno
    with pytest.raises(nlmefit.ModelSpecError, match="fo, foce, focei, laplace.*'saem'"):
        nlmefit.bootstrap(fit.replace(method="saem"), n=5)
    with pytest.raises(nlmefit.DataError, match="'NOPE'.*WGT"):
        nlmefit.bootstrap(fit, n=5, stratify="NOPE")
    for bad in (1, 0, 2.5):
        with pytest.raises(nlmefit.ModelSpecError, match="n .*>= 2"):
            nlmefit.bootstrap(fit, n=bad)
    with pytest.raises(nlmefit.ModelSpecError, match="ci"):
        nlmefit.bootstrap(fit, n=5, ci=1.5)
    with pytest.raises(nlmefit.ModelSpecError, match="model and data attached"):
        nlmefit.bootstrap(fit.replace(data=None), n=5)


def test_plot_and_csv(boot20, tmp_path):
    fig = boot20.plot()
    assert len([ax for ax in fig.axes if ax.get_visible()]) == len(boot20.parameters)
    paths = boot20.to_csv(tmp_path)
    assert sorted(p.name for p in paths) == ["bootstrap_estimates.csv", "bootstrap_intervals.csv",
                                             "bootstrap_jackknife.csv"]
    back = pd.read_csv(tmp_path / "bootstrap_intervals.csv")
    assert list(back["parameter"]) == boot20.parameters
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_bootstrap_writes_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "pheno", "--model", "pheno_real", "--out", str(run), "--quiet"]) == 0
    assert main(["bootstrap", str(run), "--n", "3", "--no-bca", "--seed", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "refits successful" in out and "pct_low" in out
    for name in ("bootstrap_estimates.csv", "bootstrap_intervals.csv", "bootstrap.png"):
        assert (run / "bootstrap" / name).exists()
    assert len(pd.read_csv(run / "bootstrap" / "bootstrap_estimates.csv")) == 3
    assert main(["bootstrap", str(run), "--n", "3", "--stratify", "NOPE", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NOPE" in err
    assert main(["bootstrap", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_pheno_bootstrap_200_agrees_with_sandwich(pheno):
    """Acceptance: percentile 95 % intervals of CL and V within 25 % of the sandwich interval's width of the
    sandwich (Wald) interval, at each end."""
    _, fit = pheno
    t0 = time.perf_counter()
    b = nlmefit.bootstrap(fit, n=200, seed=0)
    wall = time.perf_counter() - t0
    s = fit.summary()
    iv = b.intervals.set_index("parameter")
    print(f"\npheno FOCE-I bootstrap n=200 with BCa: {wall:.1f} s, success {100 * b.success_rate:.1f}%")
    for name in (CL, V):
        lo, hi = s.loc[name, "ci_low"], s.loc[name, "ci_high"]
        w = hi - lo
        print(f"{name}: sandwich [{lo:.6g}, {hi:.6g}], percentile [{iv.loc[name, 'pct_low']:.6g}, "
              f"{iv.loc[name, 'pct_high']:.6g}], BCa [{iv.loc[name, 'bca_low']:.6g}, {iv.loc[name, 'bca_high']:.6g}]"
              f"; ends off by {(iv.loc[name, 'pct_low'] - lo) / w:+.1%}, {(iv.loc[name, 'pct_high'] - hi) / w:+.1%}"
              f" of the width")
        assert abs(iv.loc[name, "pct_low"] - lo) <= 0.25 * w
        assert abs(iv.loc[name, "pct_high"] - hi) <= 0.25 * w
    assert b.success_rate >= 0.9
