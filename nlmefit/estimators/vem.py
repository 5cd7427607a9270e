"""Per-subject variational EM (VEM): maximise the evidence lower bound jointly in θ and the posteriors q_i.

Objective (full constants, float64)::

    L(θ, φ) = Σ_i ELBO_i(θ, φ_i),   ELBO_i = E_{q_i}[log p(y_i | η, θ) + log p(η | θ) − log q_i(η)] ≤ log p(y_i | θ)

q_i is a member of :class:`~nlmefit.posteriors.FlowFamily` (``posterior="gaussian"`` — N(m_i, L_i L_iᵀ) —
``"maf"`` or ``"nsf"``), initialised at the Laplace posterior N(η̂_i, H_i⁻¹) at the initial θ. Each step draws
``n_samples`` = K base points ξ ~ N(0, I) per subject from the run's own ``torch.Generator`` and estimates
ELBO_i by (1/K) Σ_k [log p(y_i, η_ik | θ) − log q_i(η_ik)] with η_ik = T_i(ξ_k) (reparameterised). With
``stl=True`` ("sticking the landing", Roeder et al. 2017) log q_i is evaluated with the variational parameters
detached, so the φ-gradient is the path derivative only (zero variance at the exact posterior). It is the default
for per-subject families (``stl=None``): with the full score-function term the φ-gradient noise keeps the ELBO on
a noise floor that only the learning-rate decay lowers — a 200-subject 1-cmt oral fit (10 samples each) was still
gaining 1.3 nats per 200 steps at step 2000 without STL, and reached its plateau at step ~500 with it (−2·ELBO
783.06 vs 783.73). ``stl=None`` keeps the full gradient for the amortized family (validated that way).

θ is the unconstrained population vector (``ParameterSet.to_unconstrained``: θ, Ω Cholesky factors, IOV, σ,
weights). θ and φ take joint Adam steps (learning rates ``lr`` and ``lr_posterior``) on −L/N, scaled by the
schedule factor (``schedule="cosine"``: from 1 down to ``lr_final`` over ``max_steps``; ``"step"``: halved each
quarter; ``"constant"``). With ``batch_size`` B < N each step uses B subjects drawn at random and the unbiased
estimate (N/B) Σ_{i∈B} ELBO_i; the posteriors of the other subjects are left exactly where they were.

Ω: with ``omega_update="auto"`` and a :class:`~nlmefit.models.protocol.MuReferenced` model (its prior is
η ~ N(0, Ω), and log p(y | η, θ) does not involve Ω) the free Ω blocks are set after every gradient step to the
maximiser of Σ_i E_{q_i} log N(η_i; 0, Ω), i.e. Ω = (1/N) Σ_i E_{q_i}[η_i η_iᵀ] projected on the Ω structure
(FIX blocks kept; ``saem._project_omega``). For the Gaussian family E[ηηᵀ] = m mᵀ + L Lᵀ exactly; for flows it
is the Monte-Carlo average of the step's draws (kept per subject, so mini-batches work), and after the last
step Ω is recomputed from ``n_elbo`` draws per subject. IOV blocks, and every Ω block with
``omega_update="gradient"`` or a model that is not mu-referenced, take the Adam gradient steps instead.

Convergence: the ELBO estimate of each step is smoothed exponentially (factor ``ema``, bias-corrected); the
run has reached its plateau when, after ``min_steps`` steps, the means a and b of the smoothed ELBO over the last
two windows of W = ``window`` steps satisfy |a − b| < ``tol``·(1 + |a|). A plateau at a learning rate > 0 is a
Monte-Carlo noise floor, so the run then anneals: the learning-rate factor falls from its current value to
``lr_final`` by a half cosine over 2W more steps, and the run stops (``converged=True``). Without a plateau it
stops at ``max_steps`` (``converged=False``, with a warning). Defaults: per subject ``min_steps`` 500, ``tol``
3e-4, ``max_steps`` 2000; amortized 3000, 3e-5, 6000 — with the per-subject rule an amortized run on 1,000
simulated subjects stopped at step 551 with −2·ELBO 3964 against an IS −2LL of 3752 (the encoder far from
trained; per-subject VEM: 3756 vs 3744), and on 2,000 subjects σ ended 7 SE from the truth.

After the fit: the reported OFV is an importance-sampling −2LL with the fitted q_i as the proposal
(``n_is`` draws per subject, Monte-Carlo SE in ``fit.likelihoods["is"]``); the ELBO itself (``n_elbo`` draws,
full constants) is in ``fit.likelihoods["elbo"]`` as ``elbo`` and ``m2elbo`` = −2·ELBO ≥ −2LL — a bound,
never an OFV. Standard errors: the FOCE-I sandwich at the VEM estimates (a linearisation, as for SAEM).
``fit.posterior`` is the fitted family's distribution (batch [N], event [q]); ``fit.traces`` holds the
parameters, the ELBO estimate, the smoothed ELBO and the learning-rate factor per step.

``checkpoint="run.pt"`` saves the complete state (θ, φ, Adam, generator, smoother, traces) every
``checkpoint_every`` steps and at the end; ``resume=True`` continues from it, which gives the same trajectory
as an uninterrupted run with the same seed and options.

``amortized=True``: φ_i = encoder(panel_i) (:class:`~nlmefit.posteriors.encoder.AmortizedFamily`, a masked set
encoder over the observation and dose records plus baseline covariates; ``encoder_options`` ``hidden``,
``heads``), trained jointly with θ on the same ELBO (Adam rate ``lr_encoder``; mini-batches as above, all
subjects' q_i move with the shared weights). Before the first step the encoder is regressed onto the Laplace
posteriors at the initial θ for ``warm_steps`` steps. The closed-form Ω uses stored per-subject E_q[η ηᵀ],
refreshed for the step's subjects. ``fit.posterior`` carries ``.family``/``.encoder`` and
``.for_data(data, refine_steps=0)``; :func:`amortized_posterior` does the same from a FitResult.
``fix_population=True`` keeps θ (and Ω) at the initial values and fits the posteriors only.
"""
from __future__ import annotations

