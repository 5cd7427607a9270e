"""A linear-Gaussian mixed model (y_ij = a_i + b_i·t_ij + ε, (a_i, b_i) ~ N((θa, θb), Ω)) with its exact marginal
likelihood: the outside truth for quadrature, importance sampling and the MCMC kernels."""
import numpy as np
import pandas as pd
from scipy.stats import multivariate_normal

from nlmefit import Model, Omega
from nlmefit.models.structure import FunctionStructure

THETA = {"ta": 10.0, "tb": -3.0}
OMEGA = np.array([[1.0, 0.3], [0.3, 0.5]])
SIGMA = 0.7


def _line(t, p):
    return p["a"] + p["b"] * t


def model(block: bool = True) -> Model:
    om = Omega({"a": OMEGA[0, 0], "b": OMEGA[1, 1]}, blocks=[("a", "b")] if block else (),
               cov={("a", "b"): OMEGA[0, 1]} if block else {})
    return Model(FunctionStructure(_line, "line", ("a", "b")), dict(THETA), om, {"add": SIGMA}, error="additive",
                 params=lambda th, eta, cov: {"a": th["ta"] + eta["a"], "b": th["tb"] + eta["b"]}, name="line")


def data(n: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(1, n + 1):
        a, b = rng.multivariate_normal([THETA["ta"], THETA["tb"]], OMEGA)
        for t in np.sort(rng.uniform(0, 3, size=rng.integers(2, 6))):
            rows.append({"ID": i, "TIME": round(float(t), 4), "DV": a + b * t + SIGMA * rng.normal()})
    return pd.DataFrame(rows)


def exact_loglik(df: pd.DataFrame, omega: np.ndarray = OMEGA) -> np.ndarray:
    """log p(y_i) per subject: y_i ~ N(X θ, X Ω Xᵀ + σ² I)."""
    out = []
    for _, g in df.groupby("ID", sort=True):
        X = np.column_stack([np.ones(len(g)), g["TIME"].to_numpy()])
        mean = X @ np.array([THETA["ta"], THETA["tb"]])
        cov = X @ omega @ X.T + SIGMA ** 2 * np.eye(len(g))
        out.append(multivariate_normal(mean, cov).logpdf(g["DV"].to_numpy()))
    return np.array(out)


def posterior(df: pd.DataFrame, omega: np.ndarray = OMEGA) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean [N, 2] and covariance [N, 2, 2] of η_i = (a_i − θa, b_i − θb)."""
    means, covs = [], []
    P0 = np.linalg.inv(omega)
    for _, g in df.groupby("ID", sort=True):
        X = np.column_stack([np.ones(len(g)), g["TIME"].to_numpy()])
        r = g["DV"].to_numpy() - X @ np.array([THETA["ta"], THETA["tb"]])
        C = np.linalg.inv(P0 + X.T @ X / SIGMA ** 2)
        means.append(C @ X.T @ r / SIGMA ** 2)
        covs.append(C)
    return np.array(means), np.array(covs)
