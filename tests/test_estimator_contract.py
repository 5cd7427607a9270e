"""The estimator contract, run over EVERY entry of the registry: a registered estimator fits a small dataset
through the LatentModel interface, returns a FitResult whose posterior is a Distribution over the subjects,
round-trips through JSON, is reproducible with a seed, takes ``device=``, and exposes its linearisation.
A new estimator is covered by registering it; give it small settings in FAST if its defaults are slow."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Distribution

import nlmefit
from nlmefit.estimators import REGISTRY, Estimator, get_estimator, register
from nlmefit.marginal.linearisation import Linearisation
from nlmefit.results import FitResult

# settings that keep each method to a few seconds on theophylline (12 subjects, q = 3)
FAST = {
    "agq": dict(n_nodes=2),
    "saem": dict(n_explore=30, n_smooth=30, n_samples=200),
    "nuts": dict(num_chains=1, num_samples=40, warmup_steps=40, max_tree_depth=4),
    "vem": dict(max_steps=100, n_elbo=100, n_is=500),
}


@pytest.fixture(scope="module")
def theo():
    return nlmefit.datasets.load("theophylline")


@pytest.fixture(scope="module")
def model():
    return nlmefit.library.get("1cmt_oral", error="additive", theta={"cl": 2.8, "v": 32.0, "ka": 1.5})


def _fit(method, model, theo, seed=1):
    return nlmefit.fit(model, theo, method=method, seed=seed, device="cpu", **FAST.get(method, {}))


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_registered_estimator_meets_the_contract(method, model, theo, tmp_path):
    est = get_estimator(method, **FAST.get(method, {}))
    assert isinstance(est, Estimator) and est.name == method
    assert isinstance(est.linearisation, Linearisation)
    before = theo.copy()
    res = _fit(method, model, theo)
    pd.testing.assert_frame_equal(theo, before)  # the user's DataFrame is never modified
    assert isinstance(res, FitResult) and res.method == method
    assert np.isfinite(res.ofv) and res.n_subjects == 12 and res.n_obs == 132
    assert set(model.parameters.natural_names) <= set(res.estimates.index)
    assert isinstance(res.posterior, Distribution)
    assert tuple(res.posterior.batch_shape) == (12,) and tuple(res.posterior.event_shape) == (3,)
    assert res.individual_estimates.shape[0] == 12
    # immutable in use
    with pytest.raises(AttributeError):
        res.ofv = 0.0
    # JSON round trip
    res.to_json(tmp_path / "result.json")
    back = FitResult.from_json(tmp_path / "result.json", model=model)
    pd.testing.assert_series_equal(back.estimates, res.estimates)
    assert back.ofv == res.ofv and back.likelihoods == res.likelihoods and back.method == method
    if res.traces is not None:
        pd.testing.assert_frame_equal(back.traces, res.traces, check_dtype=False)
    # seeded reproducibility
    again = _fit(method, model, theo)
    pd.testing.assert_series_equal(again.estimates, res.estimates)
    assert again.ofv == res.ofv


def test_registry_accepts_only_estimators():
    with pytest.raises(TypeError, match="Estimator subclass"):
        register("not-an-estimator")(object)


def test_an_estimator_must_implement_the_whole_contract():
    class Half(Estimator):  # no linearisation
        def fit(self, model, data, init=None, seed=None):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Half()


@pytest.mark.parametrize("method", ["focei", "laplace", "saem"])
def test_device_argument_reaches_the_data(method, model, theo):
    res = _fit(method, model, theo)
    assert res.data.y.device == torch.device("cpu")
    with pytest.raises((nlmefit.ModelSpecError, RuntimeError, ValueError)):
        nlmefit.fit(model, theo, method=method, device="no-such-device", **FAST.get(method, {}))
