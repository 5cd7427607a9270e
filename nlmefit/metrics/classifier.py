"""Classifier two-sample test (C2ST, Lopez-Paz & Oquab 2017): held-out accuracy of a classifier of x vs y.

The classifier is an L2-penalised logistic regression on quadratic features, fitted by L-BFGS in torch
(float64, full batch). Its decision boundary is a quadric, so it sees differences in location, scale and
correlation between the time points. 0.5 = indistinguishable, 1 = perfectly separable.
"""
from __future__ import annotations

import numpy as np
import torch

from nlmefit.errors import DataError
from nlmefit.metrics._inputs import as_sample

__all__ = ["c2st", "quadratic_features", "MAX_QUADRATIC_DIM"]

#: above this dimension the pairwise products are left out (their number grows as d²/2)
MAX_QUADRATIC_DIM = 40


def _standardize(a: np.ndarray) -> np.ndarray:
    sd = a.std(0)
    return (a - a.mean(0)) / np.where(sd > 1e-12, sd, 1.0)


def quadratic_features(z: np.ndarray) -> np.ndarray:
    """[z, z², z_j z_k (j < k)] per row; the products only when d ≤ ``MAX_QUADRATIC_DIM``."""
    d = z.shape[1]
    parts = [z, z ** 2]
    if 1 < d <= MAX_QUADRATIC_DIM:
        j, k = np.triu_indices(d, 1)
        parts.append(z[:, j] * z[:, k])
    return np.concatenate(parts, axis=1)


def c2st(x, y, seed: int = 0, n_folds: int = 5, *, l2: float = 1e-2, max_iter: int = 200) -> float:
    """Cross-validated accuracy of a classifier telling x [m, d] from y [n, d] (0.5 = indistinguishable).

    * balance: the larger sample is subsampled (without replacement, seeded) to the size of the smaller, so
      chance accuracy is exactly 1/2;
    * features: the pooled sample is standardised per column, mapped by :func:`quadratic_features`, and each
      feature standardised again (pooled, label-free, so no label information leaks into the folds);
    * classifier: logistic regression, loss = mean binary cross-entropy over the training fold
      + ``l2``/2 ‖w‖² (bias unpenalised), L-BFGS (strong-Wolfe line search, ≤ ``max_iter`` iterations); the
      ``n_folds`` fits are independent and run as one batched problem;
    * folds: stratified (each fold holds the same number of each class, assigned at random, seeded); every point
      is predicted once, by the fit that did not see it, and the accuracy is the fraction predicted right.

    Under H0 (same distribution) the accuracy is ≈ Binomial(2k, 1/2)/(2k), k = min(m, n): SD ≈ 1/(2√(2k)).
    """
    x = as_sample(x, "x")
    y = as_sample(y, "y", d=x.shape[1])
    n_folds = int(n_folds)
    k = min(x.shape[0], y.shape[0])
    if n_folds < 2:
        raise DataError(f"n_folds: expected at least 2, got {n_folds}")
    if k < n_folds:
        raise DataError(f"x, y: {n_folds}-fold C2ST needs at least {n_folds} rows in each sample, got "
                        f"{x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    x = x[np.sort(rng.choice(x.shape[0], k, replace=False))] if x.shape[0] > k else x
    y = y[np.sort(rng.choice(y.shape[0], k, replace=False))] if y.shape[0] > k else y
    feats = _standardize(quadratic_features(_standardize(np.concatenate([x, y]))))
    labels = np.concatenate([np.ones(k), np.zeros(k)])
    fold = np.concatenate([rng.permutation(k) % n_folds, rng.permutation(k) % n_folds])

    f = torch.as_tensor(feats, dtype=torch.float64)
    t = torch.as_tensor(labels, dtype=torch.float64)[:, None].expand(-1, n_folds)
    fold_t = torch.as_tensor(fold)
    train = (fold_t[:, None] != torch.arange(n_folds)[None, :]).to(torch.float64)   # [2k, K]
    n_train = train.sum(0)
    w = torch.zeros(f.shape[1], n_folds, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_folds, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(max_iter), tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = f @ w + b
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
        loss = ((bce * train).sum(0) / n_train).sum() + 0.5 * l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        held_out = (f @ w + b)[torch.arange(2 * k), fold_t]
        accuracy = ((held_out > 0).to(torch.float64) == t[:, 0]).to(torch.float64).mean()
    return float(accuracy)
