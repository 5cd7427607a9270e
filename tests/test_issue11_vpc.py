"""Issue 11, item 17: VPC options (log y, simulated median lines, stratification by covariate / DVID / DOSE, pcVPC,
bands clipped at zero and at the LLOQ) and the extra GOF panels (|IWRES| vs IPRED, QQ plot of CWRES).

Fits: theophylline (1-cmt oral, additive error, FOCE-I), warfarin PK (DVID "cp", proportional error) for covariate
strata, pheno (multiple IV doses; at NONMEM's initial values) for dose strata, and a simulated M3 data set for the
LLOQ. Figures are checked through their artists and labels and saved as PNG to tmp_path.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import nlmefit  # noqa: E402
from nlmefit.diagnostics.gof import GOF_PANELS, plot_gof  # noqa: E402
from nlmefit.diagnostics.vpc import plot_vpc, vpc  # noqa: E402

N_REP = 40


@pytest.fixture(scope="module")
def theo():
    return nlmefit.fit(nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline"), method="focei",
                       covariance=None)


@pytest.fixture(scope="module")
def warf():
    df = nlmefit.datasets.load("warfarin")
    df = df[df["DVID"] == "cp"].reset_index(drop=True)
    model = nlmefit.library.get("1cmt_oral", error="proportional", dvid="cp")
    return nlmefit.fit(model, df, method="focei", covariance=None)


@pytest.fixture(scope="module")
def pheno():
    return nlmefit.fit(nlmefit.models.examples.pheno_real(), nlmefit.datasets.load("pheno"), method="focei",
                       covariance=None, maxiter=0)


@pytest.fixture(scope="module")
def cens():
    """Simulated 1-cmt oral data, M3 records (CENS = 1, DV = LLOQ) below the 25th percentile; fit at the truth."""
    m = nlmefit.library.get("1cmt_oral", theta={"ka": 1.0, "cl": 2.0, "v": 20.0},
                            omega={"ka": 0.1, "cl": 0.1, "v": 0.1}, sigma={"add": 0.5})
    df = nlmefit.simulate(m, None, times=[0.25, 0.5, 1, 2, 4, 8, 12, 24], doses=[{"TIME": 0, "AMT": 100, "CMT": 1}],
                          n_subjects=40, seed=3).drop(columns="REP")
    obs = df["EVID"] == 0
    lloq = float(np.quantile(df.loc[obs, "DV"], 0.25))
    df["CENS"] = (obs & (df["DV"] < lloq)).astype(int)
    df.loc[df["CENS"] == 1, "DV"] = lloq
    return nlmefit.fit(m, df, method="focei", maxiter=0, covariance=None), lloq


def _png(fig, path) -> None:
    fig.savefig(path, dpi=50)
    plt.close(fig)
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _lines(ax, label):
    return [ln for ln in ax.lines if ln.get_label() == label]


def _fills(ax, label):
    return [c for c in ax.collections if c.get_label() == label]


def _main_axes(fig):
    return [a for a in fig.axes if a.get_ylabel() in ("DV", "prediction-corrected DV")]


# ---------------------------------------------------------------------------------------------------- VPC
def test_vpc_draws_simulated_median_lines_and_ci_bands(theo, tmp_path):
    res = vpc(theo, N_REP, seed=0)
    fig = plot_vpc(res)
    (ax,) = fig.axes
    t = res.percentiles
    for q, name in ((0.5, "median"), (0.05, "5th percentile"), (0.95, "95th percentile")):
        tq = t[t["pi"] == q].sort_values("x")
        (med,) = _lines(ax, f"simulated {name}")  # the median of the simulated percentile over replicates
        np.testing.assert_allclose(med.get_ydata(), tq["sim_median"])
        (obs,) = _lines(ax, f"observed {name}")
        np.testing.assert_allclose(obs.get_ydata(), tq["obs"])
        (band,) = _fills(ax, f"simulated {name} 90% CI")
        ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
        assert ys.min() == pytest.approx(tq["sim_lo"].min()) and ys.max() == pytest.approx(tq["sim_hi"].max())
    labels = [h.get_text() for h in ax.get_legend().get_texts()]
    assert "simulated median" in labels and "simulated 5th/95th" in labels
    assert ax.get_yscale() == "linear"
    _png(fig, tmp_path / "vpc_theo.png")


def test_vpc_log_y(theo, tmp_path):
    res = theo.vpc(n_rep=N_REP, seed=0)  # through FitResult
    fig = res.plot(log_y=True)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    # bands reaching down to zero (clipped simulations, additive error) are drawn from a positive floor
    for c in ax.collections:
        if c.get_label().endswith("CI"):
            v = np.concatenate([p.vertices[:, 1] for p in c.get_paths()])
            assert (v[np.isfinite(v)] > 0).all()
    assert _lines(ax, "simulated median")
    _png(fig, tmp_path / "vpc_theo_log.png")
    _png(plot_vpc(vpc(theo, N_REP, seed=0, pred_corrected=True), log_y=True), tmp_path / "pcvpc_theo_log.png")


def test_vpc_clips_simulations_at_zero_for_nonnegative_data(theo):
    clipped = vpc(theo, N_REP, seed=0)
    raw = vpc(theo, N_REP, seed=0, clip=None)
    assert clipped.floor == 0.0 and raw.floor is None
    assert (raw.percentiles["sim_lo"] < 0).any()  # additive error: negative simulated concentrations
    for c in ("sim_lo", "sim_median", "sim_hi"):
        assert (clipped.percentiles[c] >= 0).all()
        assert (clipped.percentiles[c] >= raw.percentiles[c] - 1e-12).all()  # clipping only raises values
    np.testing.assert_array_equal(clipped.percentiles["obs"], raw.percentiles["obs"])  # data never changed
    assert vpc(theo, 5, seed=0, clip=-1.0).floor == -1.0
    assert vpc(theo, 5, seed=0, pc_log=True, pred_corrected=True).floor is None  # log-scale DV: no floor
    with pytest.raises(ValueError, match="clip"):
        vpc(theo, 5, clip="zero")


def test_vpc_no_floor_when_data_can_be_negative(theo):
    df = nlmefit.datasets.load("theophylline").copy()
    first_obs = df.index[df["EVID"] == 0][0]
    df.loc[first_obs, "DV"] = -0.05  # e.g. a baseline-corrected record
    fit = nlmefit.fit(theo.model, df, method="focei", maxiter=0, covariance=None)
    res = vpc(fit, 20, seed=0)
    assert res.floor is None
    assert (res.percentiles["sim_lo"] < 0).any()


def test_vpc_stratified_by_covariate(warf, tmp_path):
    res = vpc(warf, N_REP, seed=0, stratify="SEX")
    assert list(res.edges) == ["SEX=female", "SEX=male"]
    sex = warf.data.panel.covariates[:, list(warf.data.panel.covariate_names).index("SEX")]
    male_ids = set(np.asarray(warf.data.panel.ids)[sex == 1].tolist())
    o = res.observed
    assert set(o.loc[o["STRATA"] == "SEX=male", "ID"]) == male_ids
    fig = plot_vpc(res, log_y=True)
    axes = _main_axes(fig)
    assert [a.get_title() for a in axes] == ["VPC: SEX=female", "VPC: SEX=male"]
    assert all(a.get_yscale() == "log" and _lines(a, "simulated median") for a in axes)
    _png(fig, tmp_path / "vpc_warf_sex.png")
    # a continuous covariate: quantile groups of about equal size, in increasing order
    wt = vpc(warf, N_REP, seed=0, stratify="WT", stratify_groups=3)
    names = list(wt.edges)
    assert len(names) == 3 and names[0].startswith("WT<") and names[2].startswith("WT≥") and "≤WT<" in names[1]
    counts = wt.observed["STRATA"].value_counts()
    assert counts.min() > 0.2 * len(wt.observed)
    fig = plot_vpc(wt, ncols=2)
    assert len(_main_axes(fig)) == 3  # one panel per stratum, wrapped on two rows
    _png(fig, tmp_path / "vpc_warf_wt.png")
    with pytest.raises(ValueError, match="covariate"):
        vpc(warf, 5, stratify="HEIGHT")


def test_vpc_stratified_by_dvid_and_dose(warf, pheno, tmp_path):
    res = vpc(warf, 10, seed=0, stratify="DVID")
    assert list(res.edges) == ["DVID=cp"]
    both = vpc(warf, 10, seed=0, stratify=["SEX", "DVID"])
    assert list(both.edges) == ["SEX=female, DVID=cp", "SEX=male, DVID=cp"]
    # DOSE (no such column): the subject's first dose amount
    df = nlmefit.datasets.load("warfarin")
    first = df[df["EVID"] == 1].groupby("ID")["AMT"].first()
    d = vpc(warf, 10, seed=0, stratify="DOSE")
    cut = float(next(iter(d.edges)).split("<")[1])
    o = d.observed
    np.testing.assert_array_equal(o["STRATA"] == f"DOSE<{cut:g}", first.loc[o["ID"]].to_numpy() < cut)
    # pheno: multiple doses, loading dose per subject; three groups, time after dose
    ph = vpc(pheno, N_REP, seed=0, stratify="DOSE", stratify_groups=3, idv="TAD")
    names = list(ph.edges)
    assert len(names) == 3 and names[0].startswith("DOSE<") and names[-1].startswith("DOSE≥")
    fig = plot_vpc(ph)
    assert [a.get_title() for a in _main_axes(fig)] == [f"VPC: {n}" for n in names]
    assert all(a.get_xlabel() == "TAD" for a in _main_axes(fig))
    _png(fig, tmp_path / "vpc_pheno_dose.png")
    # a covariate with few levels gives one stratum per level, in numeric order
    apgr = vpc(pheno, 5, seed=0, stratify="APGR", stratify_groups=2)
    assert len(apgr.edges) == 2  # APGR has 10 levels: split at the median


def test_pcvpc_is_an_option_with_lloq(cens, tmp_path):
    fit, lloq = cens
    res = vpc(fit, N_REP, seed=0)
    assert res.floor == 0.0 and res.blq is not None
    fig = plot_vpc(res)
    ax = _main_axes(fig)[0]
    (line,) = _lines(ax, "LLOQ")
    assert line.get_ydata()[0] == pytest.approx(lloq)
    for c in ax.collections:  # bands are censored at the LLOQ: nothing drawn below it
        if c.get_label().endswith("CI"):
            v = np.concatenate([p.vertices[:, 1] for p in c.get_paths()])
            assert (v[np.isfinite(v)] >= lloq - 1e-9).all()
    for ln in ax.lines:
        if ln.get_label().startswith(("observed ", "simulated ")):
            y = np.asarray(ln.get_ydata(), float)
            assert (y[np.isfinite(y)] >= lloq - 1e-9).all()
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "fraction < LLOQ"
    assert _lines(fig.axes[1], "simulated median")
    _png(fig, tmp_path / "vpc_cens.png")
    pc = vpc(fit, N_REP, seed=0, pred_corrected=True)
    assert pc.pred_corrected and repr(pc).startswith("VpcResult(pcVPC")
    fig = plot_vpc(pc, log_y=True)
    ax = _main_axes(fig)[0]
    assert ax.get_title() == "pcVPC" and ax.get_ylabel() == "prediction-corrected DV"
    assert [c for c in ax.get_children() if getattr(c, "get_label", lambda: "")() == "LLOQ (prediction-corrected)"]
    _png(fig, tmp_path / "pcvpc_cens.png")


# ---------------------------------------------------------------------------------------------------- GOF
def test_gof_extended_panels(theo, tmp_path):
    default = plot_gof(theo)
    assert len(default.axes) == 4  # unchanged for existing callers
    plt.close(default)
    fig = theo.plot_gof(extended=True)
    axes = fig.axes
    assert len(axes) == 6
    pr = theo.predictions
    a_abs, a_qq = axes[4], axes[5]
    assert a_abs.get_ylabel() == "|IWRES|" and a_abs.get_xlabel().endswith("(IPRED)")
    pts = a_abs.collections[0].get_offsets()
    np.testing.assert_allclose(pts[:, 0], pr["IPRED"])
    np.testing.assert_allclose(pts[:, 1], pr["IWRES"].abs())
    assert len(a_abs.lines) >= 2  # E|N(0,1)| reference + smoother
    assert a_qq.get_xlabel() == "N(0, 1) quantiles" and a_qq.get_ylabel() == "CWRES quantiles"
    q = a_qq.collections[0].get_offsets()
    np.testing.assert_allclose(q[:, 1], np.sort(pr["CWRES"]))
    assert np.all(np.diff(q[:, 0]) > 0) and q[:, 0].mean() == pytest.approx(0, abs=1e-12)
    _png(fig, tmp_path / "gof_extended.png")
    one = plot_gof(theo, panels=["res_qq", "absiwres_ipred"], residual="IWRES")
    assert [a.get_ylabel() for a in one.axes] == ["IWRES quantiles", "|IWRES|"]
    _png(one, tmp_path / "gof_two.png")
    own, ax = plt.subplots(1, 2)
    assert plot_gof(theo, ax=ax, panels=("dv_ipred", "res_qq")) is own
    plt.close(own)
    assert set(GOF_PANELS) >= {"absiwres_ipred", "res_qq"}
    with pytest.raises(ValueError, match="panel"):
        plot_gof(theo, panels=["qq"])
    with pytest.raises(ValueError, match="expected 6 axes"):
        plot_gof(theo, extended=True, ax=plt.subplots(2, 2)[1])
    plt.close("all")


def test_gof_extra_panels_leave_out_censored(cens, tmp_path):
    fit, _ = cens
    pr = fit.predictions
    n_unc = int((pr["CENS"] == 0).sum())
    fig = plot_gof(fit, panels=list(GOF_PANELS))
    assert len(fig.axes[4].collections[0].get_offsets()) == n_unc
    assert len(fig.axes[5].collections[0].get_offsets()) == n_unc
    _png(fig, tmp_path / "gof_cens_extended.png")
