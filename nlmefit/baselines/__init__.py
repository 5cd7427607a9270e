"""Deep generative baselines on the panel view (see docs/baselines.md)."""
from nlmefit.baselines.base import LIKELIHOOD_KINDS, Baseline
from nlmefit.baselines.design import PanelView, Standardizer
from nlmefit.baselines.trainer import Phase, Trainer, TrainHistory

__all__ = ["Baseline", "LIKELIHOOD_KINDS", "PanelView", "Standardizer", "Phase", "Trainer", "TrainHistory"]
