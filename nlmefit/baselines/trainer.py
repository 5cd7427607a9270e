"""The one training loop every neural baseline uses: device, mini-batches, Adam, early stopping, checkpoints.

An *objective* is an ``nn.Module`` that says what to optimise and how:

* ``phases() -> list[Phase]`` — the parameter groups updated in turn on each mini-batch, each with its own Adam
  optimiser and number of inner steps (one phase "model" for most baselines; WGAN-GP has "critic" × n_critic
  then "generator");
* ``loss(batch, phase, generator) -> scalar`` — the training loss of one phase on a mini-batch (a tuple of
  tensors sliced from the training tensors along dim 0);
* optionally ``validation_loss(batch, generator) -> scalar`` — the early-stopping criterion (default: the loss
  of the last phase). It is evaluated with autograd enabled, since score-matching losses differentiate the
  model with respect to its input; nothing is back-propagated.

:class:`Trainer` shuffles with its own seeded generator, evaluates the validation loss (mean over validation
batches, with a fixed seed so epochs are comparable) after every epoch, keeps the best state, stops after
``patience`` epochs without an improvement larger than ``min_delta`` (or at ``max_epochs`` / ``max_time_s``) and
restores the best state. Without validation data the training loss of the epoch is the criterion. An objective
with no meaningful criterion (WGAN-GP: its losses are measured by a critic that keeps changing) trains with
``restore_best=False`` and ``patience=None``: a fixed number of epochs, the final state kept.
:func:`holdout` splits a seeded fraction of the training subjects off for early stopping when a baseline is
given no validation subjects.
``checkpoint=path`` writes model, optimisers, generator and history after every epoch (atomically, loaded with
``weights_only=True``); ``resume=True`` continues from it.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from nlmefit.errors import EstimationError, ModelSpecError

__all__ = ["Phase", "Trainer", "TrainHistory", "holdout"]


@dataclass
class Phase:
    """A parameter group updated with its own Adam optimiser, ``steps`` times per mini-batch."""

    name: str
    params: list
    steps: int = 1
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainHistory:
    """Per-epoch training and validation losses, the best epoch and why training stopped."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_loss: float = math.inf
    stopped: str = ""

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.epochs)