import copy
import functools
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.distributions import Distribution

from nlmefit.errors import EstimationError, ModelSpecError
from nlmefit.estimators.base import Estimator, check_covariance, register
from nlmefit.estimators.saem import _positive_definite, _project_omega
from nlmefit.estimators.vem_state import SCHEDULES, SmoothedElbo, load_checkpoint, lr_factor, save_checkpoint
from nlmefit.marginal.evaluate import marginal_loglik
from nlmefit.marginal.laplace import laplace_posterior
from nlmefit.marginal.linearisation import Conditional, Linearisation
from nlmefit.models.data import ObservationData
from nlmefit.models.parameters import Params
from nlmefit.models.protocol import LatentModel, Linearisable, MuReferenced
from nlmefit.posteriors.encoder import AmortizedFamily
from nlmefit.posteriors.flows import FLOW_KINDS, FlowFamily, FlowPosterior
from nlmefit.progress import progress_bar
from nlmefit.results.build import build_result
from nlmefit.threads import check_threads, limit_threads, resolve_threads

__all__ = ["VEM", "amortized_posterior"]

OMEGA_UPDATES = ("auto", "closed", "gradient")


def amortized_posterior(fit, data, *, refine_steps: int = 0, n_samples: int = 8, lr: float = 0.02,
                        seed: int = 0) -> Distribution:
    """q_i for the subjects of ``data`` (a DataFrame/Panel for ``fit.model``, or bound data) from the encoder of an
    amortized VEM fit (``fit.posterior.family``), at the fitted population parameters: no optimisation. With
    ``refine_steps`` > 0 the encoder's output (m_i, L_i, c_i) then takes that many Adam steps (rate ``lr``,
    ``n_samples`` draws per subject, seeded) on each subject's ELBO at fixed θ and fixed flow weights —
    all subjects batched. Same as ``fit.posterior.for_data(data, ...)``."""
    family = getattr(fit.posterior, "family", None)
    if not isinstance(family, AmortizedFamily):
        raise ModelSpecError("amortized_posterior needs a fit of method='vem' with amortized=True")
    p = fit.population_parameters(device=family.scale_t.device)
    return _amortized_q(fit.model, family, p, data, refine_steps=refine_steps, n_samples=n_samples, lr=lr, seed=seed)


