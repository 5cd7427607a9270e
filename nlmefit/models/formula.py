"""Covariate formulas: ``{"cl": "log(WT/70) + SEX"}`` → log-linear covariate effects on a parameter.

Each term is an arithmetic expression in covariate names (matched to data columns exactly, else
case-insensitively, as the NONMEM columns are), numbers and the functions ``log, exp, sqrt, abs``.
It is parsed with :mod:`ast` and evaluated with a whitelist — never with ``eval`` — so a formula read from a
command line or a file cannot run code. The leading ``1 +`` of a lifelines-style formula is optional.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nlmefit.errors import ModelSpecError

__all__ = ["Term", "parse_formula"]

_FUNCS = {"log": torch.log, "exp": torch.exp, "sqrt": torch.sqrt, "abs": torch.abs}
_BINOPS = {ast.Add: torch.add, ast.Sub: torch.sub, ast.Mult: torch.mul, ast.Div: torch.div, ast.Pow: torch.pow}


@dataclass(frozen=True)
class Term:
    """One covariate term of a parameter's formula; its coefficient is the θ named ``coef``."""

    param: str
    expr: str
    coef: str
    covariates: tuple[str, ...]

    def evaluate(self, cov: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _eval(ast.parse(self.expr, mode="eval").body, cov, self.expr)


def _names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in _FUNCS]


def _check(node: ast.AST, expr: str) -> None:
    for n in ast.walk(node):
        ok = isinstance(n, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.UAdd, ast.Name, ast.Load,
                            ast.Constant, ast.Call)) or type(n) in _BINOPS
        if isinstance(n, ast.Call) and not (isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords):
            ok = False
        if isinstance(n, ast.Constant) and not isinstance(n.value, (int, float)):
            ok = False
        if not ok:
            raise ModelSpecError(f"covariate formula term {expr!r}: unsupported syntax ({type(n).__name__}); "
                                 f"use covariate names, numbers, + - * / **, and {sorted(_FUNCS)}")


def _eval(node: ast.AST, cov: Mapping[str, torch.Tensor], expr: str):
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return cov[_lookup(node.id, cov, expr)]
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, cov, expr)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, cov, expr), _eval(node.right, cov, expr)
        if not torch.is_tensor(a) and not torch.is_tensor(b):
            return float(_BINOPS[type(node.op)](torch.tensor(a), torch.tensor(b)))
        return _BINOPS[type(node.op)](torch.as_tensor(a) if not torch.is_tensor(a) else a,
                                      b if torch.is_tensor(b) else torch.as_tensor(b, dtype=a.dtype, device=a.device))
    if isinstance(node, ast.Call):
        arg = _eval(node.args[0], cov, expr)
        return _FUNCS[node.func.id](torch.as_tensor(arg))
    raise ModelSpecError(f"covariate formula {expr!r}: cannot evaluate {ast.dump(node)}")


def _lookup(name: str, cov: Mapping[str, torch.Tensor], expr: str) -> str:
    """The covariate column ``name`` refers to: exact, else case-insensitive (as data columns are matched)."""
    if name in cov:
        return name
    found = [c for c in cov if str(c).strip().lower() == name.lower()]
    if len(found) == 1:
        return found[0]
    if found:
        raise ModelSpecError(f"covariate formula {expr!r} uses {name!r}, which matches several data columns "
                             f"case-insensitively ({sorted(found)}); spell it exactly")
    raise ModelSpecError(f"covariate formula {expr!r} uses {name!r}, which is not a data column "
                         f"(covariates: {sorted(cov)})")


def _split_terms(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _split_terms(node.left) + _split_terms(node.right)
    return [node]


def parse_formula(param: str, formula: str | list[str]) -> list[Term]:
    """Parse one parameter's formula into terms (the intercept ``1`` is dropped: θ_param is the intercept)."""
    exprs = list(formula) if isinstance(formula, (list, tuple)) else [formula]
    terms: list[Term] = []
    for text in exprs:
        try:
            tree = ast.parse(str(text), mode="eval")
        except SyntaxError as e:
            raise ModelSpecError(f"covariate formula for {param!r} is not valid: {text!r} ({e.msg})") from None
        for node in _split_terms(tree.body):
            if isinstance(node, ast.Constant) and node.value == 1:
                continue
            _check(node, text)
            expr = ast.unparse(node)
            names = tuple(dict.fromkeys(_names(node)))
            if not names:
                raise ModelSpecError(f"covariate formula for {param!r}: term {expr!r} uses no covariate")
            label = names[0] if expr == names[0] else expr.replace(" ", "")
            terms.append(Term(param, expr, f"beta_{param}_{label}", names))
    return terms
