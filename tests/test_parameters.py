"""ParameterSet: every map between natural, unconstrained and natural-vector forms round-trips."""

import pytest
import torch

from nlmefit.errors import ModelSpecError
from nlmefit.models.parameters import Omega, Param, ParameterSet, fix


def _pset():
    return ParameterSet(
        {"cl": Param(2.0, lower=0), "v": Param(30.0, lower=0, upper=100), "beta": Param(0.7),
         "fx": fix(3.0), "neg": Param(-1.0, upper=0)},
        Omega({"cl": 0.1, "v": 0.2, "ka": 0.3}, blocks=[("cl", "v")], cov={("cl", "v"): 0.05}),
        {"add": 0.5, "prop": fix(0.1)},
        Omega({"cl": 0.02}),
    )


def test_unconstrained_round_trip():
    ps = _pset()
    p = ps.initial()
    u = ps.to_unconstrained(p)
    assert u.numel() == ps.n_free
    q = ps.from_unconstrained(u)
    for k in p.theta:
        assert float(q.theta[k]) == pytest.approx(float(p.theta[k]), rel=1e-12)
    torch.testing.assert_close(q.omega, p.omega)
    torch.testing.assert_close(q.omega_iov, p.omega_iov)
    assert float(q.sigma["add"]) == pytest.approx(0.5)


def test_natural_vector_round_trip_and_batch():
    ps = _pset()
    p = ps.initial()
    x = ps.to_natural_vector(p)
    assert ps.natural_names == ["cl", "v", "beta", "neg", "omega_cl", "omega_cl_v", "omega_v", "omega_ka",
                                "omega_iov_cl", "sigma_add"]
    q = ps.from_natural_vector(x)
    torch.testing.assert_close(q.omega, p.omega)
    xb = x.expand(4, -1)
    qb = ps.from_natural_vector(xb)
    assert qb.omega.shape == (4, 3, 3) and qb.theta["cl"].shape == (4,)
    torch.testing.assert_close(qb.omega[2], p.omega)


def test_fixed_excluded_and_reported():
    ps = _pset()
    assert ps.fixed_names() == {"fx", "sigma_prop"}
    d = ps.natural_dict(ps.initial())
    assert d["omega_cl_v"] == pytest.approx(0.05) and d["sigma_prop"] == pytest.approx(0.1)
    p = ps.params_from_dict({"cl": 5.0, "omega_v": 0.4})
    assert float(p.theta["cl"]) == 5.0 and float(p.omega[1, 1]) == 0.4


@pytest.mark.parametrize("bad", [
    lambda: Param(1.0, lower=2.0),
    lambda: ParameterSet({"a": Param(float("nan"))}, Omega({}), {}),
    lambda: Omega({"cl": -0.1}),
    lambda: Omega({"cl": 0.1, "v": 0.1}, blocks=[("cl", "v")], cov={("cl", "v"): 0.5}),
    lambda: Omega({"cl": 0.1}, blocks=[("cl", "zz")]),
])
def test_bad_specifications_raise(bad):
    with pytest.raises(ModelSpecError):
        p = bad()
        if isinstance(p, Param):
            p.check("x")