def _amortized_q(model, family: AmortizedFamily, p: Params, data, *, refine_steps: int = 0, n_samples: int = 8,
                 lr: float = 0.02, seed: int = 0) -> Distribution:
    mdata = data if isinstance(data, ObservationData) else model.prepare(data, device=family.scale_t.device)
    with torch.no_grad():
        q0 = family.for_data(mdata)
    if refine_steps <= 0:
        q0.family = family
        return q0
    loc = q0.loc.detach().clone().requires_grad_(True)
    L0 = q0.scale_tril.detach()
    raw = (torch.tril(L0, -1) + torch.diag_embed(torch.log(torch.diagonal(L0, dim1=-2, dim2=-1)))).requires_grad_(True)
    ctx = None if family.flow is None else q0.context.detach().clone().requires_grad_(True)
    leaves = [t for t in (loc, raw, ctx) if t is not None]
    opt = torch.optim.Adam(leaves, lr=lr)
    gen = torch.Generator(device=loc.device)
    gen.manual_seed(int(seed))
    tril = torch.tril(torch.ones_like(raw[0], dtype=torch.bool), -1)
    p = p.detach() if hasattr(p, "detach") else p

    def dist():
        L = torch.where(tril, raw, torch.zeros_like(raw)) + torch.diag_embed(torch.exp(torch.diagonal(raw, 0, -2, -1)))
        return family._dist(loc, L, ctx)

    for _ in range(int(refine_steps)):
        xi = torch.randn(n_samples, *loc.shape, generator=gen, dtype=loc.dtype, device=loc.device)
        with torch.enable_grad():
            qd = dist()
            eta = qd.from_base(xi) if isinstance(qd, FlowPosterior) else \
                qd.loc + (qd.scale_tril @ xi.unsqueeze(-1)).squeeze(-1)
            lw = model.log_lik(p, eta, mdata) + model.log_prior(p, eta, mdata.n_occ) - qd.log_prob(eta)
            loss = -lw.mean(0).sum() / loc.shape[0]
            grads = torch.autograd.grad(loss, leaves)
        for t, g in zip(leaves, grads):
            t.grad = g
        opt.step()
    with torch.no_grad():
        out = dist()
    out = family._dist(out.loc.detach(), out.scale_tril.detach(), None if ctx is None else ctx.detach())
    out.family = family
    return out


