"""Diagnostic figures for the documentation: GOF panels (theophylline) and individual fits (pheno).

    python docs/figures/make_diagnostic_figures.py            # writes docs/figures/*.png

Each figure has its own function (``gof_theophylline``, ``individuals_pheno``) taking the output folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import nlmefit  # noqa: E402
from nlmefit.diagnostics.gof import plot_gof  # noqa: E402
from nlmefit.diagnostics.individual import plot_individuals  # noqa: E402

HERE = Path(__file__).resolve().parent


def gof_theophylline(out_dir: Path = HERE) -> Path:
    """FOCE-I fit of the 1-cmt oral model to theophylline; the 2×2 goodness-of-fit figure."""
    model = nlmefit.library.get("1cmt_oral", error="additive")
    fit = nlmefit.fit(model, nlmefit.datasets.load("theophylline"), method="focei", covariance=None)
    fig = plot_gof(fit, title=f"Theophylline, 1-cmt oral, FOCE-I (OFV {fit.ofv:.2f})")
    path = Path(out_dir) / "gof_theophylline.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def individuals_pheno(out_dir: Path = HERE, n_subjects: int = 12) -> Path:
    """FOCE-I fit of pheno_real; individual fits of the first ``n_subjects`` neonates (repeated IV doses)."""
    fit = nlmefit.fit(nlmefit.models.examples.pheno_real(), nlmefit.datasets.load("pheno"), method="focei",
                      covariance=None)
    ids = list(fit.data.panel.ids[:n_subjects])
    title = f"Phenobarbital in neonates (pheno_real, FOCE-I, OFV {fit.ofv:.2f}): first {n_subjects} subjects"
    fig = plot_individuals(fit, ids=ids, per_page=n_subjects, ncols=4, title=title)[0]
    path = Path(out_dir) / "individuals_pheno.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or [str(HERE)])[0])
    out.mkdir(parents=True, exist_ok=True)
    for make in (gof_theophylline, individuals_pheno):
        print(make(out))


if __name__ == "__main__":
    main()
