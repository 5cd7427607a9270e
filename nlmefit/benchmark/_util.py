"""Timing and memory helpers shared by the benchmark scripts."""
from __future__ import annotations

import platform
import resource
import time
from contextlib import contextmanager

import numpy as np
import torch

import nlmefit

__all__ = ["timer", "peak_rss_mb", "machine", "population"]


@contextmanager
def timer():
    out = {}
    t0 = time.perf_counter()
    yield out
    out["s"] = time.perf_counter() - t0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def population(n_subjects: int, n_obs: int = 10, seed: int = 0):
    """A simulated 1-cmt oral population (single 100 mg dose, n_obs samples over 24 h) and its true values."""
    truth = {"cl": 2.0, "v": 30.0, "ka": 1.2, "omega_cl": 0.09, "omega_v": 0.04, "omega_ka": 0.16, "sigma_add": 0.2}
    model = nlmefit.library.get("1cmt_oral", error="additive", theta={"cl": 2.0, "v": 30.0, "ka": 1.2},
                                omega={"cl": 0.09, "v": 0.04, "ka": 0.16}, sigma={"add": 0.2})
    times = np.geomspace(0.25, 24, n_obs)
    sim = nlmefit.simulate(model, truth, times=times, doses=[{"TIME": 0.0, "AMT": 100.0, "CMT": 1}],
                           n_subjects=n_subjects, seed=seed)
    return model, sim.drop(columns="REP"), truth