@register("vem")
class VEM(Estimator):
    """Per-subject variational EM (see the module docstring for the objective and every option).

    ``posterior`` ``"gaussian"`` | ``"maf"`` | ``"nsf"`` (``flow_options`` go to :class:`FlowFamily`);
    ``n_samples`` K draws per subject and step; ``lr`` / ``lr_posterior`` Adam rates for θ and φ;
    ``schedule`` ``"cosine"`` | ``"step"`` | ``"constant"`` with ``lr_final`` the final factor; ``batch_size``
    (None: all subjects); ``stl``; ``omega_update`` ``"auto"`` | ``"closed"`` | ``"gradient"``; ``max_steps``,
    ``min_steps``, ``window``, ``tol``, ``ema`` (convergence); ``n_elbo`` / ``n_is`` draws per subject for the
    reported ELBO and IS −2LL; ``covariance`` (FOCE-I linearisation) or None; ``progress`` (a bar with the
    smoothed ELBO: None automatic, True, False; :mod:`nlmefit.progress`);
    ``checkpoint``, ``checkpoint_every``, ``resume``; ``device``; ``threads``; ``amortized`` (an encoder gives
    q_i; ``encoder_options`` ``hidden``/``heads``, ``warm_steps`` Laplace warm-start steps, ``lr_encoder``);
    ``fix_population`` (θ held at its initial values, posteriors only)."""

    requires = (Linearisable,)

    def __init__(
        self,
        posterior: str = "gaussian",
        n_samples: int = 8,
        lr: float = 0.02,
        lr_posterior: float = 0.05,
        schedule: str = "cosine",
        lr_final: float = 0.02,
        batch_size: int | None = None,
        stl: bool | None = None,
        omega_update: str = "auto",
        max_steps: int | None = None,
        min_steps: int | None = None,
        window: int = 100,
        tol: float | None = None,
        ema: float = 0.95,
        n_elbo: int = 1000,
        n_is: int = 2000,
        flow_options: dict | None = None,
        covariance: str | None = "sandwich",
        progress: bool | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 100,
        resume: bool = False,
        device: str | torch.device | None = None,
        threads: int | str | None = None,
        amortized: bool = False,
        encoder_options: dict | None = None,
        warm_steps: int = 500,
        lr_encoder: float = 0.002,
        fix_population: bool = False,
    ) -> None:
        if posterior not in FLOW_KINDS:
            raise ModelSpecError(f"vem: posterior must be one of {FLOW_KINDS}, got {posterior!r}")
        # defaults by family (module docstring, "Convergence"): the amortized ELBO keeps improving slowly while the
        # shared encoder trains, so its plateau rule is stricter and its budget larger
        max_steps = (6000 if amortized else 2000) if max_steps is None else max_steps
        min_steps = (3000 if amortized else 500) if min_steps is None else min_steps
        tol = (3e-5 if amortized else 3e-4) if tol is None else tol
        if schedule not in SCHEDULES:
            raise ModelSpecError(f"vem: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if omega_update not in OMEGA_UPDATES:
            raise ModelSpecError(f"vem: omega_update must be one of {OMEGA_UPDATES}, got {omega_update!r}")
        for name, val in (("n_samples", n_samples), ("max_steps", max_steps), ("window", window),
                          ("n_elbo", n_elbo), ("n_is", n_is), ("checkpoint_every", checkpoint_every)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ModelSpecError(f"vem: {name} must be a positive integer, got {val!r}")
        if isinstance(min_steps, bool) or not isinstance(min_steps, (int, np.integer)) or min_steps < 0:
            raise ModelSpecError(f"vem: min_steps must be a non-negative integer, got {min_steps!r}")
        for name, val in (("lr", lr), ("lr_posterior", lr_posterior), ("tol", tol), ("lr_encoder", lr_encoder)):
            if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
                raise ModelSpecError(f"vem: {name} must be a positive number, got {val!r}")
        if not (isinstance(lr_final, (int, float)) and 0 < lr_final <= 1):
            raise ModelSpecError(f"vem: lr_final must be in (0, 1], got {lr_final!r}")
        if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
            raise ModelSpecError(f"vem: ema must be in [0, 1), got {ema!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ModelSpecError(f"vem: batch_size must be a positive integer or None, got {batch_size!r}")
        if resume and checkpoint is None:
            raise ModelSpecError("vem: resume=True needs checkpoint='path.pt'")
        if progress is not None and not isinstance(progress, (bool, np.bool_)):
            raise ModelSpecError(f"vem: progress must be True, False or None, got {progress!r}")
        flow_options = dict(flow_options or {})
        bad = set(flow_options) - {"context_dim", "hidden", "transforms", "bins", "passes"}
        if bad:
            raise ModelSpecError(f"vem: unknown flow_options {sorted(bad)}")
        encoder_options = dict(encoder_options or {})
        bad = set(encoder_options) - {"hidden", "heads"}
        if bad:
            raise ModelSpecError(f"vem: unknown encoder_options {sorted(bad)}")
        if isinstance(warm_steps, bool) or not isinstance(warm_steps, (int, np.integer)) or warm_steps < 0:
            raise ModelSpecError(f"vem: warm_steps must be a non-negative integer, got {warm_steps!r}")
        self.posterior = posterior
        self.n_samples = int(n_samples)
        self.lr = float(lr)
        self.lr_posterior = float(lr_posterior)
        self.schedule = schedule
        self.lr_final = float(lr_final)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.stl = None if stl is None else bool(stl)
        self.omega_update = omega_update
        self.max_steps = int(max_steps)
        self.min_steps = int(min_steps)
        self.window = int(window)
        self.tol = float(tol)
        self.ema = float(ema)
        self.n_elbo = int(n_elbo)
        self.n_is = int(n_is)
        self.flow_options = flow_options
        self.covariance = check_covariance(covariance)
        self.progress = None if progress is None else bool(progress)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.checkpoint_every = int(checkpoint_every)
        self.resume = bool(resume)
        self.device = device
        self.threads = check_threads(threads)
        self.amortized = bool(amortized)
        self.encoder_options = encoder_options
        self.warm_steps = int(warm_steps)
        self.lr_encoder = float(lr_encoder)
        self.fix_population = bool(fix_population)

    @property
    def linearisation(self) -> Linearisation:
        return Conditional("focei")

    # ------------------------------------------------------------------ fit
    def fit(self, model: LatentModel, data, init: Params | dict | None = None, seed: int | None = None):
        t0 = time.perf_counter()
        model, mdata = self.bind(model, data, init)
        if self.resume and seed is None and Path(self.checkpoint).exists():
            seed = int(torch.load(self.checkpoint, map_location="cpu", weights_only=True)["seed"])
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        with limit_threads(resolve_threads(self.threads, mdata.n_subjects, mdata.n_obs)):
            run = _Run(self, model, mdata, int(seed))
            run.optimise()
            return run.result(t0)

    def _step(self, run: _Run) -> float:
        """One Adam step of θ and φ, then the closed-form Ω; returns the step's ELBO estimate (all subjects)."""
        return run.step()


class _Run:
    """One VEM run: the parameters, the posterior family, Adam and the random stream (see the module docstring)."""

    def __init__(self, vem: VEM, model: LatentModel, mdata, seed: int) -> None:
        self.vem, self.model, self.mdata, self.seed = vem, model, mdata, seed
        self.pset = pset = model.parameters
        self.dev = dev = mdata.y.device
        self.n, self.q = mdata.n_subjects, mdata.q
        self.batch = None if vem.batch_size is None or vem.batch_size >= self.n else vem.batch_size
        self.gen = torch.Generator(device=dev)
        self.gen.manual_seed(seed)
        p0 = pset.initial(torch.float64, dev)
        self.u = nn.Parameter(pset.to_unconstrained(p0).detach().clone())
        self.messages: list[str] = []
        # the Laplace posterior at the initial θ (the family starts there exactly)
        try:
            lap = laplace_posterior(model, p0, mdata)
            loc, scale = lap.loc.detach(), lap.scale_tril.detach()
        except (EstimationError, RuntimeError) as err:
            sd = torch.sqrt(torch.diagonal(model.prior_covariance(p0, mdata.n_occ), dim1=-2, dim2=-1)) \
                if hasattr(model, "prior_covariance") else torch.ones(self.q, dtype=torch.float64, device=dev)
            loc, scale = torch.zeros(self.n, self.q, dtype=torch.float64, device=dev), sd.expand(self.n, self.q)
            self.messages.append(f"vem: no Laplace posterior at the initial values ({err}); q_i started at "
                                 f"N(0, diag Ω)")
        self.amortized = vem.amortized
        resuming = vem.resume and Path(vem.checkpoint).exists()
        with torch.random.fork_rng(devices=[]):  # built on the CPU, then moved: the caller's CPU state is kept
            torch.manual_seed(seed)  # the flow's context and network initialisation
            if self.amortized:
                fo = dict(vem.flow_options)
                if "hidden" in fo:
                    fo["flow_hidden"] = fo.pop("hidden")
                self.family = AmortizedFamily(vem.posterior, mdata, self.q, **vem.encoder_options, **fo).to(dev)
                self.family.bind(mdata)
                if scale.dim() == 2:
                    scale = torch.diag_embed(scale)
                if not resuming and vem.warm_steps:
                    mse = self.family.warm_start(loc, scale, steps=vem.warm_steps)
                    self.messages.append(f"vem: encoder warm-started on the Laplace posteriors for {vem.warm_steps} "
                                         f"steps (standardised MSE {mse:.3g})")
            else:
                self.family = FlowFamily(vem.posterior, self.n, self.q, init_loc=loc.cpu(), init_scale=scale.cpu(),
                                         dtype=torch.float64, **vem.flow_options).to(dev)
        if vem.fix_population:
            self.u.requires_grad_(False)
        # per-subject families of a mu-referenced model follow θ: η = T_i(ξ) − (μ_i(θ) − μ_i(θ₀)) (see _shift)
        self.mu0 = model.mu_reference(p0, mdata).detach() \
            if isinstance(model, MuReferenced) and not self.amortized and not vem.fix_population else None
        self.det_flow = None
        self.stl = vem.stl if vem.stl is not None else not self.amortized
        if self.family.flow is not None and self.stl:
            self.det_flow = copy.deepcopy(self.family.flow).requires_grad_(False)
        self.lr_post = vem.lr_encoder if self.amortized else vem.lr_posterior
        self.opt = torch.optim.Adam([{"params": [self.u], "lr": vem.lr},
                                     {"params": list(self.family.parameters()), "lr": self.lr_post}])
        # Ω in closed form: which entries of u hold the free Ω blocks
        spec = pset.omega
        n_th = sum(1 for p in pset.theta.values() if not p.fixed)
        n_om = sum(len(b) * (len(b) + 1) // 2 for i, b in enumerate(spec.block_list) if not spec.fixed_blocks[i])
        self.om_slice = slice(n_th, n_th + n_om)
        self.d = len(spec.names)
        closed_ok = isinstance(model, MuReferenced) and n_om > 0
        if vem.omega_update == "closed" and not isinstance(model, MuReferenced):
            raise ModelSpecError("vem: omega_update='closed' needs a MuReferenced model (prior η ~ N(0, Ω))")
        self.closed = closed_ok and vem.omega_update in ("auto", "closed") and not vem.fix_population
        self.eta2 = None  # per-subject E_q[η ηᵀ] for flows and for the amortized family
        if self.closed and (self.family.flow is not None or self.amortized):
            self.eta2 = loc.unsqueeze(-1) * loc.unsqueeze(-2) + scale @ scale.transpose(-1, -2) \
                if scale.dim() == 3 else loc.unsqueeze(-1) * loc.unsqueeze(-2) + torch.diag_embed(scale ** 2)
        self.smooth = SmoothedElbo(vem.ema, vem.window, vem.tol, vem.min_steps)
        self.names = list(pset.natural_dict(p0))
        self.rows: list[list[float]] = []
        self.k = 0
        self.done = False
        self.anneal_from: int | None = None  # the step at which the plateau was reached
        self.anneal_fac = 1.0
        self.n_anneal = 2 * vem.window
        self.repairs = 0
        if self.closed:
            with torch.no_grad():
                self._omega_step(None, None)  # Ω consistent with q at the start
        self.fingerprint = repr({"n": self.n, "q": self.q, "names": self.names, "seed": seed,
                                 "opts": {k: v for k, v in vem.options().items()
                                          if k not in ("progress", "checkpoint", "checkpoint_every", "resume",
                                                       "device", "threads", "covariance", "n_is", "n_elbo",
                                                       "max_steps", "min_steps", "tol", "window")}})
        if resuming:
            self._load(load_checkpoint(vem.checkpoint, self.fingerprint, dev))

    # ---------------------------------------------------------------- pieces
    def _shift(self, p: Params, idx=None, data=None) -> torch.Tensor | float:
        """μ_i(θ) − μ_i(θ₀) [B, q] for the per-subject families of a mu-referenced model, else 0.

        The family is a distribution over ψ̃_i = η_i + μ_i(θ) − μ_i(θ₀) (the individual log-parameters up to a
        constant), and η = ψ̃ − (μ(θ) − μ(θ₀)) — the change of variables SAEM uses. It is the same variational family
        (a shift of q_i), but a step in a typical value no longer has to be undone by every subject's posterior
        mean: with whitened per-subject parameters (FlowFamily's reference frame) that would take many small
        steps for the precisely determined subjects. The shift is folded into the family before the result."""
        if self.mu0 is None:
            return 0.0
        data = self.mdata if idx is None else data
        return self.model.mu_reference(p, data) - self.mu0[slice(None) if idx is None else idx]

    def _draws(self, qd: Distribution, xi: torch.Tensor) -> torch.Tensor:
        """η = T_i(ξ) for base points ξ [K, B, q] (reparameterised)."""
        if isinstance(qd, FlowPosterior):
            return qd.from_base(xi)
        return qd.loc + (qd.scale_tril @ xi.unsqueeze(-1)).squeeze(-1)

    def _detached(self, qd: Distribution) -> Distribution:
        """q with its variational parameters detached (STL)."""
        if isinstance(qd, FlowPosterior):
            self.det_flow.load_state_dict(self.family.flow.state_dict())
            return FlowPosterior(qd.loc.detach(), qd.scale_tril.detach(), self.det_flow, qd.context.detach(),
                                 qd.kind)
        return type(qd)(qd.loc.detach(), qd.scale_tril.detach(), kind=qd.kind)

    def _omega_step(self, idx, eta, qd: Distribution | None = None) -> None:
        """Set the free Ω blocks in u to the maximiser (1/N) Σ_i E_q[η_i η_iᵀ] (projected, kept positive definite).

        Amortized: the stored E_q[η_i η_iᵀ] of the step's subjects are refreshed (exactly for the Gaussian family,
        from the step's draws for flows); the others keep their last values (a stochastic-approximation average)."""
        if self.amortized and qd is not None and self.family.flow is None:
            loc, L = qd.loc.detach(), qd.scale_tril.detach()
            self.eta2[idx if idx is not None else slice(None)] = loc.unsqueeze(-1) * loc.unsqueeze(-2) \
                + L @ L.transpose(-1, -2)
            eta = None
        if self.eta2 is None:
            shift = self._shift(self.pset.from_unconstrained(self.u.detach()))
            loc, L = self.family.loc.detach() - shift, self.family.scale_tril.detach()
            S = (loc.T @ loc + (L @ L.transpose(-1, -2)).sum(0)) / self.n
        else:
            if eta is not None:
                e = eta.detach()
                self.eta2[idx if idx is not None else slice(None)] = torch.einsum("kbq,kbr->bqr", e, e) / e.shape[0]
            S = self.eta2.mean(0)
        p = self.pset.from_unconstrained(self.u.detach())
        new = _project_omega(self.pset.omega, S[:self.d, :self.d], p.omega)
        new, notes = _positive_definite(self.pset.omega, new, p.omega)
        self.repairs += bool(notes)
        p2 = Params(dict(p.theta), new, dict(p.sigma), p.omega_iov, dict(p.weights))
        self.u.data[self.om_slice] = self.pset.to_unconstrained(p2)[self.om_slice]

    def _rebase(self) -> None:
        """Every ``window`` steps before the plateau: the per-subject frames move to the current q_i
        (:meth:`FlowFamily.rebase`, exact) and Adam's moments of those parameters restart, since they refer to the
        old coordinates. The frames start at the Laplace posteriors of the *initial* θ, which may be several times
        wider than the final posteriors (σ starts high); without this, Adam's steps stay a fixed fraction of those
        initial SDs and the ELBO sits on a noise floor that only the learning-rate decay lowers."""
        self.family.rebase()
        for t in (self.family.offset, self.family.scale_raw):
            st = self.opt.state.get(t)
            if st:
                for v in st.values():
                    v.zero_()

    def step(self) -> float:
        vem, n = self.vem, self.n
        self.k += 1
        if self.anneal_from is None:
            fac = lr_factor(vem.schedule, self.k, vem.max_steps, vem.lr_final)
        else:  # after the plateau: half cosine from the factor at the plateau down to lr_final over 2W steps
            t = min(1.0, (self.k - self.anneal_from) / self.n_anneal)
            fac = vem.lr_final + (self.anneal_fac - vem.lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))
        self.opt.param_groups[0]["lr"] = vem.lr * fac
        self.opt.param_groups[1]["lr"] = self.lr_post * fac
        idx = None
        if self.batch is not None:
            idx = torch.randperm(n, generator=self.gen, device=self.dev)[:self.batch].sort().values
        b = n if idx is None else int(idx.numel())
        xi = torch.randn(vem.n_samples, b, self.q, generator=self.gen, dtype=torch.float64, device=self.dev)
        data = self.mdata if idx is None else self.mdata.index(idx)
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            p = self.pset.from_unconstrained(self.u)
            qd = self.family(idx)
            psi = self._draws(qd, xi)
            logq = (self._detached(qd) if self.stl else qd).log_prob(psi)
            eta = psi - self._shift(p, idx, data)
            lw = self.model.log_lik(p, eta, data) + self.model.log_prior(p, eta, data.n_occ) - logq  # [K, B]
            total = lw.mean(0).sum() * (n / b)
            if not bool(torch.isfinite(total)):
                raise EstimationError(f"vem: step {self.k}: the ELBO estimate is not finite at "
                                      f"{self.pset.natural_dict(p)}; try better initial estimates or a smaller lr")
            (-total / n).backward()
        if idx is not None and not self.amortized:
            keep = [t.detach().clone() for t in self.family.parameters()]
        self.opt.step()
        with torch.no_grad():
            if idx is not None and not self.amortized:  # the subjects outside the batch keep their posteriors
                out = torch.ones(n, dtype=torch.bool, device=self.dev)
                out[idx] = False
                for t, old in zip(self.family.parameters(), keep):
                    if t.shape[:1] == (n,):
                        t[out] = old[out]
            if self.closed:
                self._omega_step(idx, eta, qd)
            if not self.amortized and self.anneal_from is None and self.k % vem.window == 0:
                self._rebase()
        value = float(total.detach())
        s = self.smooth.update(value)
        nat = self.pset.natural_dict(self.pset.from_unconstrained(self.u.detach()))
        self.rows.append([self.k] + [nat[c] for c in self.names] + [value, s, fac])
        return value

    # ---------------------------------------------------------------- loop
    def optimise(self) -> None:
        vem = self.vem
        bar = progress_bar(vem.max_steps, f"vem {getattr(self.model, 'name', '')}".strip(), "step",
                           enabled=vem.progress, initial=self.k)
        try:
            while not self.done and self.k < vem.max_steps:
                vem._step(self)
                if self.anneal_from is None and self.smooth.converged():
                    self.anneal_from = self.k
                    self.anneal_fac = self.rows[-1][-1]
                self.done = self.anneal_from is not None and self.k - self.anneal_from >= self.n_anneal
                bar.set_postfix(elbo=f"{self.smooth.history[-1]:.3f}", refresh=False)  # a float already
                bar.update(1)
                if vem.checkpoint is not None and (self.k % vem.checkpoint_every == 0 or self.done
                                                   or self.k == vem.max_steps):
                    save_checkpoint(vem.checkpoint, self._state())
        finally:
            bar.close()

    def _state(self) -> dict:
        return {"fingerprint": self.fingerprint, "seed": self.seed, "k": self.k, "done": self.done,
                "u": self.u.detach().clone(), "family": self.family.state_dict(), "opt": self.opt.state_dict(),
                "gen": self.gen.get_state(), "smooth": self.smooth.state(),
                "rows": torch.tensor(self.rows, dtype=torch.float64).reshape(len(self.rows), len(self.names) + 4),
                "eta2": self.eta2, "repairs": self.repairs,
                "anneal_from": -1 if self.anneal_from is None else self.anneal_from, "anneal_fac": self.anneal_fac}

    def _load(self, st: dict) -> None:
        self.k, self.done, self.repairs = int(st["k"]), bool(st["done"]), int(st["repairs"])
        with torch.no_grad():
            self.u.copy_(st["u"])
        try:
            self.family.load_state_dict(st["family"])
            self.opt.load_state_dict(st["opt"])
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. written before the per-subject reference frame
            raise ModelSpecError(f"vem: checkpoint {self.vem.checkpoint} does not match this version's posterior "
                                 f"family ({str(err).splitlines()[0]}); delete it or fit with resume=False") from None
        self.gen.set_state(st["gen"].cpu())  # generator states are CPU byte tensors on every device
        self.smooth.load(st["smooth"])
        self.rows = [[int(r[0])] + [float(v) for v in r[1:]] for r in st["rows"]]
        self.eta2 = st["eta2"]
        self.anneal_from = None if int(st["anneal_from"]) < 0 else int(st["anneal_from"])
        self.anneal_fac = float(st["anneal_fac"])
        self.messages.append(f"vem: resumed from {self.vem.checkpoint} at step {self.k}")

    # ---------------------------------------------------------------- result
    def _final_draws(self, qd: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
        """(ELBO_i estimates [N], their Monte-Carlo SEs [N]) from ``n_elbo`` draws per subject; posterior means."""
        p = self.pset.from_unconstrained(self.u.detach())
        vals, etas = [], []
        left = self.vem.n_elbo
        while left > 0:
            k = min(left, 200)
            left -= k
            xi = torch.randn(k, self.n, self.q, generator=self.gen, dtype=torch.float64, device=self.dev)
            eta = self._draws(qd, xi)
            vals.append(self.model.log_lik(p, eta, self.mdata) + self.model.log_prior(p, eta, self.mdata.n_occ)
                        - qd.log_prob(eta))
            etas.append(eta)
        return torch.cat(vals, 0), torch.cat(etas, 0)

    def result(self, t0: float):
        vem, model, mdata = self.vem, self.model, self.mdata
        self.family.requires_grad_(False)
        if self.mu0 is not None:  # fold the shift at θ̂ into the family: q_i is then a distribution of η itself
            with torch.no_grad():
                p_now = self.pset.from_unconstrained(self.u.detach())
                self.family.ref_loc.sub_(self._shift(p_now))
                self.mu0 = model.mu_reference(p_now, mdata).detach()
        qd = self.family()
        with torch.no_grad():
            if self.closed and self.eta2 is not None:  # the final M-step for Ω with many draws
                if self.amortized and self.family.flow is None:
                    self._omega_step(None, None, qd)
                else:
                    _, etas = self._final_draws(qd)
                    self.eta2 = torch.einsum("kbq,kbr->bqr", etas, etas) / etas.shape[0]
                    self._omega_step(None, None)
            lw, etas = self._final_draws(qd)
        p_hat = self.pset.from_unconstrained(self.u.detach())
        elbo_i = lw.mean(0)
        se = float(torch.sqrt((lw.var(0) / lw.shape[0]).sum()))
        elbo = float(elbo_i.sum())
        traces = pd.DataFrame(self.rows, columns=["iteration"] + self.names + ["elbo", "elbo_smoothed",
                                                                               "lr_factor"])
        traces = traces.set_index("iteration")
        lin = vem.linearisation
        eta_hat = lin.modes(model, p_hat, mdata, etas.mean(0))
        lik = marginal_loglik(model, p_hat, mdata, method="is", n_samples=vem.n_is, proposal="posterior",
                              posterior=qd, seed=self.seed, eta0=eta_hat, progress=vem.progress)
        converged = self.anneal_from is not None
        change = self.smooth.change()
        if converged:
            msg = (f"vem: converged after {self.k} steps (plateau at step {self.anneal_from}: the mean smoothed "
                   f"ELBO of the last {vem.window} steps differed from the {vem.window} before by less than tol "
                   f"{vem.tol:g} relative; then {self.k - self.anneal_from} annealing steps)")
        else:
            msg = (f"vem: stopped at max_steps = {vem.max_steps} before the smoothed ELBO settled (relative change "
                   f"{change:.2g} between the last two windows of {vem.window} steps, tol {vem.tol:g}); increase "
                   f"max_steps")
            warnings.warn(msg, stacklevel=4)
        messages = [msg] + self.messages
        if self.repairs:
            messages.append(f"vem: the closed-form Omega was repaired to positive definite in {self.repairs} step(s)")
        if lik.m2ll > -2 * elbo + 4 * math.sqrt(se ** 2 + lik.se ** 2) * 2:
            messages.append(f"vem: the IS -2LL ({lik.m2ll:.3f}) is above -2*ELBO ({-2 * elbo:.3f}): the IS "
                            f"estimate with q as the proposal is unreliable (light-tailed q?)")
        if self.amortized:  # the encoder travels with the posterior: q for new subjects without optimisation
            qd.family = self.family
            qd.encoder = self.family.encoder
            qd.for_data = functools.partial(_amortized_q, model, self.family, p_hat)
        res = build_result(vem, model, mdata, p_hat, eta_hat, linearisation=lin, n_iter=self.k, converged=converged,
                           messages=messages, elapsed=time.perf_counter() - t0, seed=self.seed, likelihood=lik,
                           traces=traces, posterior=qd,  # phases: the last step before annealing
                           phases={} if self.anneal_from is None else {"optimise": self.anneal_from},
                           covariance_prefix="FOCE-I linearisation at the VEM estimates: ",
                           check_moved=not vem.fix_population)  # θ held fixed on purpose
        lik_elbo = {"method": "elbo", "elbo": elbo, "m2elbo": -2 * elbo, "se": 2 * se,
                    "n_samples": vem.n_elbo, "posterior": vem.posterior}
        return res.replace(likelihoods={**res.likelihoods, "elbo": lik_elbo}, elapsed_s=time.perf_counter() - t0)
