"""simulate(): record layout preserved, Panel round trip, seeds, and the zero-variability identity."""
import numpy as np
import pandas as pd
import pytest

import nlmefit


@pytest.fixture(scope="module")
def theo():
    return nlmefit.datasets.load("theophylline")


def _model():
    return nlmefit.library.get("1cmt_oral", error="combined2", theta={"cl": 2.8, "v": 32.0, "ka": 1.5},
                               omega={"cl": 0.07, "v": 0.02, "ka": 0.4}, sigma={"add": 0.3, "prop": 0.1})


def test_layout_and_panel_round_trip(theo):
    before = theo.copy()
    sim = nlmefit.simulate(_model(), None, theo, n=3, seed=11)
    pd.testing.assert_frame_equal(theo, before)  # input untouched
    assert len(sim) == 3 * len(theo) and list(sim["REP"].unique()) == [1, 2, 3]
    one = sim[sim["REP"] == 2].drop(columns="REP").reset_index(drop=True)
    # everything but DV on observation rows is the user's record, in the user's order
    obs = theo["EVID"] == 0
    pd.testing.assert_frame_equal(one.loc[~obs], theo.loc[~obs].astype({"DV": float}), check_dtype=False)
    pd.testing.assert_frame_equal(one.drop(columns="DV"), theo.drop(columns="DV"))
    assert np.isfinite(one.loc[obs, "DV"]).all()
    # simulated records go through the Panel and come back unchanged
    panel = nlmefit.Panel.from_dataframe(one)
    back = panel.to_dataframe()
    np.testing.assert_allclose(back["DV"].to_numpy(float), one["DV"].to_numpy(float))
    np.testing.assert_allclose(back["TIME"].to_numpy(float), one["TIME"].to_numpy(float))
    assert panel.n_obs == int(obs.sum())


def test_seed_reproducible(theo):
    a = nlmefit.simulate(_model(), None, theo, n=2, seed=5)
    b = nlmefit.simulate(_model(), None, theo, n=2, seed=5)
    c = nlmefit.simulate(_model(), None, theo, n=2, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not a["DV"].equals(c["DV"])


def test_zero_variability_gives_typical_profile():
    m = nlmefit.library.get("1cmt_oral", theta={"cl": 2.0, "v": 20.0, "ka": 1.0},
                            omega=nlmefit.Omega({"cl": 0.0, "v": 0.0, "ka": 0.0}, fixed=True))
    times = [0.5, 1, 2, 4, 8, 12]
    sim = nlmefit.simulate(m, None, times=times, doses=[{"TIME": 0, "AMT": 100, "CMT": 1}], n_subjects=5,
                           seed=1, residual=False)
    obs = sim[sim["EVID"] == 0]
    t = np.array(times)
    ka, k, v = 1.0, 0.1, 20.0
    expected = 100 * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))
    for _, g in obs.groupby("ID"):
        np.testing.assert_allclose(g["DV"].to_numpy(), expected, rtol=1e-12)


def test_simulated_spread_matches_model():
    """Log-concentrations at one time: SD across subjects ≈ what the log-normal IIV implies."""
    m = nlmefit.library.get("1cmt_iv", theta={"cl": 2.0, "v": 20.0}, omega={"cl": 0.09, "v": 0.0001},
                            sigma={"add": 1e-6})
    sim = nlmefit.simulate(m, None, times=[10.0], doses=[{"TIME": 0, "AMT": 100}], n_subjects=4000, seed=3)
    c = sim.loc[sim["EVID"] == 0, "DV"].to_numpy()
    # log C(10) = log(100/V) - CL/V*10 ; Var ≈ (10·CL/V)² ω_cl² for small ω_v
    sd = np.log(c).std()
    assert sd == pytest.approx(1.0 * 0.3, rel=0.1)


def test_bad_arguments():
    m = _model()
    with pytest.raises(nlmefit.ModelSpecError):
        nlmefit.simulate(m, None)
    with pytest.raises(nlmefit.ModelSpecError):
        nlmefit.simulate(m, {"nonsense": 1.0}, times=[1.0], doses=[{"TIME": 0, "AMT": 1, "CMT": 1}])
