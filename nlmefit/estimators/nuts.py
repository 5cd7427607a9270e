"""Full-Bayes NUTS (pyro) on the model interface: ``nlmefit.fit(model, data, method="nuts")``.

Three layers, each usable on its own:

1. :func:`sample_nuts` — a model-agnostic sampler core. Given ``log_density(u, z) -> scalar`` (float64) and
   initial values it runs ``pyro.infer.MCMC(pyro.infer.NUTS(potential_fn=-log_density))`` one chain after the
   other (no multiprocessing), each chain with its own seed spawned from ``seed`` by
   :class:`numpy.random.SeedSequence` (so a seeded run is reproducible; the global torch RNG is forked, not
   disturbed). It returns draws ``[chains, draws, ...]``, per-chain divergences, adapted step sizes and
   acceptance rates. :func:`chain_diagnostics` and :func:`posterior_summary` give split R-hat
   (``pyro.ops.stats.split_gelman_rubin``) and ESS (``pyro.ops.stats.effective_sample_size``) per scalar.
2. :class:`JointDensity` — log p(y, η, θ) of a model on the unconstrained population vector ``u``
   (:meth:`ParameterSet.to_unconstrained`) and the random effects. **Non-centred** by default: η_i = L_Ω(θ) z_i,
   z_i ~ N(0, I), L = chol(``model.prior_covariance(p, n_occ)``) and

       log p(u, z | y) = Σ_i log p(y_i | η_i, θ) + Σ_i [log p(η_i | θ) + log|det L|] + log π(u) + const,

   where the bracket is written through ``model.log_prior`` (it equals log N(z_i; 0, I)) so any model works.
   ``centered=True`` samples η directly (Σ_i log p(η_i | θ), no Jacobian). Non-centring removes the funnel
   between Ω and η that makes the centred form diverge when the data say little about a subject's η (sparse
   sampling, the usual population-PK case). When every subject is rich in data the centred form is the better
   conditioned one: on theophylline (11 samples per subject) NUTS needs about 28 gradient evaluations per draw
   centred against about 50 non-centred, at the same adapted step size.
3. :class:`NUTS` — the registered estimator (``method="nuts"``).

Priors
------
By default each unconstrained coordinate gets an independent weakly-informative prior u_k ~ N(u0_k, 2²)
around its initial value u0 (``Model`` initial values, or ``init=``). On the natural scale that is, for a
positive θ (u = log θ), a log-normal with σ_log = 2 around the initial estimate (95 % of the mass within a factor
e^3.9 ≈ 50 of it); for a diagonal Ω the log-SD (u = log √ω) is N(log √ω0, 2²); for the Cholesky factor of an Ω
block the log-diagonal and the off-diagonal entries get N(u0, 2²); σ (u = log SD) is log-normal with σ_log = 2;
a tensor-valued weight is N(w0, 2²) per element. ``priors={"cl": LogNormal(1, 1), "sigma_add": HalfNormal(1)}``
replaces the default prior of the named parameters by a natural-scale ``torch.distributions`` prior; the
density then gains log|dx_k/du_k|, computed by autograd through ``ParameterSet.from_unconstrained`` (θ, σ,
the variance of a 1×1 Ω block and weight elements are elementwise maps, so the diagonal derivative is the whole
Jacobian). A prior on an element of a multi-element Ω block is refused (it would need the Jacobian of the whole
block and a joint prior on it).

Start
-----
``init_strategy="map"`` (default): ``map_steps`` L-BFGS iterations on the joint log density in the non-centred
coordinates over (θ, σ, z) with Ω held at its initial value, from (u0, z = 0); the chains start there (η = L z
when sampling centred), each jittered by N(0, ``init_jitter``²) on every coordinate so that R-hat can see
chains that do not mix. Why not the plain joint mode: in the non-centred coordinates it sends Ω up until the
weak prior stops it (z shrinks towards 0 at no cost; on theophylline ω²_ka ≈ 10 instead of ≈ 0.4), in the
centred ones it is the Ω → 0 singularity. With Ω held the problem is well posed, costs about a second, and
puts θ, σ and the η of every subject where the data put them, so the warm-up is spent adapting to the typical
set rather than travelling to it. ``init_strategy="initial"`` starts at (u0, z = 0).

``init_mass="laplace"`` (default) starts pyro's mass-matrix adaptation from the Laplace covariance at the
starting point (diagonal, or dense with ``full_mass``; :func:`laplace_inverse_mass`, P + q Hessian-vector
products whatever the number of subjects) instead of the identity, falling back to the identity where the
curvature there is not positive definite. The adaptation windows re-estimate it from the draws as usual; the
gain is in the early warm-up, where an identity metric with coordinates whose posterior SDs range from 0.05 to 1
costs trees of depth 8-10.

Result
------
``estimates`` are posterior means of the natural parameters (θ, Ω variances/covariances, σ SDs; every draw mapped
through ``from_unconstrained``, vectorised with ``torch.func.vmap``); ``covariance`` is the posterior covariance of
the free natural parameters (``covariance_kind="posterior"``, so ``se`` are posterior SDs); ``posterior`` is an
:class:`~nlmefit.posteriors.EmpiricalPosterior` of the η draws ``[chains·draws, N, q]`` (natural η) and
``eta_hat`` (``ETA_*`` in ``individual_estimates``, the residual table) their mean; the OFV is an importance-sampling
−2LL at the posterior mean (:func:`nlmefit.marginal.evaluate.marginal_loglik`, ``ofv_samples`` Student-t draws
per subject). ``mcmc`` is the :func:`posterior_summary` table (mean, sd, 2.5/50/97.5 %, split R-hat, ESS bulk,
ESS, MC SE) of the free parameters; its ``attrs`` carry the divergences (total and per chain), step sizes, chain
seeds and wall times, and the η diagnostics (not saved to JSON; the divergences are in ``messages``).
``acceptance`` has pyro's per-chain acceptance rate, ``phases`` the warm-up length. ``converged`` = every sampled
quantity (the parameters and the N·q components of η) has split R-hat < 1.01 and no transition after warm-up
diverged; otherwise a warning says which. :meth:`NUTS.sample` returns the :class:`NUTSPosterior` (population
draws included) without building a FitResult.

Timing (theophylline, ``1cmt_oral`` additive, 12 subjects × 11 samples, OMP_NUM_THREADS=1, torch 2.13 CPU,
pyro 1.9.2): 4 chains × 1000 draws after 1000 warm-up, defaults (non-centred, diagonal mass, seed 7): 1007 s wall,
918 s CPU (≈ 17 min, on a 2-core machine shared with other jobs, load average 1-4); 363 000 log-density gradient
evaluations in all (≈ 45 per iteration, ≈ 2.9 ms each uncontended, of which ≈ 0.5 ms is pyro's per-step
overhead), max split R-hat 1.004, no divergences, ESS 1100-3100 per parameter. The start (mode with Ω held,
Laplace metric) takes ≈ 1.5 s, the IS OFV ≈ 0.1 s. The long reference run (4 × 4000 draws, 3543 s wall under
heavier load) is in ``tests/results/theo_nuts_reference.json``.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import MCMC
from pyro.infer import NUTS as PyroNUTS
from pyro.infer.mcmc.adaptation import BlockMassMatrix
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from scipy.special import ndtri
from scipy.stats import rankdata

from nlmefit.errors import EstimationError, ModelSpecError
from nlmefit.estimators.base import Estimator, register
from nlmefit.marginal.evaluate import marginal_loglik
from nlmefit.marginal.linearisation import Conditional, Linearisation
from nlmefit.posteriors import EmpiricalPosterior
from nlmefit.progress import resolve as resolve_progress
from nlmefit.results.build import build_result

__all__ = ["NUTS", "MCMCSamples", "NUTSPosterior", "JointDensity", "sample_nuts", "chain_seeds",
           "chain_diagnostics", "posterior_summary", "find_map", "laplace_inverse_mass", "omega_coordinates",
           "DEFAULT_PRIOR_SD"]

DEFAULT_PRIOR_SD = 2.0
_RHAT_MAX = 1.01


# ====================================================================== 1. sampler core
@dataclass
class MCMCSamples:
    """Output of :func:`sample_nuts`: draws by site ``[chains, draws, *site_shape]`` and per-chain diagnostics."""

    draws: dict[str, torch.Tensor]
    divergences: list[list[int]]  # post-warm-up iteration indices of divergent transitions, per chain
    step_size: list[float]  # adapted step size per chain
    acceptance_rate: list[float]
    seeds: list[int]
    wall_s: list[float]
    n_evals: list[int] = field(default_factory=list)  # log-density (+ gradient) evaluations per chain

    @property
    def num_chains(self) -> int:
        return len(self.seeds)

    @property
    def n_divergent(self) -> int:
        return int(sum(len(d) for d in self.divergences))


class _InitialMassMatrix(BlockMassMatrix):
    """pyro's block mass matrix, but the warm-up starts from a given inverse mass matrix instead of I."""

    def __init__(self, sites: tuple, inverse_mass: torch.Tensor) -> None:
        super().__init__()
        self._initial_key = tuple(sorted(sites))
        self._initial = inverse_mass

    def configure(self, mass_matrix_shape, adapt_mass_matrix=True, options={}):  # noqa: B006 - pyro's signature
        super().configure(mass_matrix_shape, adapt_mass_matrix, options=options)
        shape = mass_matrix_shape.get(self._initial_key)
        m = self._initial.to(**options) if options else self._initial
        if shape is not None and tuple(m.shape) == tuple(shape):
            self.inverse_mass_matrix = {self._initial_key: m}


