"""Simulation from a model: replicates of a dataset or of a design."""
from nlmefit.simulation.simulate import design_frame, resolve_params, simulate

__all__ = ["simulate", "design_frame", "resolve_params"]
