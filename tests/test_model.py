"""The model layer (nlmefit.models) checked against outside truth.

Every expected number here is computed independently of nlmefit: closed-form 1-compartment concentrations in
numpy, Gaussian densities from scipy.stats, and the exact marginal likelihood of a linear-Gaussian model.
"""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.linalg import block_diag

import nlmefit
from nlmefit.errors import DataError, ModelSpecError
from nlmefit.models import ClosedForm, FunctionStructure, Model, Omega, Param, library
from nlmefit.models.examples import pheno_real

DOSE = 100.0
TIMES = {1: [0.5, 1.0, 2.0, 4.0, 8.0], 2: [1.0, 3.0, 6.0]}  # unequal counts: padding in subject 2
THETA = {"cl": 2.0, "v": 20.0}
ETA = np.array([[0.2, -0.1], [-0.3, 0.25]])  # [N, (cl, v)]


def t64(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def bolus_conc(t, doses, cl, v):
    """1-cmt IV bolus superposition: C(t) = Σ_d AMT_d/V · exp(−CL/V·(t − t_d)) over doses before t."""
    t = np.asarray(t, float)
    c = np.zeros_like(t)
    for td, amt in doses:
        dt = t - td
        c += np.where(dt > 0, amt / v * np.exp(-cl / v * np.clip(dt, 0, None)), 0.0)
    return c


def bolus_frame(dv=None, extra=None):
    """Two subjects, 100 at t=0 (IV bolus), observations at TIMES; DV defaults to a deterministic pattern."""
    rows = []
    k = 0
    for i, times in TIMES.items():
        rows.append(dict(ID=i, TIME=0.0, AMT=DOSE, DV=np.nan, EVID=1, MDV=1))
        for t in times:
            val = (3.0 + np.sin(k) + 0.1 * k) if dv is None else dv[k]
            rows.append(dict(ID=i, TIME=t, AMT=0.0, DV=val, EVID=0, MDV=0))
            k += 1
    df = pd.DataFrame(rows)
    for col, vals in (extra or {}).items():
        df[col] = vals
    return df


def observed(df):
    """[(ID, TIME, DV, row)] of the observation records, in file order."""
    obs = df[df["EVID"] == 0]
    return list(zip(obs["ID"], obs["TIME"], obs["DV"], obs.index))


def hand_conc(eta=ETA, theta=THETA):
    """{ID: concentrations at TIMES[ID]} for individual parameters θ·exp(η)."""
    out = {}
    for n, (i, times) in enumerate(TIMES.items()):
        cl = theta["cl"] * math.exp(eta[n, 0])
        v = theta["v"] * math.exp(eta[n, 1])
        out[i] = bolus_conc(times, [(0.0, DOSE)], cl, v)
    return out


def iv_model(error="additive", sigma=None, **kw):
    return Model(ClosedForm(1, oral=False), theta=dict(THETA), omega={"cl": 0.1, "v": 0.1}, sigma=sigma,
                 error=error, **kw)


def prepared(model, df):
    data = model.prepare(df)
    return model.initial_params(), data


def by_subject(data, values):
    """Masked [N, J] tensor -> {ID: numpy array of the used observations}."""
    v = values.detach().numpy()
    m = data.mask.numpy()
    return {data.panel.ids[n]: v[n][m[n]] for n in range(v.shape[0])}


# ------------------------------------------------------------------------------------------------ 1. error models
SIGMAS = {
    "additive": {"add": 0.4},
    "proportional": {"prop": 0.15},
    "combined1": {"add": 0.3, "prop": 0.1},
    "combined2": {"add": 0.3, "prop": 0.1},
    "exponential": {"add": 0.2},
}


def hand_sd(error, f, s):
    """Residual SD on the likelihood scale (f on the natural scale), from the documented table."""
    if error == "additive":
        return np.full_like(f, s["add"])
    if error == "proportional":
        return s["prop"] * f
    if error == "combined1":
        return s["add"] + s["prop"] * f
    if error == "combined2":
        return np.sqrt(s["add"] ** 2 + (s["prop"] * f) ** 2)
    if error == "exponential":
        return np.full_like(f, s["add"])
    raise AssertionError(error)


def hand_obs_loglik(error, df, eta=ETA):
    conc = hand_conc(eta)
    s = SIGMAS[error]
    out = {}
    for i, times in TIMES.items():
        dv = df[(df["ID"] == i) & (df["EVID"] == 0)]["DV"].to_numpy()
        f = conc[i]
        sd = hand_sd(error, f, s)
        if error == "exponential":
            out[i] = stats.norm.logpdf(np.log(dv), loc=np.log(f), scale=sd)
        else:
            out[i] = stats.norm.logpdf(dv, loc=f, scale=sd)
    return out


@pytest.mark.parametrize("error", list(SIGMAS))
def test_log_lik_matches_scipy_normal(error):
    df = bolus_frame()
    model = iv_model(error, SIGMAS[error])
    p, data = prepared(model, df)
    eta = t64(ETA)
    ll = model.log_lik(p, eta, data)
    expect = hand_obs_loglik(error, df)
    assert ll.shape == (2,)
    for n, i in enumerate(TIMES):
        assert float(ll[n]) == pytest.approx(expect[i].sum(), rel=1e-12, abs=1e-12)
    # per observation too
    per_obs = by_subject(data, model.obs_log_lik(p, eta, data))
    for i in TIMES:
        np.testing.assert_allclose(per_obs[i], expect[i], rtol=1e-12)


@pytest.mark.parametrize("error", ["additive", "combined2", "exponential"])
def test_log_lik_mask_drops_observations(error):
    df = bolus_frame()
    model = iv_model(error, SIGMAS[error])
    p, data = prepared(model, df)
    expect = hand_obs_loglik(error, df)
    keep = torch.zeros_like(data.mask)
    keep[0, [0, 2, 3]] = True  # subject 1: observations 1, 3, 4
    keep[1, 1] = True  # subject 2: observation 2
    keep[1, 4:] = True  # padding positions of subject 2 must stay out whatever the mask says
    ll = model.log_lik(p, t64(ETA), data, mask=keep)
    assert float(ll[0]) == pytest.approx(expect[1][[0, 2, 3]].sum(), rel=1e-12)
    assert float(ll[1]) == pytest.approx(expect[2][1], rel=1e-12)
    # an all-False mask leaves nothing; with_mask gives the same as mask=
    assert torch.equal(model.log_lik(p, t64(ETA), data, mask=torch.zeros_like(data.mask)),
                       torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(model.log_lik(p, t64(ETA), data.with_mask(keep)), ll, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ 2. M3 censoring
def test_m3_cens_column_lower_and_upper_tail():
    # subject 1 obs 4 (t=4) and subject 2 obs 3 (t=6) below LLOQ (DV holds the limit); subject 1 obs 1 above ULOQ
    dv = [9.0, 4.1, 3.2, 1.5, 0.4, 3.9, 2.6, 1.0]
    cens = [-1, 0, 0, 1, 0, 0, 0, 1]
    df = bolus_frame(dv)
    df["CENS"] = 0
    df.loc[df["EVID"] == 0, "CENS"] = cens
    error, s = "combined2", SIGMAS["combined2"]
    model = iv_model(error, s)
    p, data = prepared(model, df)
    assert int((data.cens != 0).sum()) == 3
    got = by_subject(data, model.obs_log_lik(p, t64(ETA), data))
    conc = hand_conc()
    k = 0
    for i, times in TIMES.items():
        f = conc[i]
        sd = hand_sd(error, f, s)
        for j in range(len(times)):
            y, c = dv[k], cens[k]
            if c == 1:
                want = stats.norm.logcdf((y - f[j]) / sd[j])
            elif c == -1:
                want = stats.norm.logsf(y, loc=f[j], scale=sd[j])  # P(Y > limit)
            else:
                want = stats.norm.logpdf(y, loc=f[j], scale=sd[j])
            assert got[i][j] == pytest.approx(want, rel=1e-10), (i, j, c)
            k += 1
    assert data.n_uncensored == len(dv) - 3


def test_m3_lloq_column():
    lloq = 1.2
    dv = [4.5, 4.1, 3.2, 0.7, 0.01, 3.9, 2.6, 1.0]  # three values below 1.2 (whatever they are)
    df = bolus_frame(dv, extra={"LLOQ": lloq})
    error, s = "proportional", SIGMAS["proportional"]
    model = iv_model(error, s)
    p, data = prepared(model, df)
    got = by_subject(data, model.obs_log_lik(p, t64(ETA), data))
    conc = hand_conc()
    k = 0
    for i, times in TIMES.items():
        f = conc[i]
        sd = hand_sd(error, f, s)
        for j in range(len(times)):
            if dv[k] < lloq:
                want = stats.norm.logcdf((lloq - f[j]) / sd[j])
            else:
                want = stats.norm.logpdf(dv[k], f[j], sd[j])
            assert got[i][j] == pytest.approx(want, rel=1e-10)
            k += 1


def test_m3_exponential_error_censors_on_log_scale():
    dv = [4.5, 4.1, 3.2, 2.0, 0.9, 3.9, 2.6, 1.0]
    cens = [0, 0, 0, 0, 1, 0, 0, 1]
    df = bolus_frame(dv)
    df["CENS"] = 0
    df.loc[df["EVID"] == 0, "CENS"] = cens
    model = iv_model("exponential", {"add": 0.2})
    p, data = prepared(model, df)
    ll = model.log_lik(p, t64(ETA), data)
    conc = hand_conc()
    want = [stats.norm.logpdf(np.log(dv[:4]), np.log(conc[1][:4]), 0.2).sum()
            + stats.norm.logcdf((math.log(0.9) - math.log(conc[1][4])) / 0.2),
            stats.norm.logpdf(np.log(dv[5:7]), np.log(conc[2][:2]), 0.2).sum()
            + stats.norm.logcdf((math.log(1.0) - math.log(conc[2][2])) / 0.2)]
    np.testing.assert_allclose(ll.numpy(), want, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ 3. prior
def block_model():
    om = Omega({"cl": 0.1, "v": 0.2, "ka": 0.3}, blocks=[("cl", "v")], cov={("cl", "v"): 0.02})
    return library.get("1cmt_oral", theta={"cl": 2.0, "v": 20.0, "ka": 1.0}, omega=om)


def test_log_prior_block_omega_matches_scipy_and_broadcasts():
    model = block_model()
    p = model.initial_params()
    assert model.eta_names == ["cl", "v", "ka"]
    cov = np.array([[0.1, 0.02, 0.0], [0.02, 0.2, 0.0], [0.0, 0.0, 0.3]])
    np.testing.assert_array_equal(p.omega.numpy(), cov)
    rng = np.random.default_rng(0)
    eta = rng.normal(scale=0.4, size=(4, 5, 3))  # [S, N, q]
    want = stats.multivariate_normal(mean=np.zeros(3), cov=cov).logpdf(eta.reshape(-1, 3)).reshape(4, 5)
    got = model.log_prior(p, t64(eta))
    assert got.shape == (4, 5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # [N, q] and a single [q] vector
    np.testing.assert_allclose(model.log_prior(p, t64(eta[0])).numpy(), want[0], rtol=1e-12)
    assert float(model.log_prior(p, t64(eta[0, 0]))) == pytest.approx(want[0, 0], rel=1e-12)
    # per-subject copies of the population parameters ([N] thetas, [N, q, q] omega) give the same values
    N = 5
    x = model.parameters.to_natural_vector(p)
    pp = model.parameters.from_natural_vector(x.expand(N, -1))
    assert pp.omega.shape == (N, 3, 3)
    np.testing.assert_allclose(model.log_prior(pp, t64(eta[0])).numpy(), want[0], rtol=1e-12)
    np.testing.assert_allclose(model.log_prior(pp, t64(eta)).numpy(), want, rtol=1e-12)


def test_per_subject_parameter_copies_give_same_log_lik():
    df = bolus_frame()
    model = iv_model("combined1", SIGMAS["combined1"])
    p, data = prepared(model, df)
    x = model.parameters.to_natural_vector(p)
    pp = model.parameters.from_natural_vector(x.expand(data.n_subjects, -1))
    assert pp.theta["cl"].shape == (2,) and pp.sigma["add"].shape == (2,)
    eta = t64(ETA)
    np.testing.assert_allclose(model.log_lik(pp, eta, data).numpy(), model.log_lik(p, eta, data).numpy(),
                               rtol=1e-13)
    # with a leading sample dimension as well
    eta_s = torch.stack([eta, 0.5 * eta, torch.zeros_like(eta)])
    np.testing.assert_allclose(model.log_lik(pp, eta_s, data).numpy(), model.log_lik(p, eta_s, data).numpy(),
                               rtol=1e-13)
    expect = hand_obs_loglik("combined1", df)
    assert float(model.log_lik(pp, eta_s, data)[0, 1]) == pytest.approx(expect[2].sum(), rel=1e-12)


# ------------------------------------------------------------------------------------------------ 4. IOV
IOV_DOSES = [(0.0, 100.0), (24.0, 50.0)]
IOV_TIMES = [1.0, 4.0, 12.0, 25.0, 30.0, 36.0]


def iov_frame():
    rows = []
    for i in (1, 2):
        for (td, amt), occ in zip(IOV_DOSES, (3, 7)):  # arbitrary sortable OCC labels
            rows.append(dict(ID=i, TIME=td, AMT=amt, DV=np.nan, EVID=1, MDV=1, OCC=occ))
            for t in IOV_TIMES:
                if (t < 24) == (td < 24):
                    rows.append(dict(ID=i, TIME=t, AMT=0.0, DV=2.0 + 0.1 * t, EVID=0, MDV=0, OCC=occ))
    return pd.DataFrame(rows)


def test_iov_dimensions_prior_and_occasion_parameters():
    model = Model(ClosedForm(1, oral=False), theta=dict(THETA), omega={"cl": 0.1, "v": 0.1},
                  sigma={"add": 0.5}, iov={"cl": 0.05})
    p, data = prepared(model, iov_frame())
    assert data.n_occ == 2
    assert data.q == model.n_iiv + 2 == 4
    # prior: blockdiag(Ω, Ω_iov, Ω_iov)
    full = block_diag(np.diag([0.1, 0.1]), [[0.05]], [[0.05]])
    np.testing.assert_allclose(model.prior_covariance(p, data.n_occ).numpy(), full, rtol=0, atol=0)
    eta = np.array([[0.1, -0.2, 0.3, -0.4], [-0.15, 0.05, -0.25, 0.35]])  # (η_cl, η_v, κ_cl,1, κ_cl,2)
    want = stats.multivariate_normal(np.zeros(4), full).logpdf(eta)
    np.testing.assert_allclose(model.log_prior(p, t64(eta), data.n_occ).numpy(), want, rtol=1e-12)
    # per-subject copies of the population parameters (as the covariance step uses them) give the same prior
    x = model.parameters.to_natural_vector(p)
    pp = model.parameters.from_natural_vector(x.expand(2, -1))
    np.testing.assert_allclose(model.log_prior(pp, t64(eta), data.n_occ).numpy(), want, rtol=1e-12)
    # draws of (η, κ_1, κ_2): covariance blockdiag(Ω, Ω_iov, Ω_iov), within 5 Monte Carlo standard errors
    n = 20_000
    draws = model.sample_eta(p, n, n_occ=data.n_occ, generator=torch.Generator().manual_seed(3)).numpy()
    assert draws.shape == (n, 4)
    se = np.sqrt((full ** 2 + np.outer(np.diag(full), np.diag(full))) / n)
    assert np.all(np.abs(draws.T @ draws / n - full) < 5 * se)
    # predictions: every observation uses CL of its own occasion (applied to the dose history up to it)
    f, _ = model.predict(p, t64(eta), data)
    got = by_subject(data, f)
    for n, i in enumerate((1, 2)):
        v = THETA["v"] * math.exp(eta[n, 1])
        for j, t in enumerate(IOV_TIMES):
            kappa = eta[n, 2] if t < 24 else eta[n, 3]
            cl = THETA["cl"] * math.exp(eta[n, 0] + kappa)
            want_c = bolus_conc([t], IOV_DOSES, cl, v)[0]
            assert got[i][j] == pytest.approx(want_c, rel=1e-10), (i, t)
    # changing κ of occasion 2 moves only occasion-2 predictions
    eta2 = eta.copy()
    eta2[:, 3] += 0.5
    f2, _ = model.predict(p, t64(eta2), data)
    occ2 = torch.as_tensor(data.panel.obs_time >= 24) & data.mask
    assert torch.equal(f2[~occ2 & data.mask], f[~occ2 & data.mask])
    assert bool((f2[occ2] < f[occ2]).all())  # larger CL, lower concentration


def test_iov_without_occ_column_is_an_error():
    model = Model(ClosedForm(1, oral=False), theta=dict(THETA), omega={"cl": 0.1, "v": 0.1},
                  sigma={"add": 0.5}, iov={"cl": 0.05})
    with pytest.raises(ModelSpecError, match="OCC"):
        model.prepare(bolus_frame())


# ------------------------------------------------------------------------------------------------ 5. covariates
def test_covariate_formula_creates_beta_and_is_log_linear():
    wt = {1: 50.0, 2: 91.0}
    df = bolus_frame()
    df["WT"] = df["ID"].map(wt)
    model = iv_model("additive", {"add": 0.4}, covariates={"cl": "log(WT/70)"})
    name = "beta_cl_log(WT/70)"
    assert name in model.parameters.theta
    assert model.parameters.theta[name].init == 0.0
    assert len(model.parameters.theta) == 3
    p, data = prepared(model, df)
    # β = 0 at the initial values: no effect
    ind0 = model.individual_parameters(p, torch.zeros(2, 2, dtype=torch.float64), data)
    np.testing.assert_allclose(ind0["cl"].numpy().ravel(), [THETA["cl"]] * 2, rtol=1e-15)
    beta = 0.75
    p.theta[name] = torch.tensor(beta, dtype=torch.float64)
    ind = model.individual_parameters(p, t64(ETA), data)
    want_cl = [THETA["cl"] * math.exp(beta * math.log(wt[i] / 70) + ETA[n, 0]) for n, i in enumerate((1, 2))]
    np.testing.assert_allclose(ind["cl"].numpy().ravel(), want_cl, rtol=1e-13)
    np.testing.assert_allclose(ind["v"].numpy().ravel(), THETA["v"] * np.exp(ETA[:, 1]), rtol=1e-13)
    # and the prediction uses it
    f, _ = model.predict(p, t64(ETA), data)
    got = by_subject(data, f)
    for n, i in enumerate((1, 2)):
        want = bolus_conc(TIMES[i], [(0.0, DOSE)], want_cl[n], THETA["v"] * math.exp(ETA[n, 1]))
        np.testing.assert_allclose(got[i], want, rtol=1e-12)


def test_time_varying_covariate_is_evaluated_per_observation():
    df = bolus_frame()
    df["WT"] = np.where((df["ID"] == 1) & (df["TIME"] >= 3), 80.0, 60.0)  # subject 1 gains weight at t = 3
    model = iv_model("additive", {"add": 0.4}, covariates={"cl": "WT/70 - 1"})
    name = "beta_cl_WT/70-1"
    assert name in model.parameters.theta
    p, data = prepared(model, df)
    assert data.per_obs
    p.theta[name] = torch.tensor(0.9, dtype=torch.float64)
    f, _ = model.predict(p, t64(ETA), data)
    got = by_subject(data, f)
    for n, i in enumerate((1, 2)):
        v = THETA["v"] * math.exp(ETA[n, 1])
        for j, t in enumerate(TIMES[i]):
            wt = 80.0 if (i == 1 and t >= 3) else 60.0
            cl = THETA["cl"] * math.exp(0.9 * (wt / 70 - 1) + ETA[n, 0])
            assert got[i][j] == pytest.approx(bolus_conc([t], [(0.0, DOSE)], cl, v)[0], rel=1e-12)


def test_covariate_formula_several_terms_and_intercept():
    model = iv_model("additive", {"add": 0.4}, covariates={"cl": "1 + log(WT/70) + SEX", "v": ["WT / 70"]})
    betas = [k for k in model.parameters.theta if k.startswith("beta_")]
    assert betas == ["beta_cl_log(WT/70)", "beta_cl_SEX", "beta_v_WT/70"]
    assert all(model.parameters.theta[b].init == 0.0 for b in betas)


@pytest.mark.parametrize("formula", ["__import__('os')", "WT.real", "'WT'", "log(WT, base=2)", "WT if 1 else 0",
                                     "[WT]", "lambda: WT", "exec('1')", "3", "log(WT"])
def test_covariate_formula_rejects_unsupported_syntax(formula):
    with pytest.raises(ModelSpecError):
        iv_model("additive", {"add": 0.4}, covariates={"cl": formula})


def test_covariate_formula_on_non_parameter_and_with_params_fn():
    with pytest.raises(ModelSpecError, match="ka"):
        iv_model("additive", {"add": 0.4}, covariates={"ka": "WT"})
    with pytest.raises(ModelSpecError, match="not both"):
        Model(ClosedForm(1, oral=False), {"tcl": 1.0, "tv": 1.0}, {"cl": 0.1}, {"add": 1.0},
              params=lambda th, eta, cov: {"cl": th["tcl"], "v": th["tv"]}, covariates={"cl": "WT"})


def test_covariate_formula_missing_column_fails_at_prepare():
    model = iv_model("additive", {"add": 0.4}, covariates={"cl": "log(HT/170)"})  # fine until data arrive
    df = bolus_frame()
    df["WT"] = 70.0
    with pytest.raises(ModelSpecError, match="HT"):
        model.prepare(df)


# ------------------------------------------------------------------------------------------------ 6. pheno_real
@pytest.mark.parametrize("which", ["first", "low_apgar"])
def test_pheno_real_prediction_is_bolus_superposition(which):
    df = nlmefit.datasets.load("pheno")
    model = pheno_real()
    p, data = prepared(model, df)
    th = {k: model.parameters.theta[k].init for k in ("tvcl", "tvv", "apgr_v")}
    if which == "first":
        sid = 1
    else:
        sid = df.loc[df["APGR"] < 5, "ID"].iloc[0]
    rec = df[df["ID"] == sid]
    assert rec["WGT"].nunique() == 1 and rec["APGR"].nunique() == 1
    wgt, apgr = float(rec["WGT"].iloc[0]), float(rec["APGR"].iloc[0])
    assert (apgr < 5) == (which == "low_apgar")
    cl = th["tvcl"] * wgt
    v = th["tvv"] * wgt * ((1 + th["apgr_v"]) if apgr < 5 else 1.0)
    doses = [(t, a) for t, a, e in zip(rec["TIME"], rec["AMT"], rec["EVID"]) if e == 1]
    obs_t = rec.loc[rec["EVID"] == 0, "TIME"].to_numpy()
    want = bolus_conc(obs_t, doses, cl, v)
    f, var = model.predict(p, torch.zeros(data.n_subjects, 2, dtype=torch.float64), data)
    n = list(data.panel.ids).index(sid)
    got = f[n][data.mask[n]].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-11)
    # proportional error: Var = σ²·f² with σ² = NONMEM's SIGMA 0.0130865
    np.testing.assert_allclose(var[n][data.mask[n]].numpy(), 0.0130865 * want ** 2, rtol=1e-11)


# ------------------------------------------------------------------------------------------------ 7. boundary errors
def test_missing_theta_and_unknown_theta():
    with pytest.raises(ModelSpecError, match="'v'"):
        Model(ClosedForm(1, oral=False), theta={"cl": 1.0}, omega={"cl": 0.1})
    with pytest.raises(ModelSpecError, match="'ka'"):
        Model(ClosedForm(1, oral=False), theta={"cl": 1.0, "v": 1.0, "ka": 1.0}, omega={"cl": 0.1})
    with pytest.raises(ModelSpecError, match="'q'"):  # an omega without a theta
        Model(ClosedForm(1, oral=False), theta={"cl": 1.0, "v": 1.0}, omega={"cl": 0.1, "q": 0.1})


@pytest.mark.parametrize("error,sigma", [("additive", {"prop": 0.1}), ("proportional", {"add": 0.1}),
                                         ("combined1", {"add": 0.1}), ("combined2", {"prop": 0.1}),
                                         ("exponential", {"add": 0.1, "prop": 0.1}), ("combined1", {"a": 1, "b": 1})])
def test_sigma_names_must_match_error_model(error, sigma):
    with pytest.raises(ModelSpecError, match="sigma"):
        iv_model(error, sigma)


def test_unknown_error_model():
    with pytest.raises(ModelSpecError, match="unknown error model"):
        iv_model("poisson", {"add": 1.0})


@pytest.mark.parametrize("bad", ["theta", "covariate", "eta"])
def test_params_function_reading_unknown_name_fails_at_prepare(bad):
    def params(th, eta, cov):
        cl = th["tcl"] * torch.exp(eta["cl"])
        if bad == "theta":
            cl = cl * th["tcl_typo"]
        elif bad == "covariate":
            cl = cl * cov["HEIGHT"]
        else:
            cl = cl * torch.exp(eta["v_typo"])
        return {"cl": cl, "v": th["tv"]}

    model = Model(ClosedForm(1, oral=False), {"tcl": 2.0, "tv": 20.0}, {"cl": 0.1}, {"add": 0.5}, params=params)
    name = {"theta": "tcl_typo", "covariate": "HEIGHT", "eta": "v_typo"}[bad]
    with pytest.raises(ModelSpecError, match=name):
        model.prepare(bolus_frame())


def test_params_function_must_define_every_structural_parameter():
    model = Model(ClosedForm(1, oral=False), {"tcl": 2.0}, {"cl": 0.1}, {"add": 0.5},
                  params=lambda th, eta, cov: {"cl": th["tcl"] * torch.exp(eta["cl"])})
    with pytest.raises(ModelSpecError, match="'v'"):
        model.prepare(bolus_frame())


def test_several_dvids_need_dvid_and_dvid_selects_rows():
    df = nlmefit.datasets.load("warfarin")
    model = library.get("1cmt_oral", theta={"cl": 0.15, "v": 8.0, "ka": 1.0})
    with pytest.raises(ModelSpecError, match="DVID"):
        model.prepare(df)
    data = library.get("1cmt_oral", theta={"cl": 0.15, "v": 8.0, "ka": 1.0}, dvid="cp").prepare(df)
    obs = df[(df["EVID"] == 0) & (df["MDV"] == 0)]
    cp = obs[obs["DVID"] == "cp"]
    assert 0 < len(cp) < len(obs)
    assert data.n_obs == len(cp)
    used = data.panel.obs_row[data.mask.numpy()]
    assert set(used.tolist()) == set(cp.index.tolist())
    assert set(df.loc[used, "DVID"]) == {"cp"}
    np.testing.assert_allclose(np.sort(data.y[data.mask].numpy()), np.sort(cp["DV"].to_numpy()))
    with pytest.raises(ModelSpecError, match="DVID"):
        library.get("1cmt_oral", dvid="pk").prepare(df)


@pytest.mark.parametrize("bad_dv", [0.0, -1.0])
def test_exponential_error_needs_positive_dv(bad_dv):
    dv = [4.5, 4.1, 3.2, 2.0, 0.9, 3.9, bad_dv, 1.0]  # subject 2, TIME 3
    df = bolus_frame(dv)
    with pytest.raises(DataError) as err:
        iv_model("exponential", {"add": 0.2}).prepare(df)
    msg = str(err.value)
    assert "ID 2" in msg and "TIME 3" in msg
    iv_model("additive", {"add": 0.2}).prepare(df)  # additive error takes it


def test_exponential_error_accepts_censored_zero_dv():
    dv = [4.5, 4.1, 3.2, 2.0, 0.9, 3.9, 0.0, 1.0]
    df = bolus_frame(dv, extra={"LLOQ": 0.5})  # DV 0 < LLOQ: censored, DV itself is not used
    data = iv_model("exponential", {"add": 0.2}).prepare(df)
    assert int((data.cens != 0).sum()) == 1


def modelled_duration_frame():
    rows = [dict(ID=1, TIME=0.0, AMT=100.0, RATE=-2, DV=np.nan, EVID=1, MDV=1)]
    rows += [dict(ID=1, TIME=t, AMT=0.0, RATE=0, DV=1.0, EVID=0, MDV=0) for t in (0.5, 1.0, 2.0, 3.0, 6.0)]
    return pd.DataFrame(rows)


def test_modelled_duration_needs_dur():
    df = modelled_duration_frame()
    with pytest.raises(ModelSpecError, match="dur"):
        iv_model("additive", {"add": 0.5}).prepare(df)
    # with dur (an optional PK parameter) the prediction is a zero-order infusion of duration dur
    dur = 1.5
    model = Model(ClosedForm(1, oral=False), theta={**THETA, "dur": dur}, omega={"cl": 0.1}, sigma={"add": 0.5})
    p, data = prepared(model, df)
    f, _ = model.predict(p, torch.zeros(1, 1, dtype=torch.float64), data)
    k, rate = THETA["cl"] / THETA["v"], 100.0 / dur
    t = np.array([0.5, 1.0, 2.0, 3.0, 6.0])
    end = rate / THETA["cl"] * (1 - np.exp(-k * dur))
    want = np.where(t <= dur, rate / THETA["cl"] * (1 - np.exp(-k * t)), end * np.exp(-k * (t - dur)))
    np.testing.assert_allclose(f[0].numpy(), want, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ 8. sampling
def test_sample_eta_covariance_matches_omega():
    model = block_model()
    p = model.initial_params()
    n = 20_000
    g = torch.Generator().manual_seed(123)
    eta = model.sample_eta(p, n, generator=g).numpy()
    assert eta.shape == (n, 3)
    om = p.omega.numpy()
    s = eta.T @ eta / n  # mean is known to be 0
    # Var of the (known-mean) sample covariance s_ij of Gaussian data: (Ω_ij² + Ω_ii·Ω_jj)/n
    se = np.sqrt((om ** 2 + np.outer(np.diag(om), np.diag(om))) / n)
    assert np.all(np.abs(s - om) < 5 * se), (s, om, se)
    assert np.all(np.abs(eta.mean(0)) < 5 * np.sqrt(np.diag(om) / n))
    # leading sample dimensions and IOV blocks
    g = torch.Generator().manual_seed(1)
    assert model.sample_eta(p, 7, generator=g, size=(3, 2)).shape == (3, 2, 7, 3)


@pytest.mark.parametrize("omega", [Omega({"cl": 0.1, "v": 0.0}, fixed=["v"]),
                                   Omega({"cl": 0.1, "v": 0.2, "ka": 0.0}, blocks=[("cl", "v")],
                                         cov={("cl", "v"): 0.05}, fixed=["ka"]),
                                   Omega({"ka": 0.0, "cl": 0.1, "v": 0.2}, blocks=[("cl", "v")],
                                         cov={("cl", "v"): 0.05}, fixed=["ka"])])
def test_sample_eta_zero_variance_gives_exact_zeros(omega):
    model = library.get("1cmt_oral", omega=omega)
    p = model.initial_params()
    eta = model.sample_eta(p, 2000, generator=torch.Generator().manual_seed(5))
    k = model.eta_names.index("ka" if "ka" in omega.names else "v")
    assert torch.count_nonzero(eta[:, k]) == 0
    others = [j for j in range(eta.shape[1]) if j != k]
    assert bool((eta[:, others] != 0).all())


@pytest.mark.parametrize("error", ["additive", "proportional", "exponential"])
def test_sample_y_without_residual_is_the_prediction(error):
    df = bolus_frame()
    model = iv_model(error, SIGMAS[error])
    p, data = prepared(model, df)
    y = model.sample_y(p, t64(ETA), data, residual=False)
    got = by_subject(data, y)
    conc = hand_conc()
    for i in TIMES:
        np.testing.assert_allclose(got[i], conc[i], rtol=1e-12)
    # with residual error: draws are random but centred where they should be
    g = torch.Generator().manual_seed(0)
    ys = model.sample_y(p, t64(ETA).expand(4000, 2, 2), data, generator=g)
    assert ys.shape[0] == 4000
    mean_scale = torch.log(ys).mean(0) if error == "exponential" else ys.mean(0)
    target = torch.log(y) if error == "exponential" else y
    _, var = model.predict(p, t64(ETA), data)
    z = (mean_scale - target) / torch.sqrt(var / 4000)
    assert bool((z.abs()[data.mask] < 5).all())


# ------------------------------------------------------------------------------------------------ 9. estimators exact
def linear_gaussian(theta=3.0, omega2=0.5, sd=0.7, error="additive"):
    st = FunctionStructure(lambda t, p: p["a"] + torch.zeros_like(t), "linear", ("a",))
    return Model(st, theta={"a": Param(theta)}, omega=Omega({"a": omega2}), sigma={"add": sd}, error=error,
                 params=lambda th, eta, cov: {"a": th["a"] + eta["a"]})


def linear_frame():
    rng = np.random.default_rng(11)
    rows = []
    for i, nobs in enumerate([4, 1, 6, 3, 5, 2, 4], start=1):
        b = rng.normal(scale=1.0)
        for j in range(nobs):
            rows.append(dict(ID=i, TIME=float(j), DV=2.5 + b + rng.normal(scale=0.9)))
    return pd.DataFrame(rows)


def exact_m2ll(df, theta, omega2, sd):
    total = 0.0
    for _, g in df.groupby("ID"):
        y = g["DV"].to_numpy()
        n = len(y)
        total += stats.multivariate_normal(np.full(n, theta), omega2 * np.ones((n, n)) + sd ** 2 * np.eye(n)).logpdf(y)
    return -2 * total


@pytest.mark.parametrize("method", ["fo", "foce", "focei", "laplace"])
def test_linear_gaussian_objectives_are_exact(method):
    df = linear_frame()
    model = linear_gaussian()
    res = nlmefit.fit(model, df, method=method, maxiter=0, covariance=None)
    assert -2 * res.loglik == pytest.approx(exact_m2ll(df, 3.0, 0.5, 0.7), abs=1e-8)
    # OFV drops n·log 2π (n = observations)
    assert res.ofv == pytest.approx(-2 * res.loglik - len(df) * math.log(2 * math.pi), abs=1e-8)


def test_linear_gaussian_fit_reaches_the_exact_mle():
    from scipy.optimize import minimize

    df = linear_frame()
    res = nlmefit.fit(linear_gaussian(), df, method="focei", covariance=None)
    opt = minimize(lambda x: exact_m2ll(df, x[0], math.exp(x[1]), math.exp(x[2])), [3.0, math.log(0.5), math.log(0.7)],
                   method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000))
    assert opt.x[1] > math.log(0.1)  # an interior maximum (ω² = 0 would sit on the boundary)
    assert res.converged
    assert -2 * res.loglik == pytest.approx(opt.fun, abs=1e-7)
    assert res.estimates["a"] == pytest.approx(opt.x[0], rel=1e-5)
    assert res.estimates["omega_a"] == pytest.approx(math.exp(opt.x[1]), rel=1e-4)
    assert res.estimates["sigma_add"] == pytest.approx(math.exp(opt.x[2]), rel=1e-5)
