"""Metrics comparing a generative model's samples [m, d] with held-out subjects [n, d] on a common design.

* :mod:`~nlmefit.metrics.distances`: ``energy_distance``, ``mmd`` (``median_heuristic``), ``sliced_wasserstein``;
* :mod:`~nlmefit.metrics.classifier`: ``c2st``, the classifier two-sample test accuracy;
* :mod:`~nlmefit.metrics.coverage`: ``quantile_coverage`` (VPC-style) and ``coverage_error``;
* :mod:`~nlmefit.metrics.report`: ``compare``, all of them in one tidy table, per-time-point standardised.
"""
from __future__ import annotations

from nlmefit.metrics.classifier import c2st
from nlmefit.metrics.coverage import coverage_error, quantile_coverage
from nlmefit.metrics.distances import energy_distance, median_heuristic, mmd, sliced_wasserstein
from nlmefit.metrics.report import METRICS, compare

__all__ = ["energy_distance", "mmd", "median_heuristic", "sliced_wasserstein", "c2st", "quantile_coverage",
           "coverage_error", "compare", "METRICS"]
