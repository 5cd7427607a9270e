"""Issue 11, "no silent wrong answers", in simulation: other endpoints' rows are never overwritten, regimen
simulation works for models of one endpoint (DVID), AUC targets name their window (AUC24 vs AUCTAU), residual
error on regimen profiles is never negative unless asked for, and categorical PTA plots are bars."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import nlmefit  # noqa: E402
from nlmefit.simulation import plot_pta  # noqa: E402

THETA = {"cl": 2.0, "v": 30.0, "ka": 1.2}
OMEGA = {"cl": 0.09, "v": 0.04, "ka": 0.09}


@pytest.fixture(scope="module")
def warfarin():
    return nlmefit.datasets.load("warfarin")


@pytest.fixture(scope="module")
def warfarin_pk_fit(warfarin):
    model = nlmefit.library.get("1cmt_oral", error="proportional", dvid="cp")
    return nlmefit.fit(model, warfarin, method="focei", covariance=None)


# ------------------------------------------------------------------------------------------------ 1. endpoints
def test_simulate_keeps_or_drops_other_endpoints_rows(warfarin):
    """A model of DVID 'cp' simulates the cp rows only: the PCA rows keep their observed DV (default), or are
    dropped with other_endpoints='drop'; never filled with concentrations."""
    model = nlmefit.library.get("1cmt_oral", error="proportional", dvid="cp")
    obs = (warfarin["EVID"] == 0).to_numpy()
    pca = obs & (warfarin["DVID"] == "pca").to_numpy()
    cp = obs & (warfarin["DVID"] == "cp").to_numpy()
    sim = nlmefit.simulate(model, None, warfarin, n=2, seed=1)
    assert len(sim) == 2 * len(warfarin)
    for r in (1, 2):
        one = sim[sim["REP"] == r].reset_index(drop=True)
        np.testing.assert_array_equal(one.loc[pca, "DV"].to_numpy(float), warfarin.loc[pca, "DV"].to_numpy(float))
        assert not np.allclose(one.loc[cp, "DV"].to_numpy(float), warfarin.loc[cp, "DV"].to_numpy(float))
    dropped = nlmefit.simulate(model, None, warfarin, n=2, seed=1, other_endpoints="drop")
    assert len(dropped) == 2 * (len(warfarin) - int(pca.sum()))
    assert not ((dropped["DVID"] == "pca") & (dropped["EVID"] == 0)).any()
    kept_cp = sim[(sim["DVID"] == "cp") & (sim["EVID"] == 0)]["DV"].to_numpy()
    np.testing.assert_array_equal(dropped[(dropped["DVID"] == "cp") & (dropped["EVID"] == 0)]["DV"], kept_cp)
    with pytest.raises(nlmefit.ModelSpecError, match="other_endpoints"):
        nlmefit.simulate(model, None, warfarin, other_endpoints="fill")


# ------------------------------------------------------------------------------------------------ 2. regimens
def test_regimen_simulation_for_a_multi_endpoint_fit(warfarin_pk_fit):
    """A focei fit of warfarin PK (dvid='cp') simulates regimens for virtual and for observed subjects; a numeric
    DVID works too, and the template's endpoint does not change the numbers."""
    regs = ["10 mg po q24h x7", "5 mg po q12h x14"]
    sim = nlmefit.simulate_regimens(warfarin_pk_fit, regs, population=200, seed=1)
    assert sim.profiles.shape[:2] == (2, 200) and np.isfinite(sim.profiles).all() and sim.profiles.min() > -1e-9
    assert sim.profiles[:, :, -1].mean() > 0
    own = nlmefit.simulate_regimens(warfarin_pk_fit, regs[0], subjects=[1, 2], n_draws=5, seed=1)
    assert set(own.exposures["ID"]) == {1, 2} and np.isfinite(own.exposures["AUC24"]).all()
    est = warfarin_pk_fit.estimates.to_dict()
    plain = nlmefit.library.get("1cmt_oral", error="proportional")
    numeric = nlmefit.library.get("1cmt_oral", error="proportional", dvid=1)
    a = nlmefit.simulate_regimens(None, regs, model=plain, params=est, population=50, seed=3)
    b = nlmefit.simulate_regimens(None, regs, model=numeric, params=est, population=50, seed=3)
    np.testing.assert_array_equal(a.profiles, b.profiles)


