"""Reproducible draws from ``torch.distributions`` objects without touching the caller's random state."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside the block, torch's default generators are seeded with ``seed`` (``None``: left as they are); the
    caller's random state is restored afterwards. ``Distribution.sample`` takes no generator, so this is how
    a seeded importance-sampling or simulation run stays reproducible."""
    if seed is None:
        yield
        return
    dev = torch.device(device) if device is not None else torch.device("cpu")
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if devices else "cpu"):
        torch.manual_seed(int(seed))
        yield
