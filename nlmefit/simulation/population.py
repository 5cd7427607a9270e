"""A simulated population under one regimen: who is simulated (θ, η, covariates) and what they receive."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Params
from nlmefit.pk.trains import DoseTrain
from nlmefit.simulation.concentrations import concentrations, slice_params

__all__ = ["SimulatedPopulation"]


@dataclass(frozen=True)
class SimulatedPopulation:
    """S simulated subjects under one regimen.

    ``p`` holds θ shared or per subject ([S]); ``eta`` is [S, q]; ``cov_t`` maps covariate names to [S, 1];
    ``data1`` is the regimen's one-subject template (ModelData) built from its dose records ``recs``; ``scale`` [S]
    scales per-kg doses by body weight (None for fixed doses); ``trains`` are the regimen's closed-form dose trains
    when that fast path applies (else None).
    """

    model: Model
    p: Params
    eta: torch.Tensor
    cov_t: dict[str, torch.Tensor]
    data1: ModelData
    recs: pd.DataFrame
    scale: torch.Tensor | None = None
    trains: list[DoseTrain] | None = None

    @property
    def n(self) -> int:
        """Number of simulated subjects S."""
        return self.eta.shape[0]

    def rows(self, sl: slice) -> SimulatedPopulation:
        """The simulated subjects ``sl`` (θ rows, η, covariates, dose scale) under the same regimen."""
        return replace(self, p=slice_params(self.p, sl), eta=self.eta[sl],
                       cov_t={k: v[sl] for k, v in self.cov_t.items()},
                       scale=None if self.scale is None else self.scale[sl])

    def concentrations(self, times: np.ndarray, chunk: int, residual: bool = False, gen=None,
                       allow_negative: bool = False) -> np.ndarray:
        """DV-scale predictions [S, T] at ``times`` (see :func:`nlmefit.simulation.concentrations.concentrations`)."""
        return concentrations(self.model, self.p, self.eta, self.cov_t, self.scale, self.recs, times, self.trains,
                              chunk, residual, gen, allow_negative)
