"""What every generative baseline offers: ``fit(train)``, ``sample(n)``, ``log_prob(view)`` and its likelihood kind.

A baseline sees a :class:`~nlmefit.baselines.design.PanelView`. :meth:`Baseline.fit` fits the per-time-point
:class:`~nlmefit.baselines.design.Standardizer` on the training subjects and hands the subclass standardised
tensors ``z`` [n, d] (float32 by default, on ``device``), ``mask`` [n, d] and ``ctx`` [n, d] (the dose context,
scaled). Subclasses implement three methods on that scale:

* ``_fit(z, mask, ctx, valid)`` — ``valid`` is the same triple for the validation subjects, or None;
* ``_sample(n, ctx, generator) -> z`` [n, d];
* ``_log_prob(z, mask, ctx, generator) -> log p(z)`` [n] (only when ``kind != "none"``).

The public methods convert back: samples to the original scale, log-densities with the Jacobian
(log p_y = log p_z − Σ_j log s_j), returned as float64 numpy arrays, one value per subject.

Likelihood kinds (``kind``): ``exact`` — the model's log-density itself (PPCA, flows, flow matching up to ODE
tolerance); ``bound`` — a lower bound on it (DDPM); ``estimate`` — a Monte-Carlo
estimate (IS/IWAE for the VAE, importance-sampled log Z for the EBM); ``none`` — no likelihood (GAN).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np
import torch

from nlmefit.baselines.design import PanelView, Standardizer
from nlmefit.baselines.trainer import Trainer
from nlmefit.errors import DataError, ModelSpecError

__all__ = ["Baseline", "LIKELIHOOD_KINDS", "resolve_device"]

LIKELIHOOD_KINDS = ("exact", "bound", "estimate", "none")


def resolve_device(device) -> torch.device:
    """``None`` → CPU; ``"cuda"`` without a GPU raises ModelSpecError rather than failing deep inside torch."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelSpecError("device='cuda' was asked for but torch.cuda.is_available() is False")
    return dev