class Trainer:
    """Mini-batch Adam with early stopping (see the module docstring).

    Parameters: ``max_epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``patience`` (None: no early stop),
    ``min_delta``, ``grad_clip`` (max gradient norm, None: off), ``max_time_s``, ``seed``, ``checkpoint``,
    ``resume``, ``progress`` (tqdm bar over epochs), ``restore_best`` (False: keep the final state).
    """

    def __init__(self, *, max_epochs: int = 200, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                 patience: int | None = 20, min_delta: float = 0.0, grad_clip: float | None = None,
                 max_time_s: float | None = None, seed: int = 0, checkpoint: str | os.PathLike | None = None,
                 resume: bool = False, progress: bool = False, restore_best: bool = True):
        if max_epochs < 1 or batch_size < 1:
            raise ModelSpecError("max_epochs and batch_size must be positive")
        if lr <= 0:
            raise ModelSpecError(f"lr must be positive, got {lr}")
        self.max_epochs, self.batch_size, self.lr = int(max_epochs), int(batch_size), float(lr)
        self.weight_decay, self.patience, self.min_delta = float(weight_decay), patience, float(min_delta)
        self.grad_clip, self.max_time_s, self.seed = grad_clip, max_time_s, int(seed)
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.resume, self.progress, self.restore_best = bool(resume), bool(progress), bool(restore_best)

    # ------------------------------------------------------------------ the loop
    def fit(self, objective: nn.Module, train: tuple[torch.Tensor, ...],
            valid: tuple[torch.Tensor, ...] | None = None) -> TrainHistory:
        """Train ``objective`` on the tensors ``train`` (sliced along dim 0); returns the history."""
        n = int(train[0].shape[0])
        if any(int(t.shape[0]) != n for t in train):
            raise ModelSpecError("training tensors must share their first dimension")
        device = train[0].device
        phases = objective.phases()
        opts = [torch.optim.Adam(ph.params, lr=ph.lr or self.lr, betas=ph.betas, weight_decay=self.weight_decay)
                for ph in phases]
        shuffle = torch.Generator().manual_seed(self.seed)
        noise = torch.Generator(device=device).manual_seed(self.seed + 1)
        hist, best_state, start, bad = TrainHistory(), None, 0, 0
        if self.resume and self.checkpoint is not None and self.checkpoint.exists():
            start, hist, best_state, bad = self._load(objective, opts, shuffle, noise)
        t0 = time.perf_counter()
        bar = tqdm(range(start, self.max_epochs), disable=not self.progress, desc=type(objective).__name__)
        for epoch in bar:
            objective.train()
            # losses are summed and checked on the device: no host synchronisation per optimiser step
            tot = torch.zeros((), dtype=torch.float64, device=device)
            finite = torch.ones((), dtype=torch.bool, device=device)
            cnt = 0
            for idx in torch.randperm(n, generator=shuffle).split(self.batch_size):
                batch = tuple(t[idx.to(device)] for t in train)
                for ph, opt in zip(phases, opts):
                    for _ in range(ph.steps):
                        loss = objective.loss(batch, ph.name, noise)
                        finite = finite & torch.isfinite(loss.detach())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if self.grad_clip is not None:
                            nn.utils.clip_grad_norm_(ph.params, self.grad_clip)
                        opt.step()
                tot = tot + loss.detach().double() * len(idx)
                cnt += len(idx)
            if not bool(finite):
                raise EstimationError(f"{type(objective).__name__}: non-finite training loss in epoch {epoch}; "
                                      f"lower lr (now {self.lr:g})")
            train_loss = float(tot) / cnt
            val = self._validate(objective, valid) if valid is not None else train_loss
            hist.epochs.append({"epoch": epoch, "train_loss": train_loss, "valid_loss": val,
                                "time_s": time.perf_counter() - t0})
            bar.set_postfix(train=f"{train_loss:.4g}", valid=f"{val:.4g}")
            if val < hist.best_loss - self.min_delta:
                hist.best_loss, hist.best_epoch, bad = val, epoch, 0
                if self.restore_best:
                    best_state = copy.deepcopy(objective.state_dict())
            else:
                bad += 1
            if self.checkpoint is not None:
                self._save(objective, opts, shuffle, noise, epoch + 1, hist, best_state, bad)
            if self.patience is not None and bad >= self.patience:
                hist.stopped = f"no improvement for {self.patience} epochs"
                break
            if self.max_time_s is not None and time.perf_counter() - t0 > self.max_time_s:
                hist.stopped = f"time budget {self.max_time_s:g} s"
                break
        else:
            hist.stopped = hist.stopped or f"max_epochs {self.max_epochs}"
        bar.close()
        if best_state is not None:
            objective.load_state_dict(best_state)
        objective.eval()
        return hist

    def _validate(self, objective: nn.Module, valid) -> float:
        objective.eval()
        gen = torch.Generator(device=valid[0].device).manual_seed(self.seed + 2)
        fn = getattr(objective, "validation_loss", None)
        last = objective.phases()[-1].name
        tot, cnt = 0.0, 0
        for idx in torch.arange(valid[0].shape[0], device=valid[0].device).split(max(self.batch_size, 256)):
            batch = tuple(t[idx] for t in valid)
            v = fn(batch, gen) if fn is not None else objective.loss(batch, last, gen)
            tot += float(v.detach()) * len(idx)
            cnt += len(idx)
        objective.zero_grad(set_to_none=True)
        objective.train()
        return tot / cnt

    # ------------------------------------------------------------------ checkpoints
    def _save(self, objective, opts, shuffle, noise, epoch, hist, best_state, bad) -> None:
        state = {"epoch": epoch, "model": objective.state_dict(), "optimisers": [o.state_dict() for o in opts],
                 "shuffle": shuffle.get_state(), "noise": noise.get_state().cpu(), "epochs": hist.epochs,
                 "best_epoch": hist.best_epoch, "best_loss": hist.best_loss, "best_state": best_state, "bad": bad}
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def _load(self, objective, opts, shuffle, noise):
        try:
            st = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            objective.load_state_dict(st["model"])
            for o, s in zip(opts, st["optimisers"]):
                o.load_state_dict(s)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ModelSpecError(f"checkpoint {self.checkpoint} does not fit this model: {e}") from None
        shuffle.set_state(st["shuffle"])
        noise.set_state(st["noise"].to(torch.uint8).cpu())  # Generator.set_state takes a CPU ByteTensor
        hist = TrainHistory(epochs=list(st["epochs"]), best_epoch=int(st["best_epoch"]),
                            best_loss=float(st["best_loss"]))
        return int(st["epoch"]), hist, st["best_state"], int(st["bad"])


def holdout(train: tuple[torch.Tensor, ...], valid: tuple[torch.Tensor, ...] | None, fraction: float,
            seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """(train, valid) tensors for the trainer: ``valid`` as given, else — when ``fraction`` > 0 and at least 10
    subjects — a seeded random ``fraction`` of the training subjects held out for early stopping."""
    n = int(train[0].shape[0])
    k = int(round(fraction * n))
    if valid is not None or fraction <= 0.0 or n < 10 or k < 1:
        return train, valid
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7)).to(train[0].device)
    return tuple(t[perm[k:]] for t in train), tuple(t[perm[:k]] for t in train)
