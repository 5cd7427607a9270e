"""A pharmpy model (a parsed NONMEM control stream) translated into an nlmefit :class:`~nlmefit.models.Model`.

What is translated, and how:

* **Structure.** A linear compartmental system (ADVAN1–4, 11, 12 with TRANS1/2/4, or an ADVAN13 ``$DES`` that is
  linear) becomes the closed form :class:`~nlmefit.models.ClosedForm`. Its parameters come from the rate
  constants pharmpy reads off the system and the central volume ``S`` of ``F = A(central)/S``: ``v = S``,
  ``cl = k10·S``, ``q = k12·S``, ``vp = q/k21`` (and ``q2, vp2``), ``ka`` — so TRANS1 (micro-constants), TRANS2 and
  TRANS4 all reduce to one form. ``ALAGn``/``Fn`` of the dosed compartment become ``tlag``/``f``, ``Dn``/``Rn``
  ``dur``/``rate``. Any other ``$DES`` (e.g. Michaelis–Menten elimination) runs on the ODE path
  (:class:`~nlmefit.models.OdeStructure`) with its right-hand side compiled to torch. ``$PRED`` becomes a
  :class:`~nlmefit.models.FunctionStructure` of TIME.
* **$PK / $PRED statements** (THETA, ETA, data columns, IF/ELSE) run in order as one ``params=`` function, for
  all subjects at once (:mod:`nlmefit.nonmem.expressions`).
* **Residual error.** NONMEM's FOCE linearises Y in EPS: prediction ``Y(ε=0)`` and variance
  ``Σ_kl ∂Y/∂ε_k ∂Y/∂ε_l SIGMA_kl``. Written as a polynomial ``A + C·F + B·F²`` in the prediction F it is
  additive (B = C = 0), proportional (A = C = 0), combined2 (C = 0) or combined1 (C² = 4AB); ``Y = LOG(F) + ε``
  is the exponential (log-transform-both-sides) model. Each of A, B must be one free parameter (a SIGMA variance,
  or a THETA squared with ``$SIGMA 1 FIX`` — the ``W`` idiom), which becomes the SD ``sigma_add``/``sigma_prop``.
  ``Y = F·EXP(EPS)`` is proportional (its linearisation). Anything else is refused.
* **Parameters.** ``$THETA`` bounds and FIX → :class:`~nlmefit.models.Param`; ``$OMEGA`` diagonal and BLOCK (FIX)
  → :class:`~nlmefit.models.Omega`; ``$SIGMA`` variances → SDs.

* **Inter-occasion variability.** ``$OMEGA BLOCK(n) ... SAME`` groups become nlmefit's IOV (``iov=``, one κ per
  occasion of the ``OCC`` column) when the etas enter through the idiom ``IF (OCC.EQ.k) IOV = ETA(m)``.

Refused, with the statement named (never silently changed): other uses of inter-occasion etas, several
observation compartments or DVIDs, ``$MIX``, transit/nonlinear features the closed form cannot express when no
``$DES`` exists, and expressions outside what :func:`~nlmefit.nonmem.expressions.compile_block` translates.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import sympy
import torch
from sympy.core.function import AppliedUndef

from nlmefit.errors import ModelSpecError
from nlmefit.models import ClosedForm, FunctionStructure, Model, OdeStructure, Omega, Param
from nlmefit.nonmem.expressions import Statement, compile_block, free_names
from nlmefit.pk.ode import OdeSystem

__all__ = ["Translation", "translate"]


@dataclass
class Translation:
    """The translated model and the map between NONMEM's parameters and nlmefit's reporting names.

    ``names``: NONMEM name (``THETA(1)``, ``OMEGA(2,1)``, ``SIGMA(1,1)``) → nlmefit name (``pop_cl``,
    ``omega_cl_v``, ``sigma_prop``); ``scale``: for SIGMA-like parameters, NONMEM value = ``scale`` · (nlmefit SD)
    ** ``power`` (a SIGMA variance: power 2; a THETA in a ``W`` statement: power 1)."""

    model: Model
    names: dict[str, str]
    scale: dict[str, tuple[float, int]] = field(default_factory=dict)
    occasion_column: str | None = None  # the column IF (OCC.EQ.k) tests, for inter-occasion etas
    occasion_values: list[float] = field(default_factory=list)
    dose_parameters: list[str] = field(default_factory=list)  # ALAGn/Fn/Dn/Rn translated (nlmefit: every dose)


# ---------------------------------------------------------------------------------------------------- helpers
def _sym(e) -> sympy.Basic:
    """A pharmpy expression as sympy, with amounts ``A_X(t)`` as plain symbols ``A_X``."""
    s = e._sympy_() if hasattr(e, "_sympy_") else sympy.sympify(e)
    return s.replace(lambda x: isinstance(x, AppliedUndef), lambda x: sympy.Symbol(x.func.__name__))


def _statements(assignments, block: str) -> list[Statement]:
    out = []
    for a in assignments:
        if not hasattr(a, "symbol"):
            raise ModelSpecError(f"{block}: statement {a} is not an assignment nlmefit can translate")
        name = str(a.symbol)
        out.append((name, _sym(a.expression), f"{block}: {name} = {a.expression}"))
    return out


def _expand(expr: sympy.Basic, statements: list[Statement], keep: frozenset = frozenset()) -> sympy.Basic:
    """``expr`` with the assignments substituted back to front (NONMEM's sequential semantics), except ``keep``."""
    for name, rhs, _ in reversed(statements):
        if name in keep:
            continue
        s = sympy.Symbol(name)
        if s in expr.free_symbols:
            expr = expr.subs(s, rhs)
    return expr


def _lower_name(name: str, prefix: str) -> str:
    n = name.lower()
    if n.startswith(prefix + "_") and n[len(prefix) + 1:].isdigit():  # THETA_1 -> theta1
        return prefix + n[len(prefix) + 1:]
    return n


def _eta_name(name: str) -> str:
    n = name.lower()
    if n.startswith("eta_"):
        rest = n[4:]
        return "eta" + rest if rest.isdigit() else rest
    return n


# ---------------------------------------------------------------------------------------------------- parameters
def _parameter_table(pm):
    return {p.name: p for p in pm.parameters}


def _thetas(pm, rv_params: set[str]) -> tuple[dict[str, Param], dict[str, str], dict[str, str]]:
    """Typical values: {nlmefit name: Param}, pharmpy name → nlmefit name, NONMEM THETA(i) → nlmefit name."""
    theta, to_ours, names = {}, {}, {}
    i = 0
    for p in pm.parameters:
        if p.name in rv_params:
            continue
        i += 1
        ours = _lower_name(p.name, "theta")
        if ours in theta:
            raise ModelSpecError(f"$THETA: two parameters named {ours!r} (names are case-insensitive in nlmefit)")
        theta[ours] = Param(float(p.init), lower=float(p.lower), upper=float(p.upper), fixed=bool(p.fix))
        to_ours[p.name] = ours
        names[f"THETA({i})"] = ours
    return theta, to_ours, names


def _omega_spec(dists, params, naming) -> tuple[Omega, dict[str, str]]:
    """An :class:`Omega` of the eta distributions ``dists`` (diagonal or BLOCK, FIX) and pharmpy eta → our name."""
    variances, blocks, cov, fixed = {}, [], {}, []
    eta_map: dict[str, str] = {}
    seen_params: dict[str, str] = {}
    for rv in dists:
        ours = [naming(n) for n in rv.names]
        for n, o in zip(rv.names, ours):
            eta_map[n] = o
        k = len(ours)
        for a in range(k):
            for b in range(a + 1):
                e = _sym(rv.variance[a, b] if k > 1 else rv.variance)
                if e == 0:
                    continue
                if not isinstance(e, sympy.Symbol) or e.name not in params:
                    raise ModelSpecError(f"$OMEGA: element ({rv.names[a]}, {rv.names[b]}) is {e}, not one parameter")
                if e.name in seen_params:
                    raise ModelSpecError(f"$OMEGA: parameter {e.name} is used by two elements ({seen_params[e.name]} "
                                         "and this one): shared variances are translated only as inter-occasion "
                                         "BLOCK ... SAME")
                seen_params[e.name] = f"({rv.names[a]}, {rv.names[b]})"
                p = params[e.name]
                if p.fix:
                    fixed.append(ours[a])
                if a == b:
                    variances[ours[a]] = float(p.init)
                else:
                    cov[(ours[b], ours[a])] = float(p.init)
        if k > 1:
            blocks.append(tuple(ours))
    return Omega(variances, blocks=blocks, cov=cov, fixed=fixed), eta_map


def _omega(pm, params):
    """(Ω of the IIV etas, IOV Ω or None, pharmpy eta → nlmefit eta name (IIV), pharmpy eta → IOV component,
    NONMEM OMEGA(i,j) → nlmefit reporting name).

    Inter-occasion etas (``$OMEGA BLOCK(n) ... SAME``): each group of distributions sharing their parameters is one
    IOV component set ``iov1, iov2, ...``; every eta of the group maps to that component, whose value nlmefit draws
    per occasion (κ) and hands over on each record for the record's occasion (see :func:`_occasion_idiom`)."""
    etas = pm.random_variables.etas
    levels = {rv.level for rv in etas} - {"IIV", "IOV"}
    if levels:
        raise ModelSpecError(f"$OMEGA: random-effect levels {sorted(levels)} are not translated (IIV and IOV are)")
    iiv = [rv for rv in etas if rv.level == "IIV"]
    iov = [rv for rv in etas if rv.level == "IOV"]
    omega, eta_map = _omega_spec(iiv, params, _eta_name)
    iov_spec, iov_map = None, {}
    if iov:
        groups: dict[tuple, list] = {}
        for rv in iov:
            groups.setdefault(tuple(sorted(str(x) for x in rv.parameter_names)), []).append(rv)
        counter = iter(range(1, 10_000))
        iov_spec, first = _omega_spec([g[0] for g in groups.values()], params, lambda n: f"iov{next(counter)}")
        for g in groups.values():
            for rv in g:
                if len(rv.names) != len(g[0].names):
                    raise ModelSpecError(f"$OMEGA: {rv.names} repeats {g[0].names} (SAME) with another size")
                for c, n in enumerate(rv.names):
                    iov_map[n] = first[g[0].names[c]]
    # NONMEM numbering: OMEGA(i,j) by position of the etas in $OMEGA order (a SAME block names its first copy)
    all_names = list(etas.names)
    full = etas.covariance_matrix
    names: dict[str, str] = {}
    done: set[str] = set()
    for i in range(len(all_names)):
        for j in range(i + 1):
            e = _sym(full[i, j])
            if e == 0 or str(e) in done:
                continue
            done.add(str(e))
            a_n, b_n = all_names[i], all_names[j]
            if a_n in iov_map:
                a, b = iov_map[a_n], iov_map[b_n]
                names[f"OMEGA({i + 1},{j + 1})"] = f"omega_iov_{a}" if a == b else f"omega_iov_{b}_{a}"
            else:
                a, b = eta_map[a_n], eta_map[b_n]
                names[f"OMEGA({i + 1},{j + 1})"] = f"omega_{a}" if i == j else f"omega_{b}_{a}"
    return omega, iov_spec, eta_map, iov_map, names


def _occasion_idiom(pk: list[Statement], iov_etas: set[str]) -> tuple[list[Statement], str | None, set[float]]:
    """The NONMEM IOV idiom ``IF (OCC.EQ.k) IOV = ETA(m)`` with the conditions made true: nlmefit's per-record
    IOV component already is the eta of the record's occasion, so ``IOV = ETA(m)`` holds on every record.

    Returns (statements, the occasion column, the occasion values named). Any other use of an IOV eta is refused."""
    if not iov_etas:
        return pk, None, set()
    found: dict[str, int] = dict.fromkeys(iov_etas, 0)
    cols: set[str] = set()
    values: set[float] = set()

    def repl(pw):
        args = []
        for value, cond in pw.args:
            if (isinstance(value, sympy.Symbol) and value.name in iov_etas and isinstance(cond, sympy.Eq)
                    and any(isinstance(x, sympy.Symbol) for x in cond.args)
                    and any(x.is_Number for x in cond.args)):
                col = next(x for x in cond.args if isinstance(x, sympy.Symbol))
                cols.add(col.name)
                values.add(float(next(x for x in cond.args if x.is_Number)))
                found[value.name] += 1
                args.append((value, sympy.true))
            else:
                args.append((value, cond))
        return sympy.Piecewise(*args)

    out = []
    for name, rhs, code in pk:
        uses = {n: rhs.count(sympy.Symbol(n)) for n in iov_etas}
        before = dict(found)
        new = rhs.replace(lambda x: isinstance(x, sympy.Piecewise), repl)
        for n, k in uses.items():
            if k != found[n] - before[n]:
                raise ModelSpecError(f"{code}: the inter-occasion eta {n} is used outside the idiom "
                                     f"IF (OCC.EQ.k) X = {n}")
        out.append((name, new, code))
    if len(cols) > 1:
        raise ModelSpecError(f"$PK: occasions are tested on several columns ({', '.join(sorted(cols))}); one is "
                             "translated")
    return out, next(iter(cols), None), values


# ---------------------------------------------------------------------------------------------------- error model
@dataclass
class _ErrorPart:
    error: str
    sigma: dict[str, Param]
    names: dict[str, str]
    scale: dict[str, tuple[float, int]]
    prediction: sympy.Basic  # the expression the structure predicts (before LOG for exponential)
    log_scale: bool


def _error(pm, statements: list[Statement], thetas_to_ours: dict[str, str], params) -> _ErrorPart:
    dv = list(pm.dependent_variables)
    if len(dv) != 1:
        raise ModelSpecError(f"$ERROR: {len(dv)} dependent variables ({', '.join(map(str, dv))}); one DV (one "
                             "observation type) is translated")
    y_name = str(dv[0])
    idx = max((i for i, s in enumerate(statements) if s[0] == y_name), default=None)
    if idx is None:
        raise ModelSpecError(f"$ERROR: no statement assigns {y_name}")
    eps = list(pm.random_variables.epsilons)
    eps_names = [n for rv in eps for n in rv.names]
    eps_syms = [sympy.Symbol(n) for n in eps_names]
    before = statements[:idx]
    # expand Y only through the statements that depend on an EPS (the prediction's own chain stays symbolic)
    dep = set(eps_names)
    for name, rhs, _ in before:
        if free_names(rhs) & dep:
            dep.add(name)
    y = _expand(statements[idx][1], [s for s in before if s[0] in dep])
    zero = {e: 0 for e in eps_syms}
    pred = y.subs(zero)
    log_scale = False
    if isinstance(pred, sympy.log):
        log_scale, pred = True, pred.args[0]
    grads = [sympy.diff(y, e).subs(zero) for e in eps_syms]
    F = sympy.Symbol("__F")
    keep = frozenset({pred.name}) if isinstance(pred, sympy.Symbol) else frozenset()
    grads = [_expand(g, before, keep) for g in grads]
    grads = [g.subs(pred, F) if keep else g.subs(_expand(pred, before), F) for g in grads]
    # Σ of the epsilons, fixed parameters substituted by their values
    sig = pm.random_variables.epsilons.covariance_matrix
    var = 0
    for a in range(len(eps_syms)):
        for b in range(len(eps_syms)):
            s = _sym(sig[a, b]) if len(eps_syms) > 1 else _sym(eps[0].variance)
            var += grads[a] * grads[b] * s
    fixed = {sympy.Symbol(n): float(p.init) for n, p in params.items() if p.fix}
    var = sympy.expand(sympy.simplify(var.subs(fixed)))
    where = f"$ERROR: {y_name} = {statements[idx][1]}"
    if log_scale:
        if var.has(F):
            raise ModelSpecError(f"{where}: on the log scale only an additive error is translated")
        coeffs = {0: var, 1: sympy.Integer(0), 2: sympy.Integer(0)}
    else:
        try:
            poly = sympy.Poly(var, F)
        except sympy.PolynomialError as exc:
            raise ModelSpecError(f"{where}: the residual variance {var} is not a polynomial in the prediction") from exc
        if poly.degree() > 2:
            raise ModelSpecError(f"{where}: the residual variance {var} is not of the form A + C·F + B·F²")
        coeffs = {k: poly.coeff_monomial(F ** k) for k in (0, 1, 2)}
    A, C, B = coeffs[0], coeffs[1], coeffs[2]
    allowed = set(params)
    for k, c in coeffs.items():
        extra = free_names(c) - allowed
        if extra:
            raise ModelSpecError(f"{where}: the residual variance depends on {', '.join(sorted(extra))} (only THETAs "
                                 "and SIGMAs are translated in the error model)")
    if A == 0 and B == 0:
        raise ModelSpecError(f"{where}: Y has no (non-fixed-zero) EPS term")
    if log_scale:
        kind = "exponential"
    elif C == 0:
        kind = "additive" if B == 0 else "proportional" if A == 0 else "combined2"
    elif sympy.simplify(C ** 2 - 4 * A * B) == 0:
        kind = "combined1"
    else:
        raise ModelSpecError(f"{where}: the residual variance {var} is not additive, proportional or combined")
    sigma, names, scale = {}, {}, {}
    for ours, coef in (("add", A), ("prop", B)):
        if coef == 0:
            continue
        sigma[ours], nm, sc = _sd_parameter(coef, params, thetas_to_ours, where)
        names[nm] = f"sigma_{ours}"
        scale[nm] = sc
    return _ErrorPart(kind, sigma, names, scale, pred, log_scale)


def _sd_parameter(coef: sympy.Basic, params, thetas_to_ours, where: str):
    """``coef`` = c·P (a variance parameter) or c·P² (a THETA as SD): the SD Param, P's NONMEM name, the scale."""
    syms = list(coef.free_symbols)
    if len(syms) != 1:
        raise ModelSpecError(f"{where}: the variance term {coef} is not one free parameter (is a THETA and a SIGMA "
                             "both estimated for it? fix one, e.g. $SIGMA 1 FIX)")
    s = syms[0]
    p = params[s.name]
    for power in (1, 2):
        c = sympy.simplify(coef / s ** power)
        if c.is_number and float(c) > 0:
            c = float(c)
            break
    else:
        raise ModelSpecError(f"{where}: the variance term {coef} is not a constant times one parameter (or its square)")
    if power == 2 and s.name not in thetas_to_ours:
        raise ModelSpecError(f"{where}: {s.name} enters the variance squared; only a THETA may (the W idiom)")
    if power == 1 and s.name in thetas_to_ours:
        raise ModelSpecError(f"{where}: THETA {s.name} enters the variance linearly; write W = THETA·... instead")

    def sd(x: float) -> float:  # variance term -> SD
        return math.sqrt(c * x) if power == 1 else math.sqrt(c) * abs(x)

    # an SD is positive: a variance's positive lower bound carries over; a THETA's sign does not matter (|θ|)
    lower = sd(p.lower) if power == 1 and p.lower > 0 else 0.0
    upper = math.inf if not math.isfinite(p.upper) else sd(p.upper)
    param = Param(sd(float(p.init)), lower=lower, upper=upper, fixed=bool(p.fix))
    nonmem = s.name
    # NONMEM value = scale · SD ** power' where power' = 2 (variance) or 1 (THETA)
    return param, nonmem, ((1.0 / c), 2) if power == 1 else (1.0 / math.sqrt(c), 1)


# ---------------------------------------------------------------------------------------------------- structure
_AMOUNT = "A_"


def _linear_rates(odes, des: list[Statement], pm):
    """Closed-form parameters as sympy expressions of the $PK symbols, or None when the system is not linear."""
    central = odes.central_compartment
    depot = odes.find_depot(pm.statements)
    periph = list(odes.find_peripheral_compartments())
    if len(periph) > 2 or odes.find_transit_compartments(pm.statements):
        return None
    amounts = {f"{_AMOUNT}{n}" for n in odes.compartment_names}

    def rate(e):
        s = _expand(_sym(e), des)
        if any(n in amounts or n == "t" for n in free_names(s)):
            raise _Nonlinear
        return s

    try:
        k10, k1p = None, {}
        for dest, r in odes.get_compartment_outflows(central):
            if getattr(dest, "name", None) is None or type(dest).__name__ == "Output":
                k10 = rate(r)
            elif dest in periph:
                k1p[dest.name] = rate(r)
            else:
                return None
        kp1 = {}
        for p in periph:
            flows = odes.get_compartment_outflows(p)
            if len(flows) != 1 or flows[0][0] != central:
                return None
            kp1[p.name] = rate(flows[0][1])
        ka = None
        if depot is not None:
            flows = odes.get_compartment_outflows(depot)
            if len(flows) != 1 or flows[0][0] != central:
                return None
            ka = rate(flows[0][1])
    except _Nonlinear:
        return None
    if k10 is None:
        return None
    return k10, [(k1p[p.name], kp1[p.name]) for p in periph], ka, central, depot


class _Nonlinear(Exception):
    pass


def _dose_parameters(compartment, where: str) -> dict[str, sympy.Basic]:
    """tlag, f, dur/rate of the dosed compartment, as sympy expressions (absent when NONMEM's defaults)."""
    out = {}
    lag = _sym(compartment.lag_time)
    if lag != 0:
        out["tlag"] = lag
    bio = _sym(compartment.bioavailability)
    if bio != 1:
        out["f"] = bio
    for d in compartment.doses:
        kind = type(d).__name__
        if kind == "Infusion":
            if d.duration is not None and str(d.duration) not in ("D", "DUR", "RATE") and _sym(d.duration).free_symbols:
                out["dur"] = _sym(d.duration)
            if d.rate is not None and str(d.rate) != "RATE" and _sym(d.rate).free_symbols:
                out["rate"] = _sym(d.rate)
        elif kind != "Bolus":
            raise ModelSpecError(f"{where}: dose type {kind} is not translated")
    return out


def _structure(pm, des: list[Statement], err: _ErrorPart, after: list[Statement]):
    """(structure, {output name: sympy expression of the $PK symbols}) for the params function."""
    odes = pm.statements.ode_system
    if odes is None:  # $PRED
        return None
    central = odes.central_compartment
    a_c = sympy.Symbol(f"{_AMOUNT}{central.name}")
    p = _expand(err.prediction if not isinstance(err.prediction, sympy.Symbol) else err.prediction, after)
    ratio = sympy.simplify(p / a_c)
    amounts = {f"{_AMOUNT}{n}" for n in odes.compartment_names}
    if ratio.has(a_c) or free_names(ratio) & amounts:
        raise ModelSpecError(f"$ERROR: the prediction {p} is not the central amount {a_c} divided by a volume "
                             "(only the central compartment's concentration is translated)")
    volume = sympy.simplify(1 / ratio)
    dosed = [c for c in (odes.find_depot(pm.statements), central) if c is not None and c.doses]
    extra = {}
    for c in dosed:
        for k, v in _dose_parameters(c, f"$PK ({c.name})").items():
            if k in extra and extra[k] != v:
                raise ModelSpecError(f"$PK: {k} differs between the dosed compartments; one value is translated")
            extra[k] = v
    lin = _linear_rates(odes, des, pm)
    if lin is not None:
        k10, pairs, ka, _, depot = lin
        outs = {"cl": k10 * volume, "v": volume}
        for i, (k12, k21) in enumerate(pairs):
            qn, vn = ("q", "vp") if i == 0 else ("q2", "vp2")
            outs[qn] = k12 * volume
            outs[vn] = k12 * volume / k21
        if depot is not None:
            outs["ka"] = ka
        outs.update(extra)
        return ClosedForm(ncmt=1 + len(pairs), oral=depot is not None), outs
    return _ode_structure(pm, odes, des, volume, extra)


def _ode_structure(pm, odes, des: list[Statement], volume, extra):
    names = list(odes.compartment_names)
    depot = odes.find_depot(pm.statements)
    central = odes.central_compartment
    c_idx = names.index(central.name)
    d_idx = None if depot is None else names.index(depot.name)
    if (d_idx is not None and (d_idx, c_idx) != (0, 1)) or (d_idx is None and c_idx != 0):
        raise ModelSpecError("$DES: the ODE path doses CMT 1 into the depot and CMT 2 into the central compartment "
                             f"(or CMT 1 into central without a depot); this system has {names}")
    amounts = [sympy.Symbol(f"{_AMOUNT}{n}") for n in names]
    rhs = []
    for eq in odes.eqs:
        lhs = _sym(eq.lhs)  # Derivative(A_X, t)
        state = lhs.args[0].name if isinstance(lhs, sympy.Derivative) else str(lhs)
        rhs.append((names.index(state.removeprefix(_AMOUNT)), _expand(_sym(eq.rhs), des)))
    rhs.sort()
    exprs = [r for _, r in rhs]
    pk_symbols = sorted(set().union(*(free_names(e) for e in exprs)) - {str(a) for a in amounts} - {"t"})
    amount_names = [str(a) for a in amounts]
    block = compile_block(pk_symbols + amount_names + ["t"], [],
                          {f"DADT({i + 1})": e for i, e in enumerate(exprs)})

    def f(t: torch.Tensor, x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        env = dict(p)
        env["t"] = t
        for i, n in enumerate(amount_names):
            env[n] = x[:, i]
        cols = block(env).values()
        return torch.stack([c if isinstance(c, torch.Tensor) and c.shape == t.shape else torch.zeros_like(t) + c
                            for c in cols], 1)

    system = OdeSystem(n_states=len(names), rhs=f, depot=d_idx, central=c_idx, volume="__volume",
                       names=tuple(n.lower() for n in names), params=tuple(pk_symbols) + ("__volume",))
    outs = {s: sympy.Symbol(s) for s in pk_symbols}
    outs["__volume"] = volume
    outs.update(extra)
    structure = OdeStructure(system, label=f"{pm.name or 'nonmem'}_des", params_required=tuple(outs))
    return structure, outs


# ---------------------------------------------------------------------------------------------------- the model
def translate(pm, name: str | None = None) -> Translation:
    """The nlmefit model of the pharmpy model ``pm`` (see the module docstring for what is translated)."""
    params = _parameter_table(pm)
    rv_params = set(pm.random_variables.parameter_names)
    theta, thetas_to_ours, theta_names = _thetas(pm, rv_params)
    omega, iov_spec, eta_map, iov_map, omega_names = _omega(pm, params)
    odes = pm.statements.ode_system
    if odes is None:
        pk = _statements(pm.statements, "$PRED")
        after: list[Statement] = []
    else:
        pk = _statements(pm.statements.before_odes, "$PK")
        after = _statements(pm.statements.after_odes, "$ERROR")
        # pharmpy lists $DES assignments (C = A(2)/V) with $PK: they belong to the right-hand side
        moving = {f"{_AMOUNT}{n}" for n in odes.compartment_names} | {"t"}
        for target, rhs, _ in pk:
            if free_names(rhs) & moving:
                moving.add(target)
        des = [st for st in pk if st[0] in moving]
        pk = [st for st in pk if st[0] not in moving]
    pk, occ_column, occ_values = _occasion_idiom(pk, set(iov_map))
    if iov_map and occ_column is None:
        raise ModelSpecError("$PK: inter-occasion etas without the idiom IF (OCC.EQ.k) X = ETA(m)")
    all_st = pk + after
    err = _error(pm, all_st if odes is None else after, thetas_to_ours, params)
    # NONMEM names of the SIGMA/THETA parameters that became sigma_*
    sig_names = {}
    eps = pm.random_variables.epsilons
    for i, n in enumerate(eps.names):
        for j in range(i + 1):
            e = _sym(eps.covariance_matrix[i, j])
            if isinstance(e, sympy.Symbol):
                sig_names[e.name] = f"SIGMA({i + 1},{j + 1})"
    inv_theta = {v: k for k, v in theta_names.items()}
    names = {**theta_names, **omega_names}
    scale = {}
    for pname, ours in err.names.items():
        nm = sig_names.get(pname) or inv_theta.get(thetas_to_ours.get(pname, ""), pname)
        names[nm] = ours
        scale[nm] = err.scale[pname]
        if pname in thetas_to_ours:  # a THETA that is an SD in nlmefit: it leaves the typical values
            theta.pop(thetas_to_ours[pname])
    # rename symbols: pharmpy names -> what the params function sees
    theta_sym = dict(thetas_to_ours)
    eta_sym = dict(eta_map)
    eta_sym.update(iov_map)  # every eta of a SAME group reads the record's occasion component
    sigma_thetas = {p for p in err.names if p in thetas_to_ours}

    if odes is None:
        structure, outputs, pk = _pred_structure(pk, err, set(pm.random_variables.epsilons.names))
    else:
        structure, outputs = _structure(pm, des, err, after)
    used_cols = _check_symbols(pk, outputs, theta_sym, eta_sym, sigma_thetas, pm)

    theta_in = [(pname, ours) for pname, ours in theta_sym.items() if pname not in sigma_thetas]
    block = compile_block([p for p, _ in theta_in] + list(eta_sym) + used_cols, pk, outputs)

    def params_fn(th, et, cov):
        env: dict = {pname: th[ours] for pname, ours in theta_in}
        env.update({pname: et[ours] for pname, ours in eta_sym.items()})
        env.update({c: cov[c] for c in used_cols})
        return {k: _as_tensor(v, th) for k, v in block(env).items()}

    model = Model(structure, theta=theta, omega=omega, sigma=err.sigma, error=err.error, params=params_fn,
                  iov=iov_spec, name=name or pm.name)
    dose_params = sorted(set(outputs) & {"tlag", "f", "dur", "rate"})
    return Translation(model=model, names=names, scale=scale, occasion_column=occ_column,
                       occasion_values=sorted(occ_values), dose_parameters=dose_params)


def _as_tensor(v, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    like = next(iter(theta.values()))
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


def _pred_structure(pk: list[Statement], err: _ErrorPart, eps: set[str]):
    """$PRED: the statements that depend on TIME run inside a FunctionStructure of TIME, the others (and none that
    reads an EPS) in the params function. Returns (structure, outputs, statements of the params function)."""
    timed, noisy = {"TIME"}, set(eps)
    for name, rhs, _ in pk:
        names = free_names(rhs)
        if names & timed:
            timed.add(name)
        if names & noisy:
            noisy.add(name)
    pred = _expand(err.prediction, [s for s in pk if s[0] in timed])
    inputs = sorted(free_names(pred) - {"TIME"})
    block = compile_block(inputs + ["TIME"], [], {"F": pred})

    def fn(t: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        env = dict(p)
        env["TIME"] = t
        out = block(env)["F"]
        return out if isinstance(out, torch.Tensor) and out.shape == t.shape else torch.zeros_like(t) + out

    structure = FunctionStructure(fn, label="pred", params_required=tuple(inputs))
    run = [s for s in pk if s[0] not in timed and s[0] not in noisy]
    return structure, {n: sympy.Symbol(n) for n in inputs}, run


def _check_symbols(pk: list[Statement], outputs, theta_sym, eta_sym, sigma_thetas, pm) -> list[str]:
    """Data columns the statements read; a symbol that is nothing known is refused here, naming the statement."""
    known = set(theta_sym) | set(eta_sym)
    columns = set(pm.datainfo.names)
    used: list[str] = []
    assigned: set[str] = set()
    for name, rhs, code in pk:
        for s in sorted(free_names(rhs)):
            if s in known or s in assigned:
                if s in sigma_thetas:
                    raise ModelSpecError(f"{code}: {s} is the residual-error THETA and cannot also enter $PK")
                continue
            if s in columns:
                if s not in used:
                    used.append(s)
                continue
            raise ModelSpecError(f"{code}: {s} is neither a THETA, an ETA, a data column ($INPUT) nor assigned earlier")
        assigned.add(name)
    for k, v in outputs.items():
        for s in free_names(v):
            if s not in known | assigned and s not in columns:
                raise ModelSpecError(f"the structural parameter {k} = {v} reads {s}, which $PK does not define")
            if s in columns and s not in used:
                used.append(s)
    return used
