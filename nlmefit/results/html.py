"""Notebook display (``_repr_html_``) of nlmefit's result objects: a bold title, a few lines, tables.

``fit_result_html`` for a FitResult; :func:`nlmefit._html.object_html` is the one layout every other object uses
(Panel, Regimen, RegimenSimulation, Decomposition, OneStepAhead, VPC, NPDE), so they look alike in a notebook.
"""
from __future__ import annotations

import html

from nlmefit._html import object_html

__all__ = ["fit_result_html", "object_html"]


def fit_result_html(fit) -> str:
    """HTML for ``FitResult._repr_html_``: method, model, OFV, status, covariance step, parameter table."""
    status = "successful" if fit.converged else "NOT successful"
    rows = [
        f"<b>nlmefit {html.escape(fit.method.upper())}</b> fit of <b>{html.escape(str(fit.model_name))}</b>",
        f"{fit.n_subjects} subjects, {fit.n_obs} observations, {fit.n_estimated} estimated parameters",
        f"OFV {fit.ofv:.4f} &nbsp; −2LL {-2 * fit.loglik:.4f} &nbsp; AIC {fit.aic:.4f} &nbsp; BIC {fit.bic:.4f}",
        f"estimation {status} after {fit.n_iter} iterations ({fit.elapsed_s:.2f} s); covariance step: "
        f"{html.escape(fit.covariance_message or 'not run')}",
    ]
    for meth, val in fit.likelihoods.items():
        if "ofv" not in val:  # a bound (the VEM ELBO), not an OFV
            if "m2elbo" in val:
                rows.append(f"−2·ELBO {val['m2elbo']:.4f} (a bound on −2LL, full constants)")
            continue
        se = f" ± {val['se']:.3f} (MC SE)" if val.get("se") else ""
        rows.append(f"−2LL by {html.escape(meth)}: OFV {val['ofv']:.4f}{se}")
    table = fit.summary().to_html(float_format=lambda v: f"{v:.4g}", na_rep="", border=0)
    return "<div>" + "<br>".join(rows) + table + "</div>"
