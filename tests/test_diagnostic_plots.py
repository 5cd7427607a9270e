"""Diagnostic figures: GOF panels, individual fits on a fine grid, η distributions and η-vs-covariate plots."""
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

import nlmefit
from nlmefit.diagnostics._grid import grid_predictions, predict_on_grid, time_grid
from nlmefit.diagnostics.eta import eta_table, is_categorical, plot_eta_covariates, plot_eta_distributions
from nlmefit.diagnostics.gof import lowess, plot_gof
from nlmefit.diagnostics.individual import observation_table, plot_individuals

plt.switch_backend("Agg")

LLOQ = 0.35


@pytest.fixture(scope="module")
def theo():
    model = nlmefit.library.get("1cmt_oral", error="additive")
    return nlmefit.fit(model, nlmefit.datasets.load("theophylline"), method="focei", covariance=None)


@pytest.fixture(scope="module")
def pheno():
    # the individual estimates at NONMEM's initial values are all these plots need (no outer iterations)
    return nlmefit.fit(nlmefit.models.examples.pheno_real(), nlmefit.datasets.load("pheno"), method="focei",
                       covariance=None, maxiter=0)


@pytest.fixture(scope="module")
def censored():
    """A simulated 1-cmt oral set with observations below LLOQ marked CENS=1, DV=LLOQ (M3)."""
    truth = {"cl": 2.0, "v": 30.0, "ka": 1.2, "omega_cl": 0.09, "omega_v": 0.04, "omega_ka": 0.09,
             "sigma_add": 0.1}
    model = nlmefit.library.get("1cmt_oral", theta={"cl": 2.0, "v": 30.0, "ka": 1.2},
                                omega={"cl": 0.09, "v": 0.04, "ka": 0.09}, sigma={"add": 0.1})
    sim = nlmefit.simulate(model, truth, times=[0.5, 1, 2, 4, 8, 12, 24, 36, 48],
                           doses=[{"TIME": 0.0, "AMT": 30.0, "CMT": 1}], n_subjects=8, seed=4).drop(columns="REP")
    below = (sim["EVID"] == 0) & (sim["DV"] < LLOQ)
    sim["CENS"] = below.astype(int)
    sim.loc[below, "DV"] = LLOQ
    assert below.sum() > 5
    return nlmefit.fit(model, sim, method="focei", covariance=None, maxiter=0)


def _png(fig, path) -> None:
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close(fig)


def _labelled(ax, label):
    return [c for c in ax.collections if c.get_label() == label]


