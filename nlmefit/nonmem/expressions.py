"""NONMEM abbreviated code as sympy expressions, evaluated with torch.

pharmpy parses ``$PK``/``$PRED``/``$ERROR``/``$DES`` into sympy expressions (``IF``/``ELSE`` become ``Piecewise``).
:func:`compile_block` generates one Python function per block of statements whose body is straight-line torch
code (``torch.where`` for ``Piecewise``, never Python ``if`` on tensor values), compiled once: a translated model
runs for all subjects at once, is differentiable, and costs what a hand-written ``params=`` function or ODE
right-hand side costs (walking the expression tree on every call made an ADVAN13 fit three times slower).
Anything outside the supported set — the arithmetic, ``EXP LOG LOG10 SQRT ABS`` and the trigonometric functions,
``MIN``/``MAX``, comparisons and ``.AND.``/``.OR.``/``.NOT.`` — raises :class:`~nlmefit.errors.ModelSpecError`
naming the statement.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import sympy
import torch

from nlmefit.errors import ModelSpecError

__all__ = ["Statement", "compile_block", "free_names"]

#: one assignment ``symbol = expression`` and the NONMEM code it came from (for error messages)
Statement = tuple[str, sympy.Expr, str]

_FUNCS = {
    sympy.exp: "exp", sympy.log: "log", sympy.sqrt: "sqrt", sympy.Abs: "abs", sympy.sin: "sin", sympy.cos: "cos",
    sympy.tan: "tan", sympy.atan: "atan", sympy.asin: "asin", sympy.acos: "acos", sympy.tanh: "tanh",
    sympy.erf: "erf",
}
_FOLDS = {sympy.And: "logical_and", sympy.Or: "logical_or", sympy.Max: "maximum", sympy.Min: "minimum"}
_RELATIONS = {
    sympy.StrictLessThan: "lt", sympy.LessThan: "le", sympy.StrictGreaterThan: "gt", sympy.GreaterThan: "ge",
    sympy.Equality: "eq", sympy.Unequality: "ne",
}


def free_names(expr: sympy.Basic) -> set[str]:
    """Names of the free symbols of ``expr``."""
    return {s.name for s in expr.free_symbols}


def _where_tensor(x, like: torch.Tensor) -> torch.Tensor:
    """``x`` as a tensor on ``like``'s device (numbers in ``like``'s dtype, booleans as bool)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, bool):
        return torch.tensor(x, device=like.device)
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def _mul_scalar(x, c: float):
    return torch.ops.aten.mul.Scalar(x, c) if isinstance(x, torch.Tensor) else x * c


def _add_scalar(x, c: float):
    return torch.ops.aten.add.Scalar(x, c) if isinstance(x, torch.Tensor) else x + c