def chain_seeds(seed: int, num_chains: int) -> list[int]:
    """Independent per-chain seeds spawned from ``seed`` (``numpy.random.SeedSequence``)."""
    return [int(s.generate_state(1, np.uint32)[0]) for s in np.random.SeedSequence(int(seed)).spawn(num_chains)]


def _stack_init(x: torch.Tensor, num_chains: int, site_ndim: int | None) -> list[torch.Tensor]:
    """One initial value per chain from a shared ``[...]`` or per-chain ``[C, ...]`` tensor."""
    if site_ndim is not None and x.dim() == site_ndim + 1:
        if x.shape[0] != num_chains:
            raise ValueError(f"per-chain initial values have {x.shape[0]} chains, expected {num_chains}")
        return [x[c].detach().clone() for c in range(num_chains)]
    return [x.detach().clone() for _ in range(num_chains)]


def sample_nuts(
    log_density: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    u0: torch.Tensor,
    z0: torch.Tensor,
    *,
    num_chains: int = 4,
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    seed: int = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    full_mass: bool = False,
    inverse_mass: torch.Tensor | None = None,
    progress: bool | None = None,
) -> MCMCSamples:
    """Run NUTS on ``log_density(u [P], z [N, q]) -> scalar`` chain by chain.

    ``u0`` is ``[P]`` (shared) or ``[num_chains, P]``; ``z0`` is ``[N, q]`` or ``[num_chains, N, q]``. A site with no
    elements (``P = 0``) is not sampled (its draws are ``[C, D, 0]``) and ``log_density`` receives it empty.
    ``full_mass`` adapts one dense mass matrix over all coordinates, else a diagonal one; ``inverse_mass`` (the
    diagonal ``[D]`` or, with ``full_mass``, ``[D, D]`` over the flattened (u, z) coordinates of the sampled sites)
    replaces pyro's identity as the metric the warm-up starts from (it is still adapted). Each chain gets its own
    kernel (own adaptation) and its own seed from :func:`chain_seeds`; the global torch RNG state is restored
    afterwards. ``progress`` shows pyro's progress bar (None: automatic, :func:`nlmefit.progress.resolve`)."""
    if num_chains < 1 or num_samples < 1 or warmup_steps < 0:
        raise ValueError("need num_chains >= 1, num_samples >= 1 and warmup_steps >= 0")
    u_shape = tuple(u0.shape[-1:]) if u0.dim() else (0,)
    site_shapes = {"u": u_shape, "z": tuple(z0.shape[-2:])}
    inits = {"u": _stack_init(u0, num_chains, 1), "z": _stack_init(z0, num_chains, 2)}
    active = [k for k in ("u", "z") if math.prod(site_shapes[k]) > 0]
    if not active:
        raise ValueError("nothing to sample: both u and z are empty")
    like = inits[active[0]][0]
    empty = {k: torch.zeros(site_shapes[k], dtype=like.dtype, device=like.device) for k in ("u", "z")}

    calls = [0]

    def potential(params: dict) -> torch.Tensor:
        calls[0] += 1
        lp = log_density(params.get("u", empty["u"]), params.get("z", empty["z"]))
        return -torch.where(torch.isnan(lp), torch.full_like(lp, -math.inf), lp)

    seeds = chain_seeds(seed, num_chains)
    show = resolve_progress(progress)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("u", "z")}
    divergences, step_sizes, acc_rates, walls, evals = [], [], [], [], []
    for c, s in enumerate(seeds):
        t0 = time.perf_counter()
        calls[0] = 0
        devices = [like.device] if like.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s)
            kernel = PyroNUTS(potential_fn=potential, target_accept_prob=target_accept_prob,
                              max_tree_depth=max_tree_depth, full_mass=bool(full_mass), adapt_step_size=True,
                              adapt_mass_matrix=True)
            if inverse_mass is not None:
                kernel.mass_matrix_adapter = _InitialMassMatrix(tuple(active), inverse_mass.detach())
            mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                        initial_params={k: inits[k][c] for k in active}, num_chains=1,
                        disable_progbar=not show)
            with pyro.validation_enabled(False):
                mcmc.run()
        samples = mcmc.get_samples(group_by_chain=True)
        for k in ("u", "z"):
            if k in samples:
                out[k].append(samples[k][0].detach())
            else:
                out[k].append(torch.zeros((num_samples, *site_shapes[k]), dtype=like.dtype, device=like.device))
        diag = mcmc.diagnostics()  # per-chain kernel diagnostics keyed "chain 0"
        divergences.append([int(i) for i in diag.get("divergences", {}).get("chain 0", [])])
        acc_rates.append(float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))))
        step_sizes.append(float(kernel.step_size))
        walls.append(time.perf_counter() - t0)
        evals.append(calls[0])
    draws = {k: torch.stack(v) for k, v in out.items()}
    return MCMCSamples(draws, divergences, step_sizes, acc_rates, seeds, walls, evals)