# ---------------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("name", ["theo", "pheno"])
def test_grid_at_observation_times_reproduces_predictions(name, request):
    fit = request.getfixturevalue(name)
    pr = fit.predictions
    times = {i: g["TIME"].to_numpy() for i, g in pr.groupby("ID")}
    grid = grid_predictions(fit, times=times)
    both = pr.merge(grid, on=["ID", "TIME"], suffixes=("", "_grid"))
    assert len(both) == len(pr)
    np.testing.assert_allclose(both["PRED_grid"], both["PRED"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(both["IPRED_grid"], both["IPRED"], rtol=0, atol=1e-8)


def test_grid_follows_the_dosing_history(theo, pheno):
    g = grid_predictions(theo, n_points=50)
    assert list(g.columns) == ["ID", "TIME", "PRED", "IPRED"]
    last = theo.predictions.groupby("ID")["TIME"].max()
    for sid, s in g.groupby("ID"):
        assert s["TIME"].min() == 0 and s["TIME"].max() == pytest.approx(last[sid])
        assert s["TIME"].is_monotonic_increasing
        at0 = s[s["TIME"] == 0]
        assert (at0[["PRED", "IPRED"]].to_numpy() == 0).all()  # oral dose at 0: nothing absorbed yet
        peak = s.loc[s["IPRED"].idxmax()]
        assert 0 < peak["TIME"] < s["TIME"].max() and peak["IPRED"] > 1
    # a later dose: zero before it, a peak after it
    p = theo.model.parameters.params_from_dict(theo.estimates.to_dict())
    late = predict_on_grid(theo.model, p, pd.DataFrame({"TIME": [2.0], "AMT": [320.0], "CMT": [1]}),
                           np.linspace(0, 12, 25))
    assert (late.loc[late["TIME"] <= 2, "PRED"] == 0).all() and (late.loc[late["TIME"] > 2, "PRED"] > 0).all()
    # IV boluses (pheno): the curve jumps at every dose
    gp = grid_predictions(pheno, ids=[1], n_points=100)
    panel = pheno.data.panel
    doses = panel.dose_time[0][panel.dose_mask[0]]
    f = dict(zip(gp["TIME"], gp["PRED"]))
    eps = 1e-6 * max(gp["TIME"].max(), 1.0)
    for d in doses[1:]:
        after = gp.loc[gp["TIME"] > d, "PRED"].iloc[0]
        assert after > f[min(f, key=lambda t: abs(t - (d - eps)))] + 0.5


def test_predict_on_grid_forms(pheno):
    m, est = pheno.model, pheno.estimates
    doses = pd.DataFrame({"TIME": [0.0, 12.0], "AMT": [20.0, 5.0], "ADDL": [0, 3], "II": [0, 12]})
    cov = pd.DataFrame({"ID": [7, 8, 9], "WGT": [1.0, 2.0, 1.0], "APGR": [7, 7, 3]})
    t = np.linspace(0, 60, 7)
    typical = predict_on_grid(m, est, doses, t, covariates=cov)  # one regimen for every subject
    assert list(typical.columns) == ["ID", "TIME", "PRED"] and len(typical) == 21
    wide = typical.pivot(index="TIME", columns="ID", values="PRED")
    np.testing.assert_allclose(wide[7], 2 * wide[8], rtol=1e-10)  # V ∝ WGT and CL ∝ WGT: conc ∝ 1/WGT at t
    assert (wide[9] < wide[7]).all()  # APGR < 5 raises V
    eta = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, -0.2]])
    ind = predict_on_grid(m, est, doses, t, eta=eta, covariates=cov)
    np.testing.assert_allclose(ind.loc[ind["ID"] == 7, "IPRED"], wide[7].to_numpy(), rtol=1e-12)
    draws = predict_on_grid(m, est, doses, t, eta=torch.zeros(4, 3, 2), covariates=cov)
    assert list(draws.columns) == ["ID", "TIME", "SAMPLE", "IPRED"] and len(draws) == 4 * 21
    table = pd.DataFrame({"ID": [9, 7], "ETA_cl": [0.0, 0.0], "ETA_v": [0.0, 0.0]})
    both = predict_on_grid(m, est, doses, {7: t, 8: t}, eta={"PRED": None, "IPRED": table}, covariates=cov,
                           ids=[7, 8])
    assert both.loc[both["ID"] == 8, "IPRED"].isna().all()  # no η̂ for ID 8
    np.testing.assert_allclose(both.loc[both["ID"] == 7, "IPRED"], both.loc[both["ID"] == 7, "PRED"])
    with pytest.raises(ValueError, match="shape"):
        predict_on_grid(m, est, doses, t, eta=torch.zeros(3, 5), covariates=cov)


def test_time_grid_brackets_doses():
    g = time_grid(24.0, 10, np.array([0.0, 12.0, 30.0]))
    assert g[0] == 0 and g[-1] == 24 and np.all(np.diff(g) > 0)
    assert 12.0 in g and (g > 12).any() and g[g > 12].min() - 12 < 1e-4 and g[g < 12].max() > 12 - 1e-4


# ---------------------------------------------------------------------------------------------------- GOF
def test_lowess_is_robust_and_recovers_a_curve():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 400)
    y = np.sin(6 * x) + 0.2 * rng.standard_normal(400)
    y[::40] += 8.0  # outliers
    xs, ys = lowess(x, y, frac=0.2)
    assert np.abs(ys - np.sin(6 * xs)).max() < 0.2
    xs, ys = lowess(x, 2 * x + 1, frac=0.5)
    np.testing.assert_allclose(ys, 2 * xs + 1, atol=1e-10)
    assert len(lowess([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])[0]) == 0


def test_plot_gof(theo, tmp_path):
    fig = plot_gof(theo)
    axes = fig.axes
    assert len(axes) == 4
    assert axes[0].get_xlabel().endswith("(PRED)") and axes[1].get_xlabel().endswith("(IPRED)")
    assert axes[2].get_ylabel() == "CWRES" and axes[2].get_xlabel() == "Time"
    assert all(len(ax.lines) >= 2 for ax in axes)  # reference line(s) + smoother
    _png(fig, tmp_path / "gof.png")
    _png(plot_gof(theo, log=True), tmp_path / "gof_log.png")
    own, ax = plt.subplots(1, 4, figsize=(12, 3))
    assert plot_gof(theo, ax=ax, residual="IWRES") is own
    assert ax[3].get_ylabel() == "IWRES"
    _png(own, tmp_path / "gof_own_axes.png")
    with pytest.raises(ValueError, match="residual"):
        plot_gof(theo, residual="NOPE")