class _Coder:
    """sympy expression → Python source over the variables ``v_<name>`` (torch as ``T``, tensors via ``_t``)."""

    def __init__(self, where: str, known: set[str]) -> None:
        self.where, self.known = where, known

    def __call__(self, e: sympy.Basic) -> str:  # noqa: C901  (one branch per node type)
        c = self
        if isinstance(e, sympy.Symbol):
            if e.name not in self.known:
                raise ModelSpecError(f"{self.where}: {e.name} is neither a THETA, ETA, data column nor a variable "
                                     "assigned before this statement")
            return f"v_{e.name}"
        if e is sympy.true or e is sympy.false:
            return repr(bool(e))
        if e.is_Number:
            if not e.is_real:
                raise ModelSpecError(f"{self.where}: the constant {e} is not real")
            return repr(float(e))
        if e is sympy.pi:
            return repr(math.pi)
        if e is sympy.E:
            return repr(math.e)
        # a number times (plus) a tensor goes through the Scalar overloads: under forward-mode AD (the ODE
        # sensitivities) the Tensor overloads with a wrapped number take torch's Python reference path, ~50x slower
        if isinstance(e, sympy.Add):
            const, rest = e.as_coeff_Add()
            body = "(" + " + ".join(c(a) for a in sympy.Add.make_args(rest)) + ")"
            return body if const == 0 else f"_as({body}, {float(const)!r})"
        if isinstance(e, sympy.Mul):
            coef, rest = e.as_coeff_Mul()
            body = "(" + " * ".join(c(a) for a in sympy.Mul.make_args(rest)) + ")"
            if coef == 1:
                return body
            return f"(-{body})" if coef == -1 else f"_ms({body}, {float(coef)!r})"
        if isinstance(e, sympy.Pow):
            base, ex = e.args
            if ex == sympy.Rational(1, 2):
                return f"T.sqrt(_t({c(base)}))"
            if ex == -1:  # 1.0 / tensor goes through torch's slow Python reference path (__rdiv__)
                return f"T.reciprocal(_t({c(base)}))"
            if ex.is_Integer:
                return f"({c(base)} ** {int(ex)})"
            return f"T.pow(_t({c(base)}), {c(ex)})"
        if e.func in _FUNCS:
            if e.func is sympy.log and len(e.args) == 2:  # log(x, 10) for LOG10
                return f"(T.log(_t({c(e.args[0])})) / {math.log(float(e.args[1]))!r})"
            return f"T.{_FUNCS[e.func]}(_t({c(e.args[0])}))"
        if isinstance(e, sympy.Piecewise):
            value, cond = e.args[-1]
            if cond is not sympy.true:
                # NONMEM leaves a variable unassigned when no branch holds: refuse rather than guess 0
                raise ModelSpecError(f"{self.where}: an IF without a final ELSE leaves the variable undefined on some "
                                     "records; assign it before the IF")
            out = f"_t({c(value)})"
            for value, cond in reversed(e.args[:-1]):
                out = f"T.where(_t({c(cond)}), _t({c(value)}), {out})"
            return out
        if type(e) in _RELATIONS:
            return f"T.{_RELATIONS[type(e)]}(_t({c(e.args[0])}), _t({c(e.args[1])}))"
        if type(e) in _FOLDS:  # n-ary And/Or/Max/Min as nested binary torch ops
            out = f"_t({c(e.args[0])})"
            for a in e.args[1:]:
                out = f"T.{_FOLDS[type(e)]}({out}, _t({c(a)}))"
            return out
        if isinstance(e, sympy.Not):
            return f"T.logical_not(_t({c(e.args[0])}))"
        raise ModelSpecError(f"{self.where}: {type(e).__name__} ({e}) is not translated to torch")


def compile_block(inputs: Sequence[str], statements: Sequence[Statement],
                  outputs: Mapping[str, sympy.Basic]) -> Callable[[Mapping[str, object]], dict]:
    """One function ``f(env) -> {output: value}``: reads ``inputs`` from ``env``, runs ``statements`` in order
    (each sees the values assigned before it), returns ``outputs`` (expressions of everything assigned).

    Every symbol is checked here, once: an undefined one raises :class:`~nlmefit.errors.ModelSpecError` naming the
    statement."""
    known = set(inputs)
    lines = ["def _block(env):"]
    lines += [f"    v_{n} = env[{n!r}]" for n in inputs]
    lines.append("    _like = next((x for x in env.values() if isinstance(x, T.Tensor) and x.is_floating_point()), "
                 "None)")
    lines.append("    _t = (lambda x: x) if _like is None else (lambda x: _wt(x, _like))")
    for name, expr, code in statements:
        lines.append(f"    v_{name} = {_Coder(code, known)(expr)}")
        known.add(name)
    items = ", ".join(f"{k!r}: {_Coder(f'the value of {k}', known)(v)}" for k, v in outputs.items())
    lines.append(f"    return {{{items}}}")
    namespace = {"T": torch, "_wt": _where_tensor, "_ms": _mul_scalar, "_as": _add_scalar}
    exec(compile("\n".join(lines), "<nonmem statements>", "exec"), namespace)  # our own generated code
    return namespace["_block"]
