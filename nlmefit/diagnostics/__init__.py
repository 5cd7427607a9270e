"""Diagnostics of a fit: goodness-of-fit panels, individual fits, η plots, NPDE and (pc)VPC.

Every plotting function returns a matplotlib Figure (or draws on ``ax=``) and never calls ``plt.show()``.
The same functions are methods of :class:`~nlmefit.FitResult` (``fit.plot_gof()``, ``fit.vpc()`` …).
"""
from nlmefit.diagnostics._grid import grid_predictions, predict_on_grid
from nlmefit.diagnostics.decomposition import Decomposition, ExactPosterior, decomposition, exact_posterior
from nlmefit.diagnostics.decomposition_plots import plot_aggregate_posterior, plot_one_step, plot_q_kl
from nlmefit.diagnostics.eta import eta_table, plot_eta_covariates, plot_eta_distributions
from nlmefit.diagnostics.gof import lowess, plot_gof
from nlmefit.diagnostics.individual import plot_individuals
from nlmefit.diagnostics.npde import NpdeResult, npde, npde_tests, plot_npde
from nlmefit.diagnostics.one_step import OneStepAhead, one_step_ahead
from nlmefit.diagnostics.replicates import simulate_replicates
from nlmefit.diagnostics.vpc import VpcResult, plot_vpc, vpc, vpc_bins

__all__ = [
    "plot_gof", "plot_individuals", "plot_eta_distributions", "plot_eta_covariates", "eta_table",
    "grid_predictions", "predict_on_grid", "lowess", "npde", "npde_tests", "plot_npde", "NpdeResult", "vpc",
    "vpc_bins", "plot_vpc", "VpcResult", "simulate_replicates", "decomposition", "Decomposition",
    "exact_posterior", "ExactPosterior", "one_step_ahead", "OneStepAhead", "plot_q_kl", "plot_aggregate_posterior",
    "plot_one_step",
]