def test_gof_marks_censored_records(censored, tmp_path):
    fig = plot_gof(censored)
    pr = censored.predictions
    n_cens = int((pr["CENS"] != 0).sum())
    for ax in fig.axes[:2]:
        (marks,) = _labelled(ax, "censored (at limit)")
        offsets = marks.get_offsets()
        assert len(offsets) == n_cens and np.allclose(offsets[:, 1], LLOQ)
    for ax in fig.axes[2:]:  # residual panels: censored records left out
        assert sum(len(c.get_offsets()) for c in ax.collections) == int((pr["CENS"] == 0).sum())
    _png(fig, tmp_path / "gof_censored.png")


# ---------------------------------------------------------------------------------------------------- individuals
@pytest.mark.parametrize("per_page", [12, 5, 7])
def test_individual_pages(theo, per_page, tmp_path):
    figs = plot_individuals(theo, per_page=per_page, n_points=60)
    assert len(figs) == math.ceil(12 / per_page)
    shown = [ax for f in figs for ax in f.axes if ax.get_visible() and ax.get_title().startswith("ID ")]
    assert [ax.get_title() for ax in shown] == [f"ID {i}" for i in range(1, 13)]
    ax = shown[0]
    assert {line.get_label() for line in ax.lines} >= {"IPRED", "PRED"}
    assert len(_labelled(ax, "Observed")[0].get_offsets()) == 11
    _png(figs[0], tmp_path / f"ind_{per_page}.png")
    for f in figs[1:]:
        plt.close(f)


def test_individuals_pheno_dose_marks(pheno, tmp_path):
    ids = list(pheno.data.panel.ids[:6])
    (fig,) = plot_individuals(pheno, ids=ids, per_page=6, ncols=3, log_y=True)
    panel = pheno.data.panel
    for k, ax in enumerate(fig.axes[:6]):
        (marks,) = _labelled(ax, "Dose")
        times = np.sort(marks.get_offsets()[:, 0])
        np.testing.assert_allclose(times, np.sort(panel.dose_time[k][panel.dose_mask[k]]))
        assert ax.get_yscale() == "log"
    _png(fig, tmp_path / "ind_pheno.png")


def test_individuals_mark_blq_at_lloq(censored, tmp_path):
    obs = observation_table(censored)
    assert np.allclose(obs.loc[obs["CENS"] == 1, "LIMIT"], LLOQ) and obs.loc[obs["CENS"] == 0, "LIMIT"].isna().all()
    figs = plot_individuals(censored, per_page=4, ncols=2)
    assert len(figs) == 2
    n_marked = 0
    for f in figs:
        for ax in f.axes:
            for c in _labelled(ax, "BLQ (at LLOQ)"):
                assert np.allclose(c.get_offsets()[:, 1], LLOQ)
                n_marked += len(c.get_offsets())
    assert n_marked == int((obs["CENS"] == 1).sum())
    _png(figs[0], tmp_path / "ind_blq.png")
    plt.close(figs[1])


# ---------------------------------------------------------------------------------------------------- η
def test_eta_table_and_distributions(theo, tmp_path):
    tab = eta_table(theo)
    assert list(tab.columns) == ["ID", "ETA_cl", "ETA_v", "ETA_ka", "WT", "DOSE_MGKG"] and len(tab) == 12
    np.testing.assert_allclose(tab["ETA_cl"], theo.individual_estimates["ETA_cl"])
    fig = plot_eta_distributions(theo)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 3
    for n, t in zip(theo.eta_names, titles):
        assert n in t and f"shrinkage {100 * theo.eta_shrinkage[n]:.0f}%" in t
    _png(fig, tmp_path / "eta.png")


def test_eta_covariates_pheno(pheno, tmp_path):
    tab = eta_table(pheno)
    assert not is_categorical(tab["WGT"]) and is_categorical(tab["APGR"])  # APGR: 10 distinct scores
    fig = plot_eta_covariates(pheno)  # default: the covariates that vary (FA1/FA2 are constant at baseline)
    axes = np.array(fig.axes).reshape(2, -1)
    assert axes.shape == (2, 2)
    assert [ax.get_xlabel() for ax in axes[0]] == ["WGT", "APGR"]
    for ax in axes.ravel():
        assert "shrinkage" in ax.get_title()
    wgt, apgr = axes[0]
    assert len(wgt.lines) >= 2  # zero line + smoother
    assert len(apgr.get_xticks()) == tab["APGR"].nunique()  # one box per score
    _png(fig, tmp_path / "eta_cov.png")
    _png(plot_eta_covariates(pheno, covariates=["WGT"]), tmp_path / "eta_wgt.png")
    with pytest.raises(ValueError, match="not in the data"):
        plot_eta_covariates(pheno, covariates=["HEIGHT"])
