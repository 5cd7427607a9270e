"""Variational EM helpers: the learning-rate schedule, the smoothed-ELBO convergence rule and checkpoints.

Kept apart from :mod:`nlmefit.estimators.vem` so that the estimator module stays about the algorithm. Every
checkpoint holds tensors, numbers, strings and state dicts only (``torch.save``), and is read back with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlmefit.errors import ModelSpecError

__all__ = ["SCHEDULES", "lr_factor", "SmoothedElbo", "save_checkpoint", "load_checkpoint"]

SCHEDULES = ("cosine", "step", "constant")


def lr_factor(schedule: str, k: int, max_steps: int, final: float) -> float:
    """The multiplier of the base learning rates at step ``k`` (1-based) of ``max_steps``.

    ``cosine``: final + (1 − final)·½(1 + cos(π (k − 1)/(max_steps − 1))), from 1 down to ``final``;
    ``step``: 1, then ×½ after each further quarter of ``max_steps`` (never below ``final``);
    ``constant``: 1."""
    if schedule == "constant" or max_steps <= 1:
        return 1.0
    frac = (k - 1) / (max_steps - 1)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return max(final, 0.5 ** math.floor(4 * min(frac, 0.999999)))


@dataclass
class SmoothedElbo:
    """The exponentially smoothed ELBO, s_k = β s_{k−1} + (1 − β) ELBO_k, bias-corrected as s_k / (1 − β^k),
    and the convergence rule: after ``min_steps`` steps (and at least 2W of them, W = ``window``), converged when
    the means of s̄ over the last two windows of W steps, a = mean(s̄_{k−W+1..k}) and b = mean(s̄_{k−2W+1..k−W}),
    satisfy |a − b| < tol · (1 + |a|). Window means, not two single values, so that Monte-Carlo noise cannot
    stop the run by chance."""

    beta: float
    window: int
    tol: float
    min_steps: int
    raw: float = 0.0
    history: list[float] = field(default_factory=list)

    def update(self, value: float) -> float:
        self.raw = self.beta * self.raw + (1.0 - self.beta) * value
        s = self.raw / (1.0 - self.beta ** (len(self.history) + 1))
        self.history.append(s)
        return s

    def change(self) -> float:
        """|a − b| / (1 + |a|) for the means a, b of the last two windows (inf while fewer than 2W values)."""
        w = self.window
        if len(self.history) < 2 * w:
            return math.inf
        a = sum(self.history[-w:]) / w
        b = sum(self.history[-2 * w:-w]) / w
        return abs(a - b) / (1.0 + abs(a))

    def converged(self) -> bool:
        return len(self.history) >= self.min_steps and self.change() < self.tol

    def state(self) -> dict:
        return {"raw": torch.tensor(self.raw, dtype=torch.float64),
                "history": torch.tensor(self.history, dtype=torch.float64)}

    def load(self, state: dict) -> None:
        self.raw = float(state["raw"])
        self.history = [float(v) for v in state["history"]]


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` to a temporary file, then an atomic rename (an interrupted save never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, fingerprint: str, device: torch.device) -> dict:
    """The checkpoint at ``path`` (tensors on ``device``), checked against the run's ``fingerprint``."""
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise ModelSpecError(f"vem: the checkpoint {str(path)!r} was written by a different run (model, data, "
                             f"seed or options differ): {state.get('fingerprint')!r} vs {fingerprint!r}; "
                             f"use resume=False to start afresh")
    return state
