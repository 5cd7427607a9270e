"""The Laplace posterior q_i = N(η̂_i, H_i⁻¹) at the conditional modes, as a posterior family object."""
from __future__ import annotations

import torch

from nlmefit.errors import EstimationError
from nlmefit.marginal.approximations import conditional_objective, laplace_pieces
from nlmefit.marginal.autodiff import grad_sep, hessian_sep
from nlmefit.marginal.modes import find_modes
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel, Linearisable
from nlmefit.posteriors import GaussianPosterior, StudentTPosterior

__all__ = ["laplace_posterior"]


def laplace_posterior(model: LatentModel, p: Params, data: ObservationData, eta0: torch.Tensor | None = None,
                      df: float | None = None, inflate: float = 1.0) -> GaussianPosterior | StudentTPosterior:
    """N(η̂_i, H_i⁻¹) (or multivariate t with ``df``) at the modes of −log p(y_i, η | θ) with its exact Hessian,
    scale multiplied by ``inflate``. Subjects whose exact Hessian is not positive definite fall back to the
    first-order (FOCE-I) one where the model is :class:`~nlmefit.models.protocol.Linearisable`."""
    p = p.detach()
    if eta0 is None:
        eta0 = torch.zeros(data.n_subjects, data.q, dtype=data.y.dtype, device=data.y.device)
    lfun = conditional_objective(model, p, data, "laplace")
    eta_hat = find_modes(lfun, eta0, tol=1e-9).eta
    e = eta_hat.clone().requires_grad_(True)
    with torch.enable_grad():
        H = hessian_sep(grad_sep(lfun(e), e, create_graph=True), e).detach()
    H = 0.5 * (H + H.transpose(-1, -2))
    L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()) and isinstance(model, Linearisable):
        with torch.enable_grad():
            _, _, H_gn = laplace_pieces(model, p, data, eta_hat, "laplace_gn")
        H = torch.where((info != 0)[:, None, None], H_gn.detach(), H)
        L, info = torch.linalg.cholesky_ex(H)
    if bool((info != 0).any()):
        i = int(torch.nonzero(info)[0])
        raise EstimationError(f"ID {data.ids[i]}: the curvature at the conditional mode is not positive "
                              f"definite; no Laplace posterior can be built")
    # covariance H⁻¹ = L⁻ᵀ L⁻¹ and its Cholesky factor
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    cov = torch.cholesky_inverse(L)
    C = torch.linalg.cholesky(0.5 * (cov + cov.transpose(-1, -2)) * inflate ** 2 + 1e-300 * eye)
    if df is None:
        return GaussianPosterior(eta_hat, C, kind="laplace")
    return StudentTPosterior(df, eta_hat, C, kind="t")
