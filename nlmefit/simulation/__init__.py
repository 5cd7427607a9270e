"""Simulation from a model: replicates of a dataset or of a design; regimens, counterfactuals, exposures, PTA."""
from nlmefit.simulation.counterfactual import RegimenSimulation, simulate_regimens
from nlmefit.simulation.exposure import pta
from nlmefit.simulation.plots import plot_exposure_distributions, plot_profile_bands, plot_pta
from nlmefit.simulation.regimen import Regimen
from nlmefit.simulation.simulate import design_frame, resolve_params, simulate
from nlmefit.simulation.stream import StreamedSimulation

__all__ = ["simulate", "design_frame", "resolve_params", "Regimen", "simulate_regimens", "RegimenSimulation",
           "pta", "plot_profile_bands", "plot_exposure_distributions", "plot_pta", "StreamedSimulation"]
