"""Benchmarks: scripts that print figures (never assertions on wall time).

``python -m nlmefit.benchmark.classical`` — FO/FOCE-I fit times, objective evaluations per second, memory.
``python -m nlmefit.benchmark.data`` — Panel build and batched prediction throughput.
``python -m nlmefit.benchmark.small`` — theophylline and pheno FOCE-I fits with covariance step, after warm-up.
``python -m nlmefit.benchmark.em`` — SAEM fit time per iteration and importance-sampling −2LL time.
"""
