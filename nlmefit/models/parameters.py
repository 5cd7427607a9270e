"""Population parameters: specification, natural values, and the one place where transformations live.

Users give and read natural-scale values: THETA (``theta``), OMEGA (``omega``, variances and covariances of the
between-subject random effects η, optionally with an inter-occasion block ``omega_iov``) and SIGMA (``sigma``,
residual-error parameters as standard deviations). Estimators optimise an unconstrained vector ``u``:

* a bounded θ or σ maps by ``log(x - lower)``, ``log(upper - x)`` or ``logit`` when both bounds are finite;
  unbounded ones are left as they are;
* each Ω block is its Cholesky factor with a log diagonal (a diagonal Ω is simply log SDs);
* fixed parameters are not in ``u`` at all.

The covariance step works in the *natural* vector (θ, free Ω elements as variances/covariances, σ as SDs):
``to_natural_vector`` / ``from_natural_vector`` give that map, differentiably.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.distributions import Transform, biject_to, constraints

from nlmefit.errors import ModelSpecError

__all__ = ["Param", "fix", "Omega", "Params", "ParameterSet", "transform_for"]


@dataclass(frozen=True)
class Param:
    """One scalar parameter: initial value, optional bounds, and whether it is FIXED."""

    init: float
    lower: float = -math.inf
    upper: float = math.inf
    fixed: bool = False

    def check(self, name: str) -> None:
        if not math.isfinite(self.init):
            raise ModelSpecError(f"parameter {name!r}: initial value must be finite, got {self.init}")
        if not self.lower < self.upper:
            raise ModelSpecError(f"parameter {name!r}: lower bound {self.lower} must be below upper {self.upper}")
        if not self.fixed and not (self.lower < self.init < self.upper):
            raise ModelSpecError(
                f"parameter {name!r}: initial value {self.init} must lie strictly inside ({self.lower}, {self.upper})"
            )


def fix(value: float) -> Param:
    """A FIXED parameter (NONMEM ``FIX``)."""
    return Param(float(value), fixed=True)


def _as_param(name: str, value, lower: float = -math.inf) -> Param:
    if isinstance(value, Param):
        p = value
    elif isinstance(value, (int, float, np.floating, np.integer)):
        p = Param(float(value), lower=lower)
    else:
        raise ModelSpecError(f"parameter {name!r}: expected a number or Param, got {type(value).__name__}")
    p.check(name)
    return p


@dataclass
class Omega:
    """Covariance of random effects: variances by name, optional blocks with covariances, optional FIX.

    ``Omega({"cl": 0.1, "v": 0.1})`` is diagonal; ``Omega({"cl": 0.1, "v": 0.1}, blocks=[("cl", "v")],
    cov={("cl", "v"): 0.02})`` makes (cl, v) a full block. ``fixed=True`` (or a list of names) fixes blocks
    containing those names.
    """

    variances: Mapping[str, float]
    blocks: Sequence[Sequence[str]] = ()
    cov: Mapping[tuple, float] = field(default_factory=dict)
    fixed: bool | Iterable[str] = False

    def __post_init__(self) -> None:
        self.variances = {k: float(v.init if isinstance(v, Param) else v) for k, v in dict(self.variances).items()}
        fixed_names = set(self.variances) if self.fixed is True else set(self.fixed or ())
        for k, v in dict(self.variances).items():
            if isinstance(v, Param) and v.fixed:
                fixed_names.add(k)
        for k, v in self.variances.items():
            if not (math.isfinite(v) and v > 0) and k not in fixed_names:
                raise ModelSpecError(f"omega {k!r}: variance must be positive and finite, got {v}")
            if v < 0:
                raise ModelSpecError(f"omega {k!r}: variance must be non-negative, got {v}")
        names = list(self.variances)
        in_block = [n for b in self.blocks for n in b]
        for n in in_block:
            if n not in self.variances:
                raise ModelSpecError(f"omega block names {n!r}, which has no variance (have {names})")
        if len(in_block) != len(set(in_block)):
            raise ModelSpecError("omega blocks overlap: each eta may belong to one block only")
        blocks = [tuple(b) for b in self.blocks] + [(n,) for n in names if n not in in_block]
        # keep the user's eta order: order blocks by their first member's position
        blocks.sort(key=lambda b: names.index(b[0]))
        self._blocks = blocks
        self.names = [n for b in blocks for n in b]
        for (a, b), c in dict(self.cov).items():
            blk = next((bl for bl in blocks if a in bl and b in bl), None)
            if blk is None:
                raise ModelSpecError(f"omega covariance ({a}, {b}) given but {a} and {b} are not in one block")
        self._fixed_blocks = [any(n in fixed_names for n in b) for b in blocks]
        mat = self.matrix()
        for blk in blocks:
            idx = [self.names.index(n) for n in blk]
            sub = mat[np.ix_(idx, idx)]
            if len(blk) > 1 and np.linalg.eigvalsh(sub).min() <= 0:
                raise ModelSpecError(f"omega block {blk} is not positive definite")

    def matrix(self) -> np.ndarray:
        q = len(self.names)
        m = np.zeros((q, q))
        for i, n in enumerate(self.names):
            m[i, i] = self.variances[n]
        for (a, b), c in dict(self.cov).items():
            i, j = self.names.index(a), self.names.index(b)
            m[i, j] = m[j, i] = float(c)
        return m

    @property
    def block_list(self) -> list[tuple[str, ...]]:
        return list(self._blocks)

    @property
    def fixed_blocks(self) -> list[bool]:
        """For each block of :attr:`block_list`, whether it is FIXED."""
        return list(self._fixed_blocks)


@dataclass
class Params:
    """Natural-scale population parameters. Tensors may carry leading batch dims (per-subject copies)."""

    theta: dict[str, torch.Tensor]
    omega: torch.Tensor  # [..., q, q]
    sigma: dict[str, torch.Tensor]
    omega_iov: torch.Tensor | None = None  # [..., r, r]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor-valued parameters [..., *shape]

    def detach(self) -> Params:
        return Params(
            {k: v.detach() for k, v in self.theta.items()},
            self.omega.detach(),
            {k: v.detach() for k, v in self.sigma.items()},
            None if self.omega_iov is None else self.omega_iov.detach(),
            {k: v.detach() for k, v in self.weights.items()},
        )

    def to(self, device=None, dtype=None) -> Params:
        """The same values on another device / dtype."""
        def mv(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype or v.dtype)
        return Params({k: mv(v) for k, v in self.theta.items()}, mv(self.omega),
                      {k: mv(v) for k, v in self.sigma.items()},
                      None if self.omega_iov is None else mv(self.omega_iov),
                      {k: mv(v) for k, v in self.weights.items()})


def _module_weights(name: str, value) -> dict[str, torch.Tensor]:
    """A tensor-valued parameter, or every parameter of an ``nn.Module`` as ``name.param`` (its initial values)."""
    if isinstance(value, torch.nn.Module):
        return {f"{name}.{k}": v.detach().clone() for k, v in value.named_parameters()}
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple, float, int)):
        t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
        if not bool(torch.isfinite(t).all()):
            raise ModelSpecError(f"weights {name!r}: initial values must be finite")
        return {name: t}
    raise ModelSpecError(f"weights {name!r}: expected a tensor, an array or an nn.Module, got {type(value).__name__}")


def _element_names(name: str, shape: torch.Size) -> list[str]:
    if len(shape) == 0:
        return [name]
    return [f"{name}[{','.join(map(str, ix))}]" for ix in np.ndindex(*shape)]


def transform_for(lower: float, upper: float) -> Transform:
    """The bijection unconstrained → (lower, upper) of a scalar parameter: ``torch.distributions.biject_to``
    of its constraint (identity, ``lower + exp(u)``, ``upper − exp(u)`` or an affine sigmoid)."""
    if math.isinf(lower) and math.isinf(upper):
        return biject_to(constraints.real)
    if math.isinf(upper):
        return biject_to(constraints.greater_than(lower))
    if math.isinf(lower):
        return biject_to(constraints.less_than(upper))
    return biject_to(constraints.interval(lower, upper))


def _fwd(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """natural -> unconstrained"""
    return transform_for(lo, hi).inv(x)


def _inv(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """unconstrained -> natural"""
    return transform_for(lo, hi)(u)


class ParameterSet:
    """The full parameter specification of a model, and all maps between its representations."""

    def __init__(
        self,
        theta: Mapping[str, Param],
        omega: Omega,
        sigma: Mapping[str, Param],
        omega_iov: Omega | None = None,
        weights: Mapping[str, object] | None = None,
    ) -> None:
        self.theta = {k: _as_param(f"theta {k}", v) for k, v in theta.items()}
        self.weights: dict[str, torch.Tensor] = {}
        for k, v in (weights or {}).items():
            self.weights.update(_module_weights(k, v))
        self.sigma = {}
        for k, v in sigma.items():
            p = _as_param(f"sigma {k}", v, lower=0.0)
            if p.lower < 0:  # residual SDs are positive whatever bound was (not) given
                p = Param(p.init, 0.0, p.upper, p.fixed)
                p.check(f"sigma {k}")
            self.sigma[k] = p
        self.omega = omega
        self.omega_iov = omega_iov
        clash = (set(self.theta) & set(self.sigma)) | (set(self.weights) & (set(self.theta) | set(self.sigma)))
        if clash:
            raise ModelSpecError(f"names used twice among theta, sigma and weights: {sorted(clash)}")

    # ---------------------------------------------------------------- names
    @property
    def eta_names(self) -> list[str]:
        return list(self.omega.names)

    @property
    def iov_names(self) -> list[str]:
        return [] if self.omega_iov is None else list(self.omega_iov.names)

    def _omega_entries(self, om: Omega, prefix: str) -> list[tuple[str, int, int, int]]:
        """(name, i, j, block index) of every free lower-triangular Ω element, natural-vector order."""
        out = []
        for b, blk in enumerate(om.block_list):
            if om._fixed_blocks[b]:
                continue
            for a_pos, a in enumerate(blk):
                for c in blk[: a_pos + 1]:
                    i, j = om.names.index(a), om.names.index(c)
                    nm = f"{prefix}_{a}" if i == j else f"{prefix}_{c}_{a}"
                    out.append((nm, i, j, b))
        return out

    @property
    def natural_names(self) -> list[str]:
        """Names of the free parameters in the natural vector (θ, Ω variances/covariances, σ SDs)."""
        names = [k for k, p in self.theta.items() if not p.fixed]
        names += [e[0] for e in self._omega_entries(self.omega, "omega")]
        if self.omega_iov is not None:
            names += [e[0] for e in self._omega_entries(self.omega_iov, "omega_iov")]
        names += [f"sigma_{k}" for k, p in self.sigma.items() if not p.fixed]
        names += self.weight_names
        return names

    @property
    def weight_names(self) -> list[str]:
        """Reporting names of the elements of the tensor-valued parameters (``W[0,1]``), in vector order."""
        return [n for k, v in self.weights.items() for n in _element_names(k, v.shape)]

    @property
    def n_weights(self) -> int:
        return sum(int(v.numel()) for v in self.weights.values())

    @property
    def n_free(self) -> int:
        return len(self.natural_names)

    # ---------------------------------------------------------------- initial values
    def initial(self, dtype=torch.float64, device=None) -> Params:
        kw = dict(dtype=dtype, device=device)
        return Params(
            {k: torch.tensor(p.init, **kw) for k, p in self.theta.items()},
            torch.tensor(self.omega.matrix(), **kw),
            {k: torch.tensor(p.init, **kw) for k, p in self.sigma.items()},
            None if self.omega_iov is None else torch.tensor(self.omega_iov.matrix(), **kw),
            {k: v.to(**kw) for k, v in self.weights.items()},
        )

    def with_values(self, params: Params) -> ParameterSet:
        """A copy of this specification whose initial values are ``params`` (bounds and FIX kept)."""
        th = {k: Param(float(params.theta[k]), p.lower, p.upper, p.fixed) for k, p in self.theta.items()}
        sg = {k: Param(float(params.sigma[k]), p.lower, p.upper, p.fixed) for k, p in self.sigma.items()}

        def om(spec: Omega, mat: torch.Tensor) -> Omega:
            m = mat.detach().cpu().numpy()
            var = {n: float(m[i, i]) for i, n in enumerate(spec.names)}
            cov = {}
            for blk in spec.block_list:
                for a_pos, a in enumerate(blk):
                    for c in blk[:a_pos]:
                        cov[(c, a)] = float(m[spec.names.index(a), spec.names.index(c)])
            fixed = [n for b, blk in enumerate(spec.block_list) if spec._fixed_blocks[b] for n in blk]
            return Omega(var, blocks=[b for b in spec.block_list if len(b) > 1], cov=cov, fixed=fixed)

        iov = None if self.omega_iov is None else om(self.omega_iov, params.omega_iov)
        w = {k: params.weights.get(k, v).detach().to("cpu", torch.float64) for k, v in self.weights.items()}
        return ParameterSet(th, om(self.omega, params.omega), sg, iov, w)

    # ---------------------------------------------------------------- unconstrained map (estimation)
    def _omega_to_u(self, om: Omega, mat: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for b, blk in enumerate(om.block_list):
            if om._fixed_blocks[b]:
                continue
            idx = [om.names.index(n) for n in blk]
            sub = mat[idx][:, idx]
            L = torch.linalg.cholesky(sub)
            for a in range(len(blk)):
                for c in range(a + 1):
                    out.append(torch.log(L[a, a]) if a == c else L[a, c])
        return out

    def _omega_from_u(self, om: Omega, u: torch.Tensor, pos: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        q = len(om.names)
        fixed_mat = torch.as_tensor(om.matrix(), dtype=like.dtype, device=like.device)
        rows = [[fixed_mat[i, j] for j in range(q)] for i in range(q)]
        for b, blk in enumerate(om.block_list):
            if om._fixed_blocks[b]:
                continue
            k = len(blk)
            L = [[torch.zeros((), dtype=like.dtype, device=like.device)] * k for _ in range(k)]
            for a in range(k):
                for c in range(a + 1):
                    L[a][c] = torch.exp(u[pos]) if a == c else u[pos]
                    pos += 1
            Lt = torch.stack([torch.stack(r) for r in L])
            sub = Lt @ Lt.T
            idx = [om.names.index(n) for n in blk]
            for a in range(k):
                for c in range(k):
                    rows[idx[a]][idx[c]] = sub[a, c]
        return torch.stack([torch.stack(r) for r in rows]), pos

    def to_unconstrained(self, params: Params) -> torch.Tensor:
        parts = [_fwd(params.theta[k], p.lower, p.upper) for k, p in self.theta.items() if not p.fixed]
        parts += self._omega_to_u(self.omega, params.omega)
        if self.omega_iov is not None:
            parts += self._omega_to_u(self.omega_iov, params.omega_iov)
        parts += [_fwd(params.sigma[k], p.lower, p.upper) for k, p in self.sigma.items() if not p.fixed]
        like = params.omega
        scal = [torch.as_tensor(x, dtype=like.dtype, device=like.device) for x in parts]
        flat = [params.weights[k].to(like.dtype).reshape(-1) for k in self.weights]
        if not scal and not flat:
            return torch.zeros(0, dtype=like.dtype, device=like.device)
        return torch.cat(([torch.stack(scal)] if scal else []) + flat)

    def from_unconstrained(self, u: torch.Tensor) -> Params:
        kw = dict(dtype=u.dtype, device=u.device)
        pos = 0
        theta = {}
        for k, p in self.theta.items():
            if p.fixed:
                theta[k] = torch.tensor(p.init, **kw)
            else:
                theta[k] = _inv(u[pos], p.lower, p.upper)
                pos += 1
        omega, pos = self._omega_from_u(self.omega, u, pos, u)
        omega_iov = None
        if self.omega_iov is not None:
            omega_iov, pos = self._omega_from_u(self.omega_iov, u, pos, u)
        sigma = {}
        for k, p in self.sigma.items():
            if p.fixed:
                sigma[k] = torch.tensor(p.init, **kw)
            else:
                sigma[k] = _inv(u[pos], p.lower, p.upper)
                pos += 1
        weights = {}
        for k, v in self.weights.items():
            weights[k] = u[pos:pos + v.numel()].reshape(v.shape)
            pos += v.numel()
        return Params(theta, omega, sigma, omega_iov, weights)

    # ---------------------------------------------------------------- natural map (covariance step)
    def to_natural_vector(self, params: Params) -> torch.Tensor:
        vals = [params.theta[k] for k, p in self.theta.items() if not p.fixed]
        vals += [params.omega[i, j] for _, i, j, _ in self._omega_entries(self.omega, "omega")]
        if self.omega_iov is not None:
            vals += [params.omega_iov[i, j] for _, i, j, _ in self._omega_entries(self.omega_iov, "omega_iov")]
        vals += [params.sigma[k] for k, p in self.sigma.items() if not p.fixed]
        like = params.omega
        scal = [torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in vals]
        flat = [params.weights[k].to(like.dtype).reshape(-1) for k in self.weights]
        if not scal and not flat:
            return torch.zeros(0, dtype=like.dtype, device=like.device)
        return torch.cat(([torch.stack(scal)] if scal else []) + flat)

    def from_natural_vector(self, x: torch.Tensor) -> Params:
        """Inverse of ``to_natural_vector``. ``x`` may have leading batch dims ([..., n_free])."""
        kw = dict(dtype=x.dtype, device=x.device)
        batch = x.shape[:-1]
        pos = 0
        theta = {}
        for k, p in self.theta.items():
            if p.fixed:
                theta[k] = torch.full(batch, p.init, **kw)
            else:
                theta[k] = x[..., pos]
                pos += 1

        def build(om: Omega, prefix: str):
            nonlocal pos
            q = len(om.names)
            base = torch.as_tensor(om.matrix(), **kw).expand(*batch, q, q)
            entries = self._omega_entries(om, prefix)
            if not entries:
                return base.clone()
            ii = torch.tensor([e[1] for e in entries], device=x.device)
            jj = torch.tensor([e[2] for e in entries], device=x.device)
            vals = x[..., pos : pos + len(entries)]
            pos += len(entries)
            flat = base.reshape(*batch, q * q)
            flat = flat.index_copy(-1, ii * q + jj, vals)
            mask_off = ii != jj
            if bool(mask_off.any()):
                flat = flat.index_copy(-1, (jj * q + ii)[mask_off], vals[..., mask_off])
            return flat.reshape(*batch, q, q)

        omega = build(self.omega, "omega")
        omega_iov = build(self.omega_iov, "omega_iov") if self.omega_iov is not None else None
        sigma = {}
        for k, p in self.sigma.items():
            if p.fixed:
                sigma[k] = torch.full(batch, p.init, **kw)
            else:
                sigma[k] = x[..., pos]
                pos += 1
        weights = {}
        for k, v in self.weights.items():
            weights[k] = x[..., pos:pos + v.numel()].reshape(*batch, *v.shape)
            pos += v.numel()
        return Params(theta, omega, sigma, omega_iov, weights)

    def natural_dict(self, params: Params) -> dict[str, float]:
        """Every parameter (fixed ones included) by its reporting name, as floats."""
        out = {k: float(params.theta[k]) for k in self.theta}
        for name, i, j, _ in self._all_entries(self.omega, "omega"):
            out[name] = float(params.omega[i, j])
        if self.omega_iov is not None:
            for name, i, j, _ in self._all_entries(self.omega_iov, "omega_iov"):
                out[name] = float(params.omega_iov[i, j])
        out.update({f"sigma_{k}": float(params.sigma[k]) for k in self.sigma})
        for k in self.weights:
            v = params.weights[k].detach().cpu().reshape(-1).tolist()
            out.update(zip(_element_names(k, self.weights[k].shape), v))
        return out

    def fixed_names(self) -> set[str]:
        free = set(self.natural_names)
        every = [k for k in self.theta] + [e[0] for e in self._all_entries(self.omega, "omega")]
        if self.omega_iov is not None:
            every += [e[0] for e in self._all_entries(self.omega_iov, "omega_iov")]
        every += [f"sigma_{k}" for k in self.sigma] + self.weight_names
        return {n for n in every if n not in free}

    def _all_entries(self, om: Omega, prefix: str):
        out = []
        for b, blk in enumerate(om.block_list):
            for a_pos, a in enumerate(blk):
                for c in blk[: a_pos + 1]:
                    i, j = om.names.index(a), om.names.index(c)
                    out.append((f"{prefix}_{a}" if i == j else f"{prefix}_{c}_{a}", i, j, b))
        return out

    def params_from_dict(self, values: Mapping[str, float], dtype=torch.float64, device=None) -> Params:
        """Params from reporting names (as ``natural_dict`` writes them); missing names keep initial values."""
        base = self.natural_dict(self.initial(dtype, device))
        unknown = set(values) - set(base)
        if unknown:
            raise ModelSpecError(f"unknown parameter names {sorted(unknown)}; expected some of {sorted(base)}")
        base.update({k: float(v) for k, v in values.items()})
        kw = dict(dtype=dtype, device=device)
        theta = {k: torch.tensor(base[k], **kw) for k in self.theta}
        sigma = {k: torch.tensor(base[f"sigma_{k}"], **kw) for k in self.sigma}

        def mat(om: Omega, prefix: str) -> torch.Tensor:
            q = len(om.names)
            m = torch.zeros(q, q, **kw)
            for name, i, j, _ in self._all_entries(om, prefix):
                m[i, j] = m[j, i] = base[name]
            return m

        iov = mat(self.omega_iov, "omega_iov") if self.omega_iov is not None else None
        weights = {k: torch.tensor([base[n] for n in _element_names(k, v.shape)], **kw).reshape(v.shape)
                   for k, v in self.weights.items()}
        return Params(theta, mat(self.omega, "omega"), sigma, iov, weights)
