"""Notebook display: Panel, Regimen, RegimenSimulation, Decomposition, OneStepAhead, VPC and NPDE results have
``_repr_html_`` in one layout (``nlmefit._html.object_html``), with user text escaped."""
import pytest

import nlmefit
from nlmefit._html import object_html


@pytest.fixture(scope="module")
def theo_fit():
    return nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline"))


def test_object_html_escapes_and_truncates():
    import pandas as pd

    h = object_html("a <b>", ["x & y"], [("t", pd.DataFrame({"v": range(30)}))], max_rows=5)
    assert h.startswith("<div><b>a &lt;b&gt;</b><br>x &amp; y") and "25 more rows" in h


def test_panel_and_regimen(theo_fit):
    h = nlmefit.Panel.from_dataframe(nlmefit.datasets.load("theophylline"))._repr_html_()
    assert "12 subjects, 132 observations" in h and "<table" in h
    r = nlmefit.Regimen.parse("100 mg q12h x3")
    h = r._repr_html_()
    assert "3 doses" in h and h.count("</tr>") == 4  # header + 3 doses


def test_simulation_and_diagnostics(theo_fit):
    sim = nlmefit.simulate_regimens(theo_fit, ["100 mg q12h x3"], population=20, seed=0)
    assert "RegimenSimulation" in sim._repr_html_() and "exposure quantiles" in sim._repr_html_()
    dec = theo_fit.decomposition(n_samples=100)
    h = dec._repr_html_()
    assert "Q − KL" in h and "subjects" in h
    osa = theo_fit.one_step_ahead(n_samples=50)
    assert "one-step" in osa._repr_html_().lower()
    assert "VPC" in theo_fit.vpc(n_rep=20, seed=0)._repr_html_()
    assert "NPDE" in theo_fit.npde(n_rep=50, seed=0)._repr_html_()
