"""Regenerate the figures under docs/figures/ (one function per figure): ``python docs/figures/make_figures.py``."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nlmefit  # noqa: E402
from nlmefit.diagnostics.npde import npde, plot_npde  # noqa: E402
from nlmefit.diagnostics.vpc import plot_vpc, vpc  # noqa: E402
from nlmefit.models import examples  # noqa: E402

HERE = Path(__file__).resolve().parent


def vpc_theophylline(path: Path = HERE / "vpc_theophylline.png") -> Path:
    """VPC of the FOCE-I 1cmt_oral (additive error) fit of the theophylline data."""
    df = nlmefit.datasets.load("theophylline")
    fit = nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), df, method="focei", covariance=None)
    res = vpc(fit, n_rep=1000, seed=1)
    fig = plot_vpc(res)
    ax = fig.axes[0]
    ax.set_title(f"Theophylline, 1-cmt oral (FOCE-I): VPC, {res.n_rep} replicates", fontsize=10)
    ax.set_xlabel("time (h)")
    ax.set_ylabel("theophylline concentration (mg/L)")
    fig.savefig(path, dpi=150)
    return path


def npde_pheno(path: Path = HERE / "npde_pheno.png") -> Path:
    """NPDE panel of the FOCE-I fit of pheno_real on the phenobarbital data."""
    fit = nlmefit.fit(examples.pheno_real(), nlmefit.datasets.load("pheno"), method="focei", covariance=None)
    res = npde(fit, n_rep=1000, seed=1)
    fig = plot_npde(res)
    fig.axes[2].set_xlabel("time (h)")
    fig.axes[3].set_xlabel("PRED (mg/L)")
    fig.suptitle(f"pheno_real (FOCE-I): NPDE, K = {res.n_rep}, global test p = "
                 f"{res.tests().loc['global', 'p_value']:.3g}", fontsize=10)
    fig.savefig(path, dpi=150)
    return path


FIGURES = [vpc_theophylline, npde_pheno]

if __name__ == "__main__":
    for make in FIGURES:
        print(make())
