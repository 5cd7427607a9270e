"""Deep generative baselines on the panel view (see docs/baselines.md).

Every baseline has ``fit(train) -> self``, ``sample(n)``, ``log_prob(view)`` and a likelihood ``kind``
(exact | bound | estimate | none); PPCA and the VAE are NLME models fitted by the NLME estimators, the others train
through the one :class:`Trainer`.
"""
from nlmefit.baselines.base import LIKELIHOOD_KINDS, Baseline
from nlmefit.baselines.ddpm import DDPM
from nlmefit.baselines.design import PanelView, Standardizer
from nlmefit.baselines.ebm import EBM
from nlmefit.baselines.flow_matching import FlowMatching
from nlmefit.baselines.gan import WGANGP
from nlmefit.baselines.nf import NormalizingFlow
from nlmefit.baselines.ppca import PPCA
from nlmefit.baselines.trainer import Phase, Trainer, TrainHistory, holdout
from nlmefit.baselines.vae import VAE

__all__ = ["Baseline", "LIKELIHOOD_KINDS", "PanelView", "Standardizer", "Phase", "Trainer", "TrainHistory", "holdout",
           "PPCA", "VAE", "DDPM", "EBM", "WGANGP", "NormalizingFlow", "FlowMatching"]