# ---------------------------------------------------------------------- diagnostics
def _rank_normalise(x: torch.Tensor) -> torch.Tensor:
    """Rank-normalised draws (Vehtari et al. 2021): Φ⁻¹((r − 3/8)/(S + 1/4)) over all chains and draws."""
    c, d = x.shape[:2]
    flat = x.detach().cpu().double().reshape(c * d, -1).numpy()
    r = rankdata(flat, axis=0, method="average")
    z = ndtri((r - 0.375) / (c * d + 0.25))
    return torch.as_tensor(z.reshape(x.shape), dtype=torch.float64)


def chain_diagnostics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-scalar diagnostics of draws ``[chains, draws, ...]``: ``r_hat`` (pyro's split Gelman–Rubin),
    ``ess`` (pyro's ESS of the raw draws: the one that governs the MC error of the mean) and ``ess_bulk`` (ESS
    of the rank-normalised draws). NaN where undefined (constant quantity, fewer than 4 draws)."""
    x = x.detach().cpu().double()
    shape = x.shape[2:]
    nan = torch.full(shape, float("nan"), dtype=torch.float64)
    if x.shape[1] < 4:
        return {"r_hat": nan.clone(), "ess": nan.clone(), "ess_bulk": nan.clone()}
    const = (x.amax((0, 1)) - x.amin((0, 1))) == 0
    if bool(const.any()):  # one constant column makes pyro's ESS NaN for every column: stand in a ramp for it
        c, d = x.shape[:2]
        ramp = torch.arange(c * d, dtype=x.dtype).reshape(c, d, *([1] * len(shape)))
        x = torch.where(const, ramp, x)
    with np.errstate(all="ignore"):
        r_hat = split_gelman_rubin(x, chain_dim=0, sample_dim=1)
        ess = effective_sample_size(x, chain_dim=0, sample_dim=1)
        ess_bulk = effective_sample_size(_rank_normalise(x), chain_dim=0, sample_dim=1)
    return {k: torch.where(const, nan, v.double()) for k, v in
            {"r_hat": r_hat, "ess": ess, "ess_bulk": ess_bulk}.items()}


def posterior_summary(draws: Mapping[str, torch.Tensor | np.ndarray], divergences: int | None = None
                      ) -> pd.DataFrame:
    """One row per scalar quantity ``name -> draws [chains, draws]``: ``mean``, ``sd``, ``q2.5``, ``q50``,
    ``q97.5``, ``r_hat`` (split R-hat), ``ess_bulk`` (rank-normalised ESS), ``ess`` (raw ESS), ``mcse``
    (MC SE of the mean = sd/√ess). ``divergences`` (total after warm-up), when given, lands in ``df.attrs``."""
    names = list(draws)
    if not names:
        return pd.DataFrame(columns=["mean", "sd", "q2.5", "q50", "q97.5", "r_hat", "ess_bulk", "ess", "mcse"])
    x = torch.stack([torch.as_tensor(np.asarray(draws[n]) if not torch.is_tensor(draws[n]) else draws[n])
                     .detach().cpu().double() for n in names], -1)  # [C, D, K]
    flat = x.reshape(-1, x.shape[-1])
    diag = chain_diagnostics(x)
    sd = flat.std(0, unbiased=True) if flat.shape[0] > 1 else torch.full((len(names),), float("nan"))
    q = torch.quantile(flat, torch.tensor([0.025, 0.5, 0.975], dtype=torch.float64), dim=0)
    df = pd.DataFrame({
        "mean": flat.mean(0).numpy(), "sd": sd.numpy(), "q2.5": q[0].numpy(), "q50": q[1].numpy(),
        "q97.5": q[2].numpy(), "r_hat": diag["r_hat"].numpy(), "ess_bulk": diag["ess_bulk"].numpy(),
        "ess": diag["ess"].numpy(),
    }, index=names)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["mcse"] = df["sd"] / np.sqrt(df["ess"])
    if divergences is not None:
        df.attrs["divergences"] = int(divergences)
    return df


# ====================================================================== 2. the joint density
def _prior_support_ok(d: torch.distributions.Distribution, lo: float, hi: float, x0: float) -> bool:
    """Does the support of ``d`` cover the parameter's range (lo, hi)? Checked at points near both ends."""
    span = max(1.0, abs(x0))
    pts = [x0]
    pts.append(lo + 1e-9 * span if math.isfinite(lo) else x0 - 1e6 * span)
    pts.append(hi - 1e-9 * span if math.isfinite(hi) else x0 + 1e6 * span)
    if math.isfinite(lo) and math.isfinite(hi):
        pts.append(0.5 * (lo + hi))
    t = torch.tensor(pts, dtype=torch.float64)
    try:
        return bool(d.support.check(t).all())
    except (NotImplementedError, AttributeError, RuntimeError, TypeError):
        return True  # a support torch cannot check (custom distribution): the log_prob at the draws decides


class JointDensity:
    """log p(u, z, y) of ``model`` on ``data`` (see the module docstring), a callable ``(u, z) -> scalar``.

    ``sample_population=False`` fixes u at ``u0`` (θ at its initial values): the density is then the exact
    conditional posterior of the random effects, Σ_i log p(η_i | y_i, θ) + const, and ``u`` is ignored.
    """

    def __init__(self, model, data, *, centered: bool = False, priors: Mapping | None = None,
                 sample_population: bool = True, prior_sd: float = DEFAULT_PRIOR_SD,
                 p0=None) -> None:
        self.model = model
        self.data = data
        self.pset = pset = model.parameters
        self.centered = bool(centered)
        self.sample_population = bool(sample_population)
        self.n_occ = int(getattr(data, "n_occ", 0) or 0)
        dt, dev = data.y.dtype, data.y.device
        self.p0 = pset.initial(dt, dev) if p0 is None else p0
        self.u0 = pset.to_unconstrained(self.p0).detach()
        self.prior_sd = float(prior_sd)
        if not self.centered and not hasattr(model, "prior_covariance"):
            raise ModelSpecError(f"the non-centred parametrisation needs model.prior_covariance(p, n_occ); "
                                 f"{type(model).__name__} has none: use centered=True")
        self.names = list(pset.natural_names)
        self.prior_idx, self.prior_dists = self._check_priors(dict(priors or {}))
        default = torch.ones(len(self.u0), dtype=torch.bool, device=dev)
        if self.prior_idx:
            default[torch.tensor(self.prior_idx, device=dev)] = False
        self._default_mask = default
        if not self.centered:
            with torch.no_grad():
                try:
                    torch.linalg.cholesky(model.prior_covariance(self.p0, self.n_occ))
                except RuntimeError:
                    raise ModelSpecError("the random-effect covariance is singular at the initial values (a FIXed "
                                         "zero variance?); the non-centred parametrisation needs it positive "
                                         "definite") from None

    # ---------------------------------------------------------------- priors
    def valid_prior_names(self) -> list[str]:
        pset = self.pset
        multi = set()
        for spec, prefix in ((pset.omega, "omega"), (getattr(pset, "omega_iov", None), "omega_iov")):
            if spec is None:
                continue
            for name, _, _, b in pset._omega_entries(spec, prefix):
                if len(spec.block_list[b]) > 1:
                    multi.add(name)
        return [n for n in self.names if n not in multi]

    def _bounds(self, name: str) -> tuple[float, float, float]:
        pset = self.pset
        x0 = float(pset.natural_dict(self.p0)[name])
        if name in pset.theta:
            p = pset.theta[name]
            return p.lower, p.upper, x0
        if name.startswith("sigma_") and name[6:] in pset.sigma:
            p = pset.sigma[name[6:]]
            return p.lower, p.upper, x0
        if name.startswith("omega"):
            return 0.0, math.inf, x0
        return -math.inf, math.inf, x0

    def _check_priors(self, priors: dict) -> tuple[list[int], list]:
        if not priors:
            return [], []
        valid = self.valid_prior_names()
        every = list(self.pset.natural_dict(self.p0))
        idx, dists = [], []
        for name, d in priors.items():
            if name not in self.names:
                if name in every:
                    raise ModelSpecError(f"prior on {name!r}, which is FIXed (not sampled); priors can be given "
                                         f"for {valid}")
                raise ModelSpecError(f"prior on unknown parameter {name!r}; priors can be given for {valid}")
            if name not in valid:
                raise ModelSpecError(f"prior on {name!r}, an element of a multi-element omega block: a natural-"
                                     f"scale prior on one entry of a covariance block is not supported (the "
                                     f"block's Cholesky coordinates keep their default N(u0, "
                                     f"{self.prior_sd:g}²) prior); priors can be given for {valid}")
            if not isinstance(d, torch.distributions.Distribution):
                raise ModelSpecError(f"prior on {name!r} must be a torch.distributions.Distribution, "
                                     f"got {type(d).__name__}")
            if tuple(d.batch_shape) != () or tuple(d.event_shape) != ():
                raise ModelSpecError(f"prior on {name!r} must be a scalar distribution, got batch_shape "
                                     f"{tuple(d.batch_shape)} and event_shape {tuple(d.event_shape)}")
            lo, hi, x0 = self._bounds(name)
            if not _prior_support_ok(d, lo, hi, x0):
                raise ModelSpecError(f"prior on {name!r}: its support {d.support} does not cover the parameter's "
                                     f"range ({lo}, {hi})")
            with torch.no_grad():
                lp0 = d.log_prob(torch.tensor(x0, dtype=torch.float64))
            if not bool(torch.isfinite(lp0)):
                raise ModelSpecError(f"prior on {name!r} has zero density at the initial value {x0}")
            idx.append(self.names.index(name))
            dists.append(d)
        # the Jacobian correction uses d x_k / d u_k only: check that x_k depends on u_k alone
        u = self.u0.clone().requires_grad_(True)
        with torch.enable_grad():
            x = self.pset.to_natural_vector(self.pset.from_unconstrained(u))
            for k in idx:
                (g,) = torch.autograd.grad(x[k], u, retain_graph=True)
                g = g.detach().clone()
                gk = float(g[k])
                g[k] = 0.0
                if not (gk != 0.0 and bool((g == 0).all())):
                    raise ModelSpecError(f"prior on {self.names[k]!r}: its natural value is not an elementwise "
                                         f"function of one unconstrained coordinate")
        return idx, dists

    def log_prior_u(self, u: torch.Tensor) -> torch.Tensor:
        """log π(u): N(u0, prior_sd²) per coordinate, natural-scale priors (with log|dx/du|) where given."""
        if u.numel() == 0:
            return torch.zeros((), dtype=self.u0.dtype, device=self.u0.device)
        zs = (u - self.u0) / self.prior_sd
        lp_def = -0.5 * zs * zs - math.log(self.prior_sd) - 0.5 * math.log(2 * math.pi)
        total = torch.where(self._default_mask, lp_def, torch.zeros_like(lp_def)).sum()
        if not self.prior_idx:
            return total
        with torch.enable_grad():
            uu = u if u.requires_grad else u.detach().requires_grad_(True)
            x = self.pset.to_natural_vector(self.pset.from_unconstrained(uu))
            sel = x[self.prior_idx]
            (g,) = torch.autograd.grad(sel.sum(), uu, create_graph=u.requires_grad)
        jac = g[self.prior_idx]
        if not u.requires_grad:
            sel, jac = sel.detach(), jac.detach()
        for j, d in enumerate(self.prior_dists):
            total = total + d.log_prob(sel[j]).to(total.dtype) + torch.log(torch.abs(jac[j]))
        return total

    # ---------------------------------------------------------------- the density
    def params(self, u: torch.Tensor):
        return self.pset.from_unconstrained(u) if self.sample_population else self.p0

    def eta(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """η [N, q] from the sampled coordinates."""
        if self.centered:
            return z
        L = torch.linalg.cholesky(self.model.prior_covariance(self.params(u), self.n_occ))
        return z @ L.transpose(-1, -2)

    def __call__(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        p = self.params(u)
        if self.centered:
            eta = z
            log_jac = 0.0
        else:
            cov = self.model.prior_covariance(p, self.n_occ)
            L, info = torch.linalg.cholesky_ex(cov)
            if bool(info != 0):  # Ω numerically singular far out in a trajectory: zero density, not an error
                return (u * 0).sum() + (z * 0).sum() - math.inf  # still on the graph: NUTS takes its gradient
            eta = z @ L.transpose(-1, -2)
            log_jac = z.shape[-2] * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        ll = self.model.log_lik(p, eta, self.data).sum()
        lp = self.model.log_prior(p, eta, self.n_occ).sum() + log_jac
        out = ll + lp
        if self.sample_population:
            out = out + self.log_prior_u(u)
        return out

    # ---------------------------------------------------------------- draws -> natural scale
    def natural_and_cholesky(self, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Free natural parameters [S, P] and chol(prior covariance) [S, q, q] for unconstrained draws [S, P];
        vectorised with ``torch.func.vmap`` where the parameter maps allow it, else one draw at a time."""
        pset, model, n_occ = self.pset, self.model, self.n_occ

        def one(u):
            p = pset.from_unconstrained(u)
            x = pset.to_natural_vector(p)
            L = torch.linalg.cholesky(model.prior_covariance(p, n_occ)) if hasattr(model, "prior_covariance") \
                else torch.zeros(0, 0, dtype=u.dtype, device=u.device)
            return x, L

        U = U.detach()
        with torch.no_grad():
            try:
                return torch.func.vmap(one)(U)
            except Exception:  # noqa: BLE001 - any op without a batching rule: fall back to a loop
                xs, Ls = zip(*(one(u) for u in U))
                return torch.stack(xs), torch.stack(Ls)


def omega_coordinates(pset) -> list[int]:
    """Positions in u of the Ω (and Ω_IOV) Cholesky coordinates."""
    names = set(n for spec, pre in ((pset.omega, "omega"), (getattr(pset, "omega_iov", None), "omega_iov"))
                if spec is not None for n, *_ in pset._omega_entries(spec, pre))
    return [k for k, n in enumerate(pset.natural_names) if n in names]


def find_map(density: JointDensity, u0: torch.Tensor, z0: torch.Tensor, steps: int = 200,
             hold: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mode of ``density`` over (u, z) by L-BFGS with a strong-Wolfe line search, the u coordinates in ``hold``
    (and all of u when θ is held fixed) kept at ``u0``; falls back to the start where the optimiser fails.
    Returns (u, z, info)."""
    P = u0.numel() if density.sample_population else 0
    free = torch.tensor([k for k in range(P) if k not in set(hold)], dtype=torch.long, device=u0.device)
    Pf = int(free.numel())
    x0 = torch.cat([u0.reshape(-1)[free], z0.reshape(-1)]).detach().clone()

    def unpack(x):
        u = u0.index_put((free,), x[:Pf]) if Pf else u0
        return u, x[Pf:].reshape(z0.shape)

    def f(x):
        return -density(*unpack(x))

    with torch.no_grad():
        f0 = float(f(x0))
    if not math.isfinite(f0):
        raise EstimationError("the joint log density is not finite at the initial values")
    info = {"start": -f0, "iterations": 0, "used": False}
    if steps <= 0:
        return u0, z0, info
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=int(steps), history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        val = f(x)
        if not torch.isfinite(val):
            return val
        val.backward()
        return val

    try:
        with torch.enable_grad():
            opt.step(closure)
    except (RuntimeError, ValueError) as err:  # e.g. a non-PD covariance on the way
        info["error"] = str(err)
    xf = x.detach()
    with torch.no_grad():
        f1 = float(f(xf))
    info["iterations"] = int(opt.state[opt._params[0]].get("n_iter", 0))
    if math.isfinite(f1) and f1 <= f0:
        info.update(value=-f1, used=True)
        u, z = unpack(xf)
        return u.detach(), z.detach(), info
    return u0, z0, info


def laplace_inverse_mass(density: Callable, u: torch.Tensor, z: torch.Tensor, full: bool = False,
                         max_population: int = 1000) -> torch.Tensor | None:
    """Inverse mass matrix from the curvature of ``-density`` at (u, z): the Laplace covariance (diagonal, or
    dense with ``full``) over the flattened (u, z), or None where the Hessian is not positive definite there.

    Uses the subject-separable structure of the joint density (z_i meets z_j only through u): the Hessian comes
    from P + q Hessian-vector products whatever N, and its inverse from N q×q blocks and a P×P Schur complement.
    An empty ``u`` (population held fixed) gives the block-diagonal z part only; more than ``max_population``
    population coordinates (tensor-valued weights) give None rather than that many Hessian-vector products."""
    P = u.numel()
    n, q = z.shape
    if P > max_population:
        return None
    D = P + n * q
    x = torch.cat([u.reshape(-1), z.reshape(-1)]).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        f = -density(x[:P], x[P:].reshape(n, q))
        if not bool(torch.isfinite(f)):
            return None
        (g,) = torch.autograd.grad(f, x, create_graph=True)
        cols_u = []
        for k in range(P):
            (h,) = torch.autograd.grad(g[k], x, retain_graph=True)
            cols_u.append(h)
        cols_z = []
        for j in range(q):
            v = torch.zeros(D, dtype=x.dtype, device=x.device)
            v[P + j::q] = 1.0
            (h,) = torch.autograd.grad(g, x, v, retain_graph=True)
            cols_z.append(h)
    Hu = torch.stack(cols_u, 1).detach() if P else torch.zeros(D, 0, dtype=x.dtype, device=x.device)
    Huu = 0.5 * (Hu[:P] + Hu[:P].T)
    B = Hu[P:].reshape(n, q, P)  # d²f / dz_i du
    A = torch.stack([c.detach()[P:].reshape(n, q) for c in cols_z], -1)  # [N, q(row), q(col j)]
    A = 0.5 * (A + A.transpose(-1, -2))
    if not (torch.isfinite(A).all() and torch.isfinite(Hu).all()):
        return None
    LA, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):
        return None
    AinvB = torch.cholesky_solve(B, LA)  # [N, q, P]
    S = Huu - torch.einsum("nqp,nqr->pr", B, AinvB)
    LS, info = torch.linalg.cholesky_ex(S)
    if P and int(info) != 0:
        return None
    Cuu = torch.cholesky_inverse(LS) if P else S
    Ainv = torch.cholesky_inverse(LA)
    if full:
        W = torch.cat([torch.eye(P, dtype=x.dtype, device=x.device), -AinvB.reshape(n * q, P)], 0)  # [D, P]
        C = W @ Cuu @ W.T
        C[P:, P:] += torch.block_diag(*Ainv)
        C = 0.5 * (C + C.T)
        return C if bool(torch.linalg.cholesky_ex(C)[1] == 0) else None
    dz = torch.diagonal(Ainv, dim1=-2, dim2=-1) + torch.einsum("nqp,pr,nqr->nq", AinvB, Cuu, AinvB)
    d = torch.cat([torch.diagonal(Cuu), dz.reshape(-1)])
    return d if bool((d > 0).all() and torch.isfinite(d).all()) else None


# ====================================================================== 3. the estimator
@dataclass
class NUTSPosterior:
    """Everything :meth:`NUTS.sample` produced, before it becomes a FitResult."""

    samples: MCMCSamples
    names: list[str]  # free natural parameters
    natural: torch.Tensor  # [C, D, P] free natural parameters per draw
    eta: torch.Tensor  # [C, D, N, q]
    summary: pd.DataFrame  # per free natural parameter (empty when θ was held fixed)
    eta_diagnostics: dict  # max_r_hat, min_ess_bulk, min_ess over the N·q components of η
    estimates: dict[str, float]  # posterior means by reporting name (fixed parameters at their values)
    p_mean: object  # Params at the posterior means
    eta_mean: torch.Tensor  # [N, q]
    init: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def eta_draws(self) -> torch.Tensor:
        """η draws flattened over chains, [C·D, N, q]."""
        c, d = self.eta.shape[:2]
        return self.eta.reshape(c * d, *self.eta.shape[2:])

    @property
    def max_r_hat(self) -> float:
        vals = [self.eta_diagnostics.get("max_r_hat", float("nan"))]
        if len(self.summary):
            vals.append(float(np.nanmax(self.summary["r_hat"].to_numpy())) if self.summary["r_hat"].notna().any()
                        else float("nan"))
        vals = [v for v in vals if math.isfinite(v)]
        return max(vals) if vals else float("nan")

    def covariance(self) -> pd.DataFrame:
        """Posterior covariance of the free natural parameters."""
        x = self.natural.reshape(-1, self.natural.shape[-1]).cpu().numpy()
        cov = np.cov(x, rowvar=False, ddof=1).reshape(len(self.names), len(self.names))
        return pd.DataFrame(cov, index=self.names, columns=self.names)


@register("nuts")
class NUTS(Estimator):
    """Full-Bayes NUTS through pyro (see the module docstring for the density, priors, start and result).

    Parameters
    ----------
    num_chains, num_samples, warmup_steps : chains (run one after the other), kept draws and warm-up
        iterations per chain.
    target_accept_prob, max_tree_depth : NUTS step-size adaptation target and tree-depth cap.
    full_mass : adapt a dense mass matrix over (u, z) instead of a diagonal one.
    centered : sample η directly instead of the non-centred z (η = L_Ω z).
    priors : ``{reporting name: torch.distributions.Distribution}`` natural-scale priors replacing the default
        N(u0, 2²) on the unconstrained coordinate (θ, σ, weights, variances of 1×1 Ω blocks).
    sample_population : False holds θ (and Ω, σ) at the initial values and samples η | y, θ only.
    init_strategy : ``"map"`` (default: chains start at the mode over (θ, σ, z) with Ω held at its initial value,
        ``map_steps`` L-BFGS iterations) or ``"initial"`` (u0, z = 0).
    init_jitter : SD of the per-chain N(0, ·) jitter added to every starting coordinate.
    init_mass : ``"laplace"`` (default: the warm-up starts from the Laplace covariance at the start) or
        ``"identity"`` (pyro's default).
    ofv_samples : importance-sampling draws per subject for the OFV at the posterior mean.
    covariance : must be None: the reported covariance is the posterior one (no linearisation).
    device : where the data and the sampler live.
    progress : show pyro's progress bar (per chain) and one over the importance draws of the OFV: None (default)
        when stderr is a terminal or in a notebook, True, False (:mod:`nlmefit.progress`).
    """

    def __init__(
        self,
        num_chains: int = 4,
        num_samples: int = 1000,
        warmup_steps: int = 1000,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        full_mass: bool = False,
        centered: bool = False,
        priors: Mapping[str, torch.distributions.Distribution] | None = None,
        sample_population: bool = True,
        init_strategy: str = "map",
        init_jitter: float = 0.1,
        map_steps: int = 200,
        init_mass: str = "laplace",
        ofv_samples: int = 2000,
        device: str | torch.device | None = None,
        covariance: str | None = None,
        progress: bool | None = None,
    ) -> None:
        def integer(name, v, lo):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ModelSpecError(f"nuts: {name} must be an integer >= {lo}, got {v!r}")
            return int(v)

        self.num_chains = integer("num_chains", num_chains, 1)
        self.num_samples = integer("num_samples", num_samples, 4)
        self.warmup_steps = integer("warmup_steps", warmup_steps, 0)
        self.max_tree_depth = integer("max_tree_depth", max_tree_depth, 1)
        self.map_steps = integer("map_steps", map_steps, 0)
        self.ofv_samples = integer("ofv_samples", ofv_samples, 10)
        if not isinstance(target_accept_prob, (int, float)) or not 0 < float(target_accept_prob) < 1:
            raise ModelSpecError(f"nuts: target_accept_prob must be in (0, 1), got {target_accept_prob!r}")
        for name, v in (("full_mass", full_mass), ("centered", centered), ("sample_population", sample_population),
                        ("progress", False if progress is None else progress)):
            if not isinstance(v, (bool, np.bool_)):
                raise ModelSpecError(f"nuts: {name} must be True or False, got {v!r}")
        if init_strategy not in ("map", "initial"):
            raise ModelSpecError(f"nuts: init_strategy must be 'map' or 'initial', got {init_strategy!r}")
        if init_mass not in ("laplace", "identity"):
            raise ModelSpecError(f"nuts: init_mass must be 'laplace' or 'identity', got {init_mass!r}")
        if not isinstance(init_jitter, (int, float)) or not (math.isfinite(init_jitter) and init_jitter >= 0):
            raise ModelSpecError(f"nuts: init_jitter must be a finite number >= 0, got {init_jitter!r}")
        if covariance is not None:
            raise ModelSpecError(f"nuts: covariance must be None (the result carries the posterior covariance of "
                                 f"the parameters; for linearised standard errors fit with method='focei'), "
                                 f"got {covariance!r}")
        if priors is not None:
            if not isinstance(priors, Mapping):
                raise ModelSpecError(f"nuts: priors must be a dict {{name: torch.distributions.Distribution}}, "
                                     f"got {type(priors).__name__}")
            for k, d in priors.items():
                if not isinstance(d, torch.distributions.Distribution):
                    raise ModelSpecError(f"nuts: prior on {k!r} must be a torch.distributions.Distribution, "
                                         f"got {type(d).__name__}")
        self.target_accept_prob = float(target_accept_prob)
        self.full_mass = bool(full_mass)
        self.centered = bool(centered)
        self.priors = None if priors is None else dict(priors)
        self.sample_population = bool(sample_population)
        self.init_strategy = init_strategy
        self.init_jitter = float(init_jitter)
        self.init_mass = init_mass
        self.device = device
        self.covariance = None
        self.progress = None if progress is None else bool(progress)

    @property
    def linearisation(self) -> Linearisation:
        """FOCE-I at the posterior mean: what the residual table (PRED, CWRES …) uses. NUTS has no objective of
        its own; its OFV is an importance-sampling value and its covariance the posterior one."""
        return Conditional("focei")

    # ------------------------------------------------------------------ sampling
    def density(self, model, mdata) -> JointDensity:
        return JointDensity(model, mdata, centered=self.centered, priors=self.priors,
                            sample_population=self.sample_population)

    def sample(self, model, data, init=None, seed: int | None = None) -> NUTSPosterior:
        """Run the chains and summarise them (everything but the FitResult)."""
        t0 = time.perf_counter()
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        model, mdata = self.bind(model, data, init)
        dens = self.density(model, mdata)
        pset = model.parameters
        dt, dev = mdata.y.dtype, mdata.y.device
        n, q = mdata.n_subjects, mdata.q
        u0 = dens.u0
        z0 = torch.zeros(n, q, dtype=dt, device=dev)
        info = {"strategy": self.init_strategy}
        if self.init_strategy == "map":
            # the mode in the non-centred coordinates (well defined), converted to η when sampling centred
            nc = dens if not dens.centered else JointDensity(
                model, mdata, centered=False, priors=self.priors, sample_population=self.sample_population,
                p0=dens.p0)
            um, zm, info_map = find_map(nc, u0, z0, self.map_steps, hold=omega_coordinates(pset))
            info.update({f"map_{k}": v for k, v in info_map.items() if k != "error"})
            u_start = um
            z_start = nc.eta(um, zm).detach() if dens.centered else zm
        else:
            u_start, z_start = u0, z0
            with torch.no_grad():
                if not math.isfinite(float(dens(u0, z0))):
                    raise EstimationError("nuts: the joint log density is not finite at the initial values")
        C = self.num_chains
        P = u0.numel() if self.sample_population else 0
        jit = torch.Generator(device="cpu").manual_seed(int(np.random.SeedSequence([int(seed), 1])
                                                            .generate_state(1, np.uint32)[0]))
        U0 = u_start.reshape(1, -1).repeat(C, 1)[:, :P]
        Z0 = z_start.unsqueeze(0).repeat(C, 1, 1)
        if self.init_jitter > 0:
            U0 = U0 + self.init_jitter * torch.randn(U0.shape, generator=jit, dtype=dt).to(dev)
            Z0 = Z0 + self.init_jitter * torch.randn(Z0.shape, generator=jit, dtype=dt).to(dev)
        U0 = U0 if P else torch.zeros(C, 0, dtype=dt, device=dev)
        inv_mass = None
        if self.init_mass == "laplace":
            inv_mass = laplace_inverse_mass(dens, u_start.reshape(-1)[:P], z_start, full=self.full_mass)
            info["laplace_metric"] = inv_mass is not None
        samples = sample_nuts(dens, U0, Z0, num_chains=C, num_samples=self.num_samples,
                              warmup_steps=self.warmup_steps, seed=seed,
                              target_accept_prob=self.target_accept_prob, max_tree_depth=self.max_tree_depth,
                              full_mass=self.full_mass, inverse_mass=inv_mass, progress=self.progress)
        return self.summarise(dens, samples, info, time.perf_counter() - t0)

    def summarise(self, dens: JointDensity, samples: MCMCSamples, init_info: dict | None = None,
                  wall_s: float = 0.0) -> NUTSPosterior:
        pset = dens.pset
        C, D = samples.draws["z"].shape[:2]
        names = list(dens.names)
        if dens.sample_population:
            U = samples.draws["u"].reshape(C * D, -1)
            X, L = dens.natural_and_cholesky(U)
        else:
            X0, L0 = dens.natural_and_cholesky(dens.u0.unsqueeze(0))
            X, L = X0.expand(C * D, -1), L0.expand(C * D, *L0.shape[1:])
        Z = samples.draws["z"].reshape(C * D, *samples.draws["z"].shape[2:])
        eta = Z if dens.centered else Z @ L.transpose(-1, -2)
        X = X.reshape(C, D, -1)
        eta = eta.reshape(C, D, *eta.shape[1:])
        if dens.sample_population:
            summary = posterior_summary({nm: X[..., k] for k, nm in enumerate(names)}, samples.n_divergent)
        else:
            summary = posterior_summary({})
        ed = chain_diagnostics(eta)
        finite = lambda t: t[torch.isfinite(t)]  # noqa: E731
        eta_diag = {
            "max_r_hat": float(finite(ed["r_hat"]).max()) if finite(ed["r_hat"]).numel() else float("nan"),
            "min_ess_bulk": float(finite(ed["ess_bulk"]).min()) if finite(ed["ess_bulk"]).numel() else float("nan"),
            "min_ess": float(finite(ed["ess"]).min()) if finite(ed["ess"]).numel() else float("nan"),
        }
        estimates = pset.natural_dict(dens.p0)
        means = X.reshape(C * D, -1).mean(0).cpu().tolist()
        estimates.update(dict(zip(names, means)))
        p_mean = pset.params_from_dict(estimates, dtype=dens.u0.dtype, device=dens.u0.device)
        estimates = pset.natural_dict(p_mean)
        return NUTSPosterior(samples, names, X, eta, summary, eta_diag, estimates, p_mean, eta.mean((0, 1)),
                             dict(init_info or {}), wall_s)

    # ------------------------------------------------------------------ fit
    def fit(self, model, data, init=None, seed: int | None = None):
        """Sample, then build the FitResult (posterior means, posterior covariance, η draws, IS OFV)."""
        t0 = time.perf_counter()
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2 ** 31))
        model, mdata = self.bind(model, data, init)
        post = self.sample(model, mdata, seed=seed)
        return self.result(model, mdata, post, seed, t0)

    def convergence(self, post: NUTSPosterior) -> tuple[bool, list[str]]:
        msgs = []
        rmax = post.max_r_hat
        ndiv = post.samples.n_divergent
        ok = math.isfinite(rmax) and rmax < _RHAT_MAX and ndiv == 0
        if not (math.isfinite(rmax) and rmax < _RHAT_MAX):
            bad = []
            if len(post.summary):
                bad = list(post.summary.index[post.summary["r_hat"] >= _RHAT_MAX])
            if post.eta_diagnostics.get("max_r_hat", 0) >= _RHAT_MAX:
                bad.append("eta")
            msgs.append(f"max split R-hat {rmax:.4f} >= {_RHAT_MAX} ({', '.join(bad) or 'undefined'}): run longer "
                        f"chains (num_samples / warmup_steps)")
        if ndiv:
            msgs.append(f"{ndiv} divergent transitions after warm-up (per chain "
                        f"{[len(d) for d in post.samples.divergences]}): raise target_accept_prob or reparametrise")
        if ok:
            msgs.append(f"NUTS: {post.samples.num_chains} chains x {self.num_samples} draws, max split R-hat "
                        f"{rmax:.4f}, no divergent transitions")
        return ok, msgs

    def result(self, model, mdata, post: NUTSPosterior, seed: int, t0: float | None = None):
        """The FitResult of a posterior (the last step of :meth:`fit`): estimates and ``p_hat`` are posterior
        means, ``eta_hat`` the posterior mean of η, ``posterior`` the η draws, ``mcmc`` the summary table,
        ``covariance`` the posterior covariance, the OFV an importance-sampling −2LL at the posterior mean."""
        t0 = time.perf_counter() - post.wall_s if t0 is None else t0
        converged, msgs = self.convergence(post)
        for m in msgs if not converged else []:
            warnings.warn(f"nuts: {m}", stacklevel=3)
        lik = marginal_loglik(model, post.p_mean, mdata, method="is", n_samples=self.ofv_samples, proposal="t",
                              seed=seed, eta0=post.eta_mean, progress=self.progress)
        s = post.samples
        table = post.summary.copy()
        table.attrs.update(divergences=s.n_divergent, divergences_per_chain=[len(d) for d in s.divergences],
                           step_size=list(s.step_size), chain_seeds=list(s.seeds), chain_wall_s=list(s.wall_s),
                           chain_evals=list(s.n_evals),
                           eta=dict(post.eta_diagnostics), init=dict(post.init))
        res = build_result(self, model, mdata, post.p_mean, post.eta_mean, linearisation=self.linearisation,
                           n_iter=self.warmup_steps + self.num_samples, converged=converged, messages=msgs,
                           elapsed=time.perf_counter() - t0, seed=seed, likelihood=lik,
                           phases={"warmup": self.warmup_steps},
                           acceptance={f"chain{c + 1}": a for c, a in enumerate(s.acceptance_rate)},
                           mcmc=table, posterior=EmpiricalPosterior(post.eta_draws, "nuts"))
        changes = {}
        if self.sample_population and post.names:
            cov = post.covariance()
            ok = bool(np.isfinite(cov.to_numpy()).all())
            with np.errstate(all="ignore"):
                cond = float(np.linalg.cond(cov.to_numpy())) if ok else None
            changes.update(covariance=cov, covariance_ok=ok, covariance_kind="posterior", condition_number=cond,
                           covariance_message=f"posterior covariance of the free parameters from "
                                              f"{post.natural.shape[0] * post.natural.shape[1]} draws")
        else:
            changes.update(covariance_message="population parameters held fixed (sample_population=False)")
        return res.replace(elapsed_s=time.perf_counter() - t0, **changes)
