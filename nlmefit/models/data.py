"""Data bound to a model: the padded subject tensors every likelihood evaluation takes.

:class:`ObservationData` is all a latent-variable model needs (observations, masks, censoring, the number of
random effects); :class:`ModelData` adds what a PK model needs (dose events, covariates, occasions). Estimators,
posteriors and marginal likelihoods use only the :class:`ObservationData` fields, so a model that is not a PK
model (PPCA, a VAE decoder) binds its data with :meth:`ObservationData.from_panel` and is fitted by the same
code.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from nlmefit.panel import Panel
from nlmefit.pk.events import Events

__all__ = ["ObservationData", "ModelData"]


@dataclass(frozen=True)
class ObservationData:
    """Observations of N subjects as padded [N, J] tensors on one device, on the likelihood scale.

    ``mask`` marks the observations the likelihood uses (padding and excluded records are False); ``cens`` is
    the M3 censoring flag (0 observed, 1 below ``limit``, −1 above); ``q`` is the number of random effects per
    subject and ``n_occ`` the number of occasions (IOV)."""

    panel: Any  # the Panel the tensors came from (IDs, times, covariates, original rows)
    y: torch.Tensor  # [N, J]
    mask: torch.Tensor  # [N, J] bool
    cens: torch.Tensor  # [N, J] int64
    limit: torch.Tensor  # [N, J]
    q: int
    n_occ: int

    @classmethod
    def from_panel(cls, panel, q: int, device=None, dtype=torch.float64) -> ObservationData:
        """The observations of a :class:`~nlmefit.panel.Panel` (DV as is, M3 limits kept), for ``q`` random
        effects per subject. Doses and covariates are not carried: models that need them use ModelData."""
        if not isinstance(panel, Panel):
            panel = Panel.from_dataframe(panel)
        kw = dict(device=device, dtype=dtype)
        m = panel.obs_mask
        return cls(panel=panel, y=torch.as_tensor(np.where(m, panel.dv, 0.0), **kw),
                   mask=torch.as_tensor(m, device=device),
                   cens=torch.as_tensor(np.where(m, panel.cens, 0).astype(np.int64), device=device),
                   limit=torch.as_tensor(np.where(m & (panel.cens != 0), panel.limit, 0.0), **kw), q=int(q),
                   n_occ=0)

    @property
    def ids(self) -> np.ndarray:
        """Subject IDs, in tensor order."""
        return np.asarray(self.panel.ids)

    @property
    def n_subjects(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_obs(self) -> int:
        return int(self.mask.sum())

    @property
    def n_uncensored(self) -> int:
        return int((self.mask & (self.cens == 0)).sum())

    @property
    def device(self) -> torch.device:
        return self.y.device

    @property
    def dtype(self) -> torch.dtype:
        return self.y.dtype

    def cost_per_draw(self) -> int:
        """Rough number of floating-point terms one likelihood evaluation of all subjects takes (chunking)."""
        return int(self.y.numel())

    def index(self, idx) -> ObservationData:
        """The data of a subset (shard) of subjects."""
        return replace(self, panel=_SubsetPanel.of(self.panel, idx), y=self.y[idx], mask=self.mask[idx],
                       cens=self.cens[idx], limit=self.limit[idx])

    def with_mask(self, mask: torch.Tensor) -> ObservationData:
        """Condition on a subset of observations (doses stay in)."""
        return replace(self, mask=self.mask & mask)


@dataclass(frozen=True)
class ModelData(ObservationData):
    """A Panel bound to a PK model: observations plus dose events, covariates and occasions."""

    events: Events = None  # type: ignore[assignment]
    cov: dict = None  # type: ignore[assignment]  # name -> [N, 1] or [N, J]
    occ: torch.Tensor = None  # type: ignore[assignment]  # [N, J] int64
    per_obs: bool = False

    def cost_per_draw(self) -> int:
        return int(self.y.numel()) * max(1, int(self.events.dose_time.shape[-1]))

    def index(self, idx) -> ModelData:
        base = super().index(idx)
        return replace(base, events=self.events.index(idx), cov={k: v[idx] for k, v in self.cov.items()},
                       occ=self.occ[idx])


class _SubsetPanel:
    """The IDs (and nothing else) of a subset of a panel's subjects, so that shards still name subjects."""

    def __init__(self, ids: np.ndarray, parent) -> None:
        self.ids = ids
        self.parent = parent

    @classmethod
    def of(cls, panel, idx):
        if panel is None:
            return None
        root = panel.parent if isinstance(panel, cls) else panel
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return cls(np.asarray(panel.ids)[idx], root)

    def __getattr__(self, name):
        raise AttributeError(f"a shard of a panel holds only its subjects' IDs (asked for {name!r}); use the full "
                             f"panel")
