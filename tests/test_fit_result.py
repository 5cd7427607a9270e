"""FitResult as data: immutable in use, statsmodels-style conf_int(alpha=), HTML for notebooks, schema-versioned
JSON (version-1 files still read), and tensor/nn.Module weights in the parameter container."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

import nlmefit
from nlmefit.models import Omega, Param, ParameterSet
from nlmefit.results import FitResult


@pytest.fixture(scope="module")
def theo_fit():
    df = nlmefit.datasets.load("theophylline")
    return nlmefit.fit(nlmefit.library.get("1cmt_oral"), df, method="focei")


def test_conf_int_takes_alpha(theo_fit):
    ci = theo_fit.conf_int(alpha=0.1)
    se = theo_fit.se
    np.testing.assert_allclose(ci["ci_high"] - theo_fit.estimates, norm.ppf(0.95) * se)
    np.testing.assert_allclose(theo_fit.conf_int()["ci_low"], theo_fit.estimates - norm.ppf(0.975) * se)
    with pytest.raises(ValueError, match="alpha"):
        theo_fit.conf_int(alpha=1.5)


def test_immutable_and_operations_return_new_results(theo_fit):
    with pytest.raises(AttributeError):
        theo_fit.ofv = 1.0
    ll = nlmefit.loglik(theo_fit, "agq", n_nodes=3)
    assert "agq" not in theo_fit.likelihoods
    new = theo_fit.with_likelihood(ll)
    assert new.likelihoods["agq"]["ofv"] == pytest.approx(ll.ofv) and new.ofv == theo_fit.ofv
    assert theo_fit.replace(messages=["x"]).messages == ["x"] and theo_fit.messages != ["x"]


def test_html_display(theo_fit):
    html = theo_fit._repr_html_()
    assert "<table" in html and "FOCEI" in html and f"{theo_fit.ofv:.4f}" in html and "omega_cl" in html


def test_schema_version_and_version_1_files(theo_fit, tmp_path):
    path = tmp_path / "result.json"
    theo_fit.to_json(path)
    d = json.loads(path.read_text())
    assert d["schema_version"] == 2
    # a version-1 file kept likelihoods, traces and the CLI record in "extra"
    v1 = {k: v for k, v in d.items() if k not in ("schema_version", "likelihoods", "traces", "phases",
                                                   "acceptance", "mcmc", "weights", "source")}
    v1["extra"] = {"likelihoods": {"is": {"ofv": 118.1}}, "cli": {"data": "theophylline", "model": "1cmt_oral"},
                   "traces": {"columns": ["iteration", "cl"], "data": [[1, 2.0], [2, 2.5]]}, "n_explore": 1}
    back = FitResult.from_dict(v1)
    assert back.likelihoods["is"]["ofv"] == 118.1 and back.source["model"] == "1cmt_oral"
    assert list(back.traces["cl"]) == [2.0, 2.5] and back.phases == {"explore": 1}
    with pytest.raises(ValueError, match="schema version 99"):
        FitResult.from_dict({**d, "schema_version": 99})


def test_module_weights_live_in_the_parameter_set():
    net = torch.nn.Linear(2, 3)
    pset = ParameterSet({"a": Param(1.0, lower=0.0)}, Omega({"z": 1.0}, fixed=True), {"eps": Param(0.5, lower=0.0)},
                        weights={"dec": net, "W": torch.ones(2, 2)})
    assert set(pset.weights) == {"dec.weight", "dec.bias", "W"}
    assert pset.n_weights == 3 * 2 + 3 + 4 and pset.n_free == 2 + pset.n_weights
    assert "dec.weight[2,1]" in pset.natural_names
    p = pset.initial()
    u = pset.to_unconstrained(p)
    back = pset.from_unconstrained(u)
    torch.testing.assert_close(back.weights["dec.weight"], net.weight.detach().to(torch.float64))
    torch.testing.assert_close(back.theta["a"], p.theta["a"])
    again = pset.params_from_dict(pset.natural_dict(p))
    torch.testing.assert_close(again.weights["W"], p.weights["W"])
    # per-subject copies of the natural vector give per-subject weights
    X = pset.to_natural_vector(p).expand(5, -1)
    assert pset.from_natural_vector(X).weights["dec.bias"].shape == (5, 3)
    with pytest.raises(nlmefit.ModelSpecError, match="weights"):
        ParameterSet({}, Omega({"z": 1.0}), {}, weights={"bad": "text"})