# ------------------------------------------------------------------------------------------------ 3. AUC basis
@pytest.mark.parametrize("steady_state,rtol", [(True, 1e-9), (False, 1e-2)])
def test_same_daily_dose_gives_the_same_auc24_and_pta(steady_state, rtol):
    """320 mg q12h and 640 mg q24h: the same daily exposure, so the same AUC24 (per subject: the same η draws)
    and the same PTA(AUC24 >= x); AUCTAU is per dosing interval and differs by the factor 2."""
    model = nlmefit.library.get("1cmt_oral", theta=THETA, omega=OMEGA, sigma={"add": 0.1})
    regs = ["320 mg po q12h x14", "640 mg po q24h x7"]
    sim = nlmefit.simulate_regimens(None, regs, model=model, population=1000, seed=1, steady_state=steady_state)
    ex = {lab: g.reset_index(drop=True) for lab, g in sim.exposures.groupby("REGIMEN", sort=False)}
    q12, q24 = (ex[lab] for lab in sim.labels)
    np.testing.assert_allclose(q12["AUC24"], q24["AUC24"], rtol=rtol)
    np.testing.assert_allclose(q12["CAVG"], q24["CAVG"], rtol=rtol)
    np.testing.assert_allclose(2 * q12["AUCTAU"], q24["AUCTAU"], rtol=rtol)
    if steady_state:  # at steady state AUC24 = F·daily dose/CL
        np.testing.assert_allclose(q12["AUC24"], 640.0 / sim.parameters["cl"].to_numpy(), rtol=1e-6)
    x = float(np.median(q24["AUC24"]))
    tab = sim.pta("AUC24", x)
    assert tab["PTA"].iloc[0] == pytest.approx(tab["PTA"].iloc[1], abs=0.005)
    assert (tab["TARGET"] == f"AUC24 >= {x:g}").all()
    assert list(tab["WINDOW"]) == ["[144, 168] h", "[144, 168] h"]
    tau = sim.pta("AUCTAU", x)
    assert list(tau["WINDOW"]) == ["[156, 168] h", "[144, 168] h"]
    assert tau["PTA"].iloc[0] < 0.1 < 0.4 < tau["PTA"].iloc[1]
    # the bare name is a backward-compatible alias of AUC24, and the tables say so
    pd.testing.assert_frame_equal(sim.pta("AUC", x), tab)
    np.testing.assert_array_equal(sim.exposures["AUC"], sim.exposures["AUC24"])
    assert {"AUC24_WINDOW", "WINDOW"} <= set(sim.exposures)
    assert set(sim.exposures["AUC24_WINDOW"]) == {"[144, 168] h"}
    assert {"AUC24_q50", "AUCTAU_q50"} <= set(sim.summary().columns)


def test_auc24_for_intervals_longer_than_a_day_is_the_daily_average():
    """q48h: AUC24 is the AUC over the last whole dosing interval per 24 h (AUC_48 / 2), the window stated."""
    model = nlmefit.library.get("1cmt_oral", theta=THETA, omega=OMEGA, sigma={"add": 0.1})
    sim = nlmefit.simulate_regimens(None, ["1280 mg po q48h x4", "640 mg po q24h x8"], model=model,
                                    population=200, seed=2, steady_state=True)
    q48, q24 = (g.reset_index(drop=True) for _, g in sim.exposures.groupby("REGIMEN", sort=False))
    np.testing.assert_allclose(q48["AUC24"], q48["AUCTAU"] / 2, rtol=1e-9)
    np.testing.assert_allclose(q48["AUC24"], q24["AUC24"], rtol=1e-6)
    assert q48["AUC24_WINDOW"].iloc[0] == "[144, 192] h per 24 h"


# ------------------------------------------------------------------------------------------------ 4. residual
def test_residual_error_on_profiles_is_clipped_at_zero_unless_asked():
    """An additive error larger than the troughs: residual=True never gives negative concentrations (values
    below 0 are set to 0; the draws are otherwise the same), allow_negative=True keeps them."""
    model = nlmefit.library.get("1cmt_oral", theta=THETA, omega=OMEGA, sigma={"add": 1.0})
    kw = dict(model=model, population=200, seed=4, residual=True)
    clipped = nlmefit.simulate_regimens(None, "50 mg po q24h x3", **kw)
    raw = nlmefit.simulate_regimens(None, "50 mg po q24h x3", allow_negative=True, **kw)
    assert (raw.profiles < 0).any()
    assert (clipped.profiles >= 0).all()
    np.testing.assert_array_equal(clipped.profiles, np.maximum(raw.profiles, 0.0))
    off = nlmefit.simulate_regimens(None, "50 mg po q24h x3", model=model, population=200, seed=4)
    assert off.residual is False and off.profiles.min() > -1e-9 and not np.array_equal(off.profiles, raw.profiles)


# ------------------------------------------------------------------------------------------------ 5. PTA plot
def test_pta_plot_of_categorical_regimens_is_bars():
    model = nlmefit.library.get("1cmt_oral", theta=THETA, omega=OMEGA, sigma={"add": 0.1})
    regs = ["50 mg po q12h x10", "100 mg po q12h x10", "200 mg po q24h x5"]
    sim = nlmefit.simulate_regimens(None, regs, model=model, population=100, seed=1, steady_state=True)
    fig = plot_pta(sim.pta("AUC24", 40.0), target=0.9)
    ax = fig.axes[0]
    assert len(ax.patches) == 3  # one bar per regimen
    assert all(len(line.get_xdata()) <= 2 for line in ax.lines)  # no line joining the regimens
    assert "AUC24" in ax.get_title() and "[" in ax.get_title()
    mic = plot_pta(sim.pta("AUC24", 40.0, mic=[0.5, 1, 2]))  # against MIC (numeric): lines
    assert any(len(line.get_xdata()) == 3 for line in mic.axes[0].lines)