class Baseline(ABC):
    """Base class of the generative baselines (see the module docstring).

    Class attributes: ``name``; ``kind`` (one of :data:`LIKELIHOOD_KINDS`); ``conditional`` — the model takes
    the dose context as an input (it can be asked about a regimen it was not trained on);
    ``supports_missing`` — the model fits and scores subjects with missing design times.
    """

    name: str = "baseline"
    kind: str = "none"
    conditional: bool = False
    supports_missing: bool = False

    def __init__(self, *, device=None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 trainer_options: dict | None = None):
        self.trainer_options = dict(trainer_options or {})
        self.device = resolve_device(device)
        self.seed = int(seed)
        self.dtype = dtype
        self.standardizer: Standardizer | None = None
        self.design_times: np.ndarray | None = None
        self.fit_time_s: float | None = None
        self.history = None

    # ------------------------------------------------------------------ public API
    def fit(self, train: PanelView, valid: PanelView | None = None):
        """Fit on the training subjects (``valid``: held-out subjects for early stopping). Returns self."""
        self._check_view(train, "train")
        if valid is not None:
            self._check_view(valid, "valid")
            if valid.d != train.d or not np.allclose(valid.times, train.times):
                raise DataError("valid: the validation subjects must share the training design times")
        self.standardizer = Standardizer.fit(train)
        self.design_times = np.asarray(train.times, dtype=float)
        self._ctx0 = np.asarray(train.context[0], dtype=float)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            self._fit(*self._tensors(train), None if valid is None else self._tensors(valid))
        self.fit_time_s = time.perf_counter() - t0
        return self

    def sample(self, n: int, *, context=None, seed: int | None = None) -> np.ndarray:
        """n draws [n, d] on the original scale. ``context``: a regimen's dose context ([d] or [n, d], or a
        PanelView whose first subject's context is used) — only the conditional baselines use it; default the
        training subjects' first context."""
        self._check_fitted()
        if int(n) < 1:
            raise ModelSpecError(f"n must be a positive integer, got {n}")
        ctx = self._context(context, int(n))
        gen = self._generator(self.seed + 1 if seed is None else seed)
        with torch.no_grad():
            z = self._sample(int(n), ctx, gen)
        return self.standardizer.inverse(z.detach().to("cpu", torch.float64).numpy())

    def log_prob(self, view: PanelView, *, seed: int = 0) -> np.ndarray:
        """log p(y_i) per subject [n] on the original data scale (float64), of the kind in ``self.kind``."""
        self._check_fitted()
        if self.kind == "none":
            raise ModelSpecError(f"{self.name} has no likelihood (kind='none')")
        if not isinstance(view, PanelView):  # a plain array: the training regimen's context, not "no dose"
            y = np.asarray(view, dtype=float)
            view = PanelView.from_arrays(y, times=self.design_times,
                                         context=self._train_context if y.ndim == 2 else None)
        self._check_view(view, "data")
        if view.d != len(self.design_times) or not np.allclose(view.times, self.design_times):
            raise DataError(f"data: expected the design times {self.design_times.tolist()}, got "
                            f"{np.asarray(view.times).tolist()}")
        z, mask, ctx = self._tensors(view)
        lp = self._log_prob(z, mask, ctx, self._generator(seed))
        lp = lp.detach().to("cpu", torch.float64).numpy()
        return lp - self.standardizer.log_scale_sum(view.mask)

    def nll(self, view: PanelView, *, seed: int = 0) -> float:
        """Mean negative log-likelihood per subject on the original scale."""
        return float(-np.mean(self.log_prob(view, seed=seed)))

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _fit(self, z: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor, valid) -> None: ...

    @abstractmethod
    def _sample(self, n: int, ctx: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...

    def _log_prob(self, z: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        raise ModelSpecError(f"{self.name} has no likelihood (kind={self.kind!r})")

    # ------------------------------------------------------------------ helpers
    def _train(self, objective: torch.nn.Module, train: tuple, valid: tuple | None):
        """Train ``objective`` with the shared :class:`~nlmefit.baselines.trainer.Trainer` (options from
        ``trainer_options``, seeded with ``self.seed``); the history is kept in ``self.history``."""
        self.history = Trainer(**{"seed": self.seed, **self.trainer_options}).fit(objective, train, valid)
        return self.history

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _check_fitted(self) -> None:
        if self.standardizer is None:
            raise ModelSpecError(f"{self.name}: call fit(train) first")

    def _check_view(self, view: PanelView, what: str) -> None:
        if not isinstance(view, PanelView):
            raise DataError(f"{what}: expected a PanelView (nlmefit.baselines.PanelView.from_panel), got "
                            f"{type(view).__name__}")
        if view.n == 0:
            raise DataError(f"{what}: no subjects")
        empty = ~view.mask.any(1)
        if empty.any():
            raise DataError(f"{what}: subjects with no observed design time: {view.ids[empty][:10].tolist()}")
        if not self.supports_missing and not view.mask.all():
            bad = view.ids[~view.complete_cases]
            raise DataError(f"{what}: {self.name} needs every design time observed; subjects with missing values: "
                            f"{bad[:10].tolist()}{' …' if len(bad) > 10 else ''} (use view.complete(), or a "
                            "baseline with supports_missing, e.g. PPCA by Laplace or the VAE)")

    def _tensors(self, view: PanelView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.standardizer
        kw = dict(device=self.device, dtype=self.dtype)
        z = torch.as_tensor(np.nan_to_num(s.transform(view.y), nan=0.0), **kw)
        return z, torch.as_tensor(view.mask, device=self.device), torch.as_tensor(s.context(view.context), **kw)

    def _context(self, context, n: int) -> torch.Tensor:
        d = len(self.design_times)
        if context is None:
            c = self._train_context
        elif isinstance(context, PanelView):
            c = context.context[0]
        else:
            c = np.asarray(context, dtype=float)
        c = np.broadcast_to(np.asarray(c, dtype=float), (n, d)) if np.ndim(c) == 1 else np.asarray(c, dtype=float)
        if c.shape != (n, d):
            raise DataError(f"context: expected [{d}] or [{n}, {d}] values, got {np.shape(context)}")
        return torch.as_tensor(self.standardizer.context(c), device=self.device, dtype=self.dtype)

    @property
    def _train_context(self) -> np.ndarray:
        return getattr(self, "_ctx0", np.zeros(len(self.design_times)))

    def __repr__(self) -> str:
        state = "fitted" if self.standardizer is not None else "not fitted"
        return f"{type(self).__name__}(kind={self.kind!r}, device={self.device}, {state})"
