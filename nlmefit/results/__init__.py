"""Fit results: FitResult, covariance step, residual tables."""
from nlmefit.results.fit_result import FitResult

__all__ = ["FitResult"]
