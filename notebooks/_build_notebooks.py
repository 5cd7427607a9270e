"""Regenerate the notebooks from their cell lists.

    python notebooks/_build_notebooks.py --execute        # write and execute them in place: the committed form
    python notebooks/_build_notebooks.py --execute 05 06   # only these (file name, stem or its start)
    python notebooks/_build_notebooks.py                  # write the sources only, without outputs

The documentation site renders the committed notebooks as they are (mkdocs-jupyter with ``execute: false``), so
the committed notebooks are the executed ones: rerun with ``--execute`` after changing a cell (needs the ``docs``
extra, whose mkdocs-jupyter brings nbclient and ipykernel, i.e. a ``python3`` Jupyter kernel). Each notebook runs
in a fresh kernel in a temporary folder, with the settings given by ``SMALL`` below (small settings,
``NLMEFIT_SMALL=1``, where the full ones take more than a couple of minutes; the notebook's first cell says which
produced its outputs), progress bars off (``NLMEFIT_PROGRESS=0``) and matplotlib's inline backend. Execution
counts and outputs are kept; cell timings, widget state and the kernel's version details are not, and file paths
in warnings are made relative to the repository, so a rerun changes only what the computation changes (wall times
printed by the cells, unseeded random draws).
tests/test_notebooks.py runs the cells itself (small settings) and checks that the committed notebooks have the
sources written here and are executed; it does not compare outputs.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).parent
METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
# the stored outputs of these notebooks come from the small settings (NLMEFIT_SMALL=1); the others from the full
SMALL = {"01_data_and_models": False, "02_fit_theophylline_pheno": False, "03_em_and_exact_likelihood": False,
         "04_diagnostics_and_regimens": False, "05_variational": False, "06_benchmark_vs_generative": True}
NOTE = {False: "The outputs shown here were produced with the full settings "
               "(`python notebooks/_build_notebooks.py --execute`).",
        True: "The outputs shown here were produced with the small settings (`NLMEFIT_SMALL=1`, which "
              "`python notebooks/_build_notebooks.py --execute` uses for this notebook to keep the build short): "
              "estimates and figures are rougher than with the full settings."}
NOTEBOOKS = []  # (path, notebook dict), in order


def nb(cells, path):
    """Register a notebook: ``cells`` are (kind, source) pairs; the settings note goes under the first cell."""
    out = {"cells": [], "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}
    for i, (kind, src) in enumerate(cells):
        src = src.strip("\n")
        if i == 0:
            src += "\n\n" + NOTE[SMALL[path.stem]]
        c = {"cell_type": kind, "id": f"c{i}", "metadata": {}, "source": src.splitlines(keepends=True)}
        if kind == "code":
            c.update(outputs=[], execution_count=None)
        out["cells"].append(c)
    NOTEBOOKS.append((path, out))


def write(notebook, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(notebook, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _setenv(values):
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def execute(notebook, small, timeout):
    """Run ``notebook`` (a dict) top to bottom in a fresh python3 kernel; the executed notebook, without timings,
    widget state or kernel details."""
    import nbformat
    from nbclient import NotebookClient

    node = nbformat.reads(json.dumps(notebook), as_version=4)
    env = {"NLMEFIT_SMALL": "1" if small else "0", "NLMEFIT_PROGRESS": "0", "MPLBACKEND": None}  # None: unset
    saved = {k: os.environ.get(k) for k in env}
    _setenv(env)  # the kernel inherits the environment
    try:
        with tempfile.TemporaryDirectory() as tmp:  # files a notebook writes (bench_out/ …) land here
            NotebookClient(node, timeout=timeout, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": tmp}}).execute()
    finally:
        _setenv(saved)
    out = json.loads(nbformat.writes(node))  # sources and texts as lists of lines, like the unexecuted form
    out["metadata"] = METADATA
    root = str(HERE.resolve().parent) + os.sep
    for cell in out["cells"]:
        cell["metadata"] = {}
        for o in cell.get("outputs", []):
            o.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            if o["output_type"] == "stream":  # warnings name their file: relative to the repository, not this machine
                o["text"] = [line.replace(root, "") for line in o["text"]]
    return out


nb([
("markdown", """# 01 — Data and models

Load a shipped dataset, validate it into a `Panel`, plot the profiles, build a library model and simulate from it.
Set `NLMEFIT_SMALL=1` to run with small settings (the test suite does)."""),
("code", """import os
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import nlmefit

SMALL = os.environ.get("NLMEFIT_SMALL") == "1"
df = nlmefit.datasets.load("theophylline")
df.head()"""),
("code", """panel = nlmefit.Panel.from_dataframe(df)
panel"""),
("markdown", """Bad records are rejected at the boundary with the subject and time named:"""),
("code", """bad = df.copy()
bad.loc[3, "TIME"] = -1.0
try:
    nlmefit.Panel.from_dataframe(bad)
except nlmefit.DataError as e:
    print(e)"""),
("code", """obs = panel.observations_frame()
fig, ax = plt.subplots(figsize=(6, 4))
for i, g in obs.groupby("ID"):
    ax.plot(g["TIME"], g["DV"], marker="o", lw=1, ms=3)
ax.set_xlabel("time (h)"); ax.set_ylabel("theophylline (mg/L)"); ax.set_title("theophylline, 12 subjects")
plt.show()"""),
("markdown", """A library model: one-compartment, first-order absorption, log-normal IIV on every parameter."""),
("code", """model = nlmefit.library.get("1cmt_oral", error="additive",
                            theta={"cl": 2.8, "v": 32.0, "ka": 1.6},
                            omega={"cl": 0.07, "v": 0.02, "ka": 0.4}, sigma={"add": 0.7})
model"""),
("code", """n_rep = 5 if SMALL else 200
sim = nlmefit.simulate(model, None, df, n=n_rep, seed=2026)
q = sim[sim["EVID"] == 0].groupby("TIME")["DV"].quantile([0.05, 0.5, 0.95]).unstack()
fig, ax = plt.subplots(figsize=(6, 4))
ax.fill_between(q.index, q[0.05], q[0.95], alpha=0.3, label="simulated 90% interval")
ax.plot(q.index, q[0.5], label="simulated median")
ax.plot(obs["TIME"], obs["DV"], "k.", label="observed")
ax.legend(); ax.set_xlabel("time (h)"); ax.set_ylabel("mg/L")
plt.show()"""),
("markdown", """A design instead of a dataset: 100 mg q12h for 3 days in 50 virtual subjects."""),
("code", """sim2 = nlmefit.simulate(model, None, times=np.arange(0.5, 72, 1.0),
                        doses=[{"TIME": 0, "AMT": 320, "CMT": 1, "II": 12, "ADDL": 5}],
                        n_subjects=20 if SMALL else 200, seed=1)
sim2.head()"""),
], HERE / "01_data_and_models.ipynb")

nb([
("markdown", """# 02 — Fitting theophylline and phenobarbital

FOCE-I fits of two classic datasets, compared with their published references (nlmixr2 for theophylline,
NONMEM 7.4.2 for pheno_real). Set `NLMEFIT_SMALL=1` for small settings (the test suite does)."""),
("code", """import os
import matplotlib.pyplot as plt
import nlmefit
from nlmefit.models.examples import pheno_real

SMALL = os.environ.get("NLMEFIT_SMALL") == "1"
theo = nlmefit.datasets.load("theophylline")
model = nlmefit.library.get("1cmt_oral", error="additive")
fit = nlmefit.fit(model, theo, method="focei")
fit.print_summary()"""),
("markdown", """nlmixr2 reports OBJF 116.80–116.83 for this model (tka ≈ 0.466, tcl ≈ 1.012, tv ≈ 3.460 on the log scale)."""),
("code", """import numpy as np
print("OFV", round(fit.ofv, 3), " log typical values:", np.log(fit.theta[["ka", "cl", "v"]]).round(3).to_dict())"""),
("code", """methods = ["fo", "focei"] if SMALL else ["fo", "foce", "focei", "laplace"]
rows = []
for m in methods:
    r = nlmefit.fit(model, theo, method=m, covariance=None)
    rows.append({"method": m, "ofv": r.ofv, **r.estimates.to_dict(), "seconds": r.elapsed_s})
import pandas as pd
pd.DataFrame(rows).set_index("method").round(4)"""),
("code", """p = fit.predictions
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].plot(p["IPRED"], p["DV"], "o", ms=3); axes[0].axline((0, 0), slope=1, color="k", lw=1)
axes[0].set_xlabel("IPRED"); axes[0].set_ylabel("DV")
axes[1].plot(p["TIME"], p["CWRES"], "o", ms=3); axes[1].axhline(0, color="k", lw=1)
axes[1].set_xlabel("time (h)"); axes[1].set_ylabel("CWRES")
fig.tight_layout()
plt.show()"""),
("markdown", """## pheno_real

NONMEM's `$PK` block written as a Python function (see `docs/models.md`). NONMEM 7.4.2 FOCE-I: OFV 586.27606,
θ = (4.69555e−3, 0.984258, 0.158920), Ω = (0.0293508, 0.0279060), σ² = 0.0132410."""),
("code", """pheno = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"), method="focei")
pheno.print_summary()
print("sigma^2 =", pheno.estimates["sigma_prop"] ** 2)"""),
("code", """fit.to_json("theo_fit.json")
back = nlmefit.FitResult.from_json("theo_fit.json")
os.remove("theo_fit.json")
back"""),
], HERE / "02_fit_theophylline_pheno.ipynb")

nb([
("markdown", """# 03 — EM and the exact likelihood: FOCE-I, Laplace, AGQ and SAEM (+IS) on theo and pheno

The same model, four ways of handling the integral over η: linearisation (FOCE-I), a second-order expansion
(Laplace), quadrature (AGQ), and stochastic-approximation EM whose OFV comes from importance sampling (SAEM+IS).
Every fit's −2LL is then re-evaluated *exactly* (AGQ with many nodes) at its own estimates, so the methods are
compared on one scale. Set `NLMEFIT_SMALL=1` for small settings (the test suite does)."""),
("code", """import os, time, warnings
import pandas as pd
import nlmefit
from nlmefit.models.examples import pheno_real

SMALL = os.environ.get("NLMEFIT_SMALL") == "1"
cases = {"theo": (nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline")),
         "pheno": (pheno_real(), nlmefit.datasets.load("pheno"))}
saem_opts = dict(n_explore=30, n_smooth=30, n_samples=300) if SMALL else {}
methods = {"focei": {}, "laplace": {}, "agq": {"n_nodes": 3 if SMALL else 5}, "saem": dict(seed=1, **saem_opts)}"""),
("code", """rows, fits = [], {}
for name, (model, df) in cases.items():
    for method, opts in methods.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short SAEM runs in SMALL mode warn that they have not settled
            res = nlmefit.fit(model, df, method=method, covariance=None, **opts)
        fits[name, method] = res
        exact = nlmefit.loglik(res, "agq", n_nodes=5 if SMALL else 12).ofv
        rows.append({"data": name, "method": method, "ofv (own)": res.ofv, "exact -2LL at estimates": exact,
                     "time_s": time.perf_counter() - t0, **res.estimates.round(5).to_dict()})
table = pd.DataFrame(rows).set_index(["data", "method"])
table"""),
("markdown", """Read the table by column: `ofv (own)` is each method's own objective (SAEM's is an importance-sampling −2LL);
`exact -2LL at estimates` puts them on one scale. On theo FOCE-I's own OFV is ~1.3 below the exact value, yet
its estimates are almost as good as AGQ's and SAEM's: the approximation shifts the objective more than its
optimum."""),
("code", """res = fits["theo", "saem"]
print(res.likelihoods["is"])
fig = res.plot_traces()"""),
("code", """ll = nlmefit.loglik(fits["pheno", "focei"], "is", n_samples=500 if SMALL else 5000, proposal="t")
print(f"IS -2LL at the pheno FOCE-I optimum: {ll.ofv:.3f} +/- {ll.se:.3f}")
ll.per_subject.sort_values("ess").head()"""),
], HERE / "03_em_and_exact_likelihood.ipynb")

nb([
("markdown", """# 04 — Diagnostics and regimens

Fit theophylline and pheno, look at the standard diagnostics (GOF, individual fits, η, NPDE, VPC), then ask the
counterfactual questions: how would a population — or one of the observed subjects — fare under regimens that
were never given, and with what probability of target attainment. Set `NLMEFIT_SMALL=1` for small settings
(the test suite does)."""),
("code", """import os
import matplotlib
import matplotlib.pyplot as plt
import nlmefit
from nlmefit.models.examples import pheno_real

SMALL = os.environ.get("NLMEFIT_SMALL") == "1"
n_rep = 50 if SMALL else 500
theo = nlmefit.fit(nlmefit.library.get("1cmt_oral", error="additive"), nlmefit.datasets.load("theophylline"))
pheno = nlmefit.fit(pheno_real(), nlmefit.datasets.load("pheno"))
theo"""),
("markdown", """## Goodness of fit and individual fits"""),
("code", """fig = theo.plot_gof()"""),
("code", """pages = pheno.plot_individuals(ids=pheno.individual_estimates["ID"][:8], per_page=8)"""),
("code", """fig = pheno.plot_eta(covariates=True)"""),
("markdown", """## NPDE and VPC (simulation-based)"""),
("code", """res = pheno.npde(n_rep=n_rep, seed=1)
print(res.tests())
fig = res.plot()"""),
("code", """v = theo.vpc(n_rep=n_rep, seed=1)
print(v, f"coverage {v.coverage():.2f}")
fig = v.plot()
fig = theo.vpc(n_rep=n_rep, seed=1, pred_corrected=True).plot()"""),
("markdown", """## Regimen comparison with PTA

Three regimens of the same daily dose for a virtual population (η ~ N(0, Ω), covariates resampled from the
fitted subjects), exposures over the last dosing interval at steady state, and the probability that the
trough stays within 3–10 mg/L."""),
("code", """regimens = ["320 mg po q12h x14", "640 mg po q24h x7", "213.3 mg po q8h x21"]
sim = nlmefit.simulate_regimens(theo, regimens, population=300 if SMALL else 5000, seed=1,
                                steady_state=True, threshold=5.0)
fig = sim.plot_profiles()
sim.summary()[["AUC_q50", "CMAX_q50", "CTROUGH_q5", "CTROUGH_q50", "FT_ABOVE_PCT_q50"]]"""),
("code", """tab = sim.pta("CTROUGH", window=(3, 10))
fig = nlmefit.simulation.plot_pta(tab)
tab"""),
("markdown", """## What would subject 7 have seen?

η drawn from subject 7's posterior (sampling–importance–resampling), the same new regimen, no residual error."""),
("code", """own = nlmefit.simulate_regimens(theo, ["320 mg po q12h x14", "640 mg po q24h x7"], subjects=[7],
                                n_draws=100 if SMALL else 1000, posterior="is", seed=2, steady_state=True)
fig = own.plot_profiles()
own.summary()[["AUC_q5", "AUC_q50", "AUC_q95"]]"""),
("markdown", """## Individual fit against population plausibility: the Q/KL decomposition

For every subject, log p(y_i | θ) = Q_i − KL_i + gap_i: Q_i is how well the subject's posterior explains its
data, KL_i how far that posterior had to move from the population prior, and gap_i what the posterior family
(here the Laplace approximation) misses. The aggregate check compares the average posterior with the prior:
a large aggregate KL means simulations from the prior will not look like these subjects (docs/decomposition.md)."""),
("code", """dec = theo.decomposition(n_samples=300 if SMALL else 3000, seed=1)
print(dec.aggregate)
fig = dec.plot()
dec.table.sort_values("kl", ascending=False).head()"""),
("markdown", """## Predicting the next observation

log p(y_j | y_<j): the prior predictive for a subject's first observation, then the posterior given the ones
before. By the chain rule the terms of a subject sum to its log p(y_i | θ); a falling score over time points at
a structural misfit late in the profile."""),
("code", """osa = theo.one_step_ahead(method="agq", n_nodes=3 if SMALL else 7)
print(f"total {osa.total:.3f}")
fig = osa.plot()
osa.per_subject.head()"""),
], HERE / "04_diagnostics_and_regimens.ipynb")

nb([
("markdown", """# 05 — Variational EM with normalizing-flow posteriors

Variational EM maximises Σ_i ELBO_i(θ, q_i), where ELBO_i = E_q[log p(y_i | η, θ) + log p(η | θ) − log q_i(η)] ≤
log p(y_i | θ). Here q_i is a full-rank Gaussian or a normalizing flow (neural spline, `nsf`; masked
autoregressive, `maf`), one per subject — or one encoder for all subjects (`amortized=True`) that gives the
posterior of a *new* subject without any optimisation. The reported OFV is an importance-sampling −2LL with q_i
as the proposal; −2·ELBO is a bound, never an OFV (docs/variational.md).
Set `NLMEFIT_SMALL=1` to run with small settings (the test suite does)."""),
("code", """import os
import warnings
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import nlmefit

SMALL = os.environ.get("NLMEFIT_SMALL") == "1"
STEPS = 150 if SMALL else 3000
df = nlmefit.datasets.load("theophylline")
model = nlmefit.library.get("1cmt_oral", error="additive")
start = {"cl": 2.8, "v": 32.0, "ka": 1.6, "omega_cl": 0.07, "omega_v": 0.02, "omega_ka": 0.4, "sigma_add": 0.7}"""),
("markdown", """## Per-subject VEM on theophylline, Gaussian and neural-spline posteriors

Next to FOCE-I and the exact (adaptive Gauss–Hermite) likelihood at its optimum, 118.10."""),
("code", """fits = {"FOCE-I": nlmefit.fit(model, df, method="focei", init=start)}
for kind in ("gaussian", "nsf"):
    fits[f"VEM {kind}"] = nlmefit.fit(model, df, method="vem", posterior=kind, init=start, seed=1, max_steps=STEPS,
                                      min_steps=min(500, STEPS), n_is=300 if SMALL else 4000, covariance=None)
rows = {}  # -2LL and -2*ELBO with all constants (the OFV drops N*log(2*pi))
for k, f in fits.items():
    rows[k] = {"OFV": f.ofv, "-2LL": -2 * f.loglik, "-2*ELBO": f.likelihoods.get("elbo", {}).get("m2elbo"),
               "steps": f.n_iter, "converged": f.converged, **f.estimates.round(3).to_dict()}
pd.DataFrame(rows).T"""),
("markdown", """The ELBO trace (full constants), raw and smoothed; the dotted line is where the plateau rule held and the
learning rate was annealed."""),
("code", """fig, ax = plt.subplots(figsize=(6, 3.5))
for k in ("VEM gaussian", "VEM nsf"):
    tr = fits[k].traces
    ax.plot(tr.index, tr["elbo"], alpha=0.25)
    ax.plot(tr.index, tr["elbo_smoothed"], label=k)
    if "optimise" in fits[k].phases:
        ax.axvline(fits[k].phases["optimise"], ls=":", color="grey")
ax.set_ylim(np.percentile(tr["elbo_smoothed"], 5) - 20, tr["elbo_smoothed"].max() + 5)
ax.set_xlabel("step"); ax.set_ylabel("ELBO"); ax.legend()
plt.show()"""),
("markdown", """## A visibly non-Gaussian posterior

A flip-flop-prone design: ka ≈ k = CL/V, two samples per subject, large IIV on V and ka. θ is held at the truth
(`fix_population=True`), so the two families are compared on the posteriors alone. The ELBO gap −2·ELBO − (−2LL)
is 2·Σ_i KL(q_i ‖ p(η_i | y_i)): the flow closes most of what the Gaussian cannot."""),
("code", """truth = dict(cl=1.0, v=10.0, ka=0.12, omega_cl=0.05, omega_v=0.5, omega_ka=0.5, sigma_prop=0.03)
flip_model = nlmefit.library.get("1cmt_oral", error="proportional")
design = nlmefit.simulation.design_frame([2.0, 12.0], [{"TIME": 0.0, "AMT": 100.0}], n_subjects=5 if SMALL else 10)
flip = nlmefit.simulate(flip_model, truth, design, seed=3).drop(columns="REP")
post = {}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for kind in ("gaussian", "nsf"):
        post[kind] = nlmefit.fit(flip_model, flip, method="vem", posterior=kind, init=truth, fix_population=True,
                                 seed=1, covariance=None, max_steps=100 if SMALL else 600,
                                 min_steps=100 if SMALL else 600, lr_posterior=0.02,
                                 n_is=500 if SMALL else 4000, flow_options={"transforms": 3})
best = min(f.likelihoods["is"]["m2ll"] for f in post.values())
pd.DataFrame({k: {"-2*ELBO": f.likelihoods["elbo"]["m2elbo"], "IS -2LL": f.likelihoods["is"]["m2ll"],
                  "gap vs best IS": f.likelihoods["elbo"]["m2elbo"] - best} for k, f in post.items()}).T"""),
("code", """i = 0  # subject 1: draws of (η_V, η_ka) from each fitted posterior
fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), sharex=True, sharey=True)
for ax, (kind, f) in zip(axes, post.items()):
    with torch.no_grad():
        eta = f.posterior.sample((2000,))[:, i].numpy()
    ax.plot(eta[:, 1], eta[:, 2], ".", ms=1, alpha=0.4)
    ax.set_title(f"{kind}: subject {i + 1}"); ax.set_xlabel("η_V")
axes[0].set_ylabel("η_ka")
plt.show()"""),
("markdown", """## Amortized VEM: posteriors for new subjects without re-optimisation

One encoder (a masked set encoder over each subject's observation and dose records) is trained with θ on the
same ELBO. `fit.posterior.for_data(new)` then gives q_i for subjects it has never seen; as importance-sampling
proposals they give the held-out −2LL directly."""),
("code", """pop_truth = dict(cl=2.0, v=20.0, ka=1.5, omega_cl=0.09, omega_v=0.04, omega_ka=0.16, sigma_prop=0.1)
pop_model = nlmefit.library.get("1cmt_oral", error="proportional")
n_fit, n_new = (60, 10) if SMALL else (2000, 200)
design = nlmefit.simulation.design_frame([0.5, 1, 2, 4, 8, 12, 24], [{"TIME": 0.0, "AMT": 100.0}],
                                         n_subjects=n_fit + n_new)
sim = nlmefit.simulate(pop_model, pop_truth, design, seed=11).drop(columns="REP")
train, new = sim[sim["ID"] <= n_fit], sim[sim["ID"] > n_fit]
amort = nlmefit.fit(pop_model, train, method="vem", amortized=True, seed=1, init=pop_truth,
                    batch_size=min(n_fit, 200), max_steps=150 if SMALL else 6000, warm_steps=50 if SMALL else 500,
                    n_is=300 if SMALL else 2000, covariance=None)
pd.DataFrame({"truth": pd.Series(pop_truth), "amortized VEM": amort.estimates})"""),
("code", """q_new = amort.posterior.for_data(new)  # no optimisation
new_data = pop_model.prepare(new)
ll = nlmefit.marginal.marginal_loglik(pop_model, amort.population_parameters(), new_data, method="is",
                                      n_samples=300 if SMALL else 2000, proposal="posterior", posterior=q_new, seed=0)
print(f"held-out IS -2LL with the encoder's posteriors: {ll.m2ll:.2f} ± {ll.se:.2f} ({n_new} new subjects)")"""),
], HERE / "05_variational.ipynb")

nb([
("markdown", """# 06 — NLME against deep generative baselines

The same subjects, fitted by two NLME estimators (FOCE-I and flow VEM) and by seven generative baselines (PPCA,
VAE, DDPM, EBM, WGAN-GP, normalizing flow, flow matching), scored on held-out subjects and on regimens none of
them was trained on. Theory and objectives: `docs/baselines.md`. Set `NLMEFIT_SMALL=1` for small settings (the
test suite does)."""),
("code", """import os
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import nlmefit
from nlmefit.baselines import PanelView
from nlmefit.baselines.consistency import sample_log_prob_identity
from nlmefit.baselines.nf import NormalizingFlow
from nlmefit.baselines.ppca import PPCA
from nlmefit.benchmark.generative import run_benchmark, save
from nlmefit.benchmark.generative_data import simulate_benchmark
from nlmefit.metrics import compare

SMALL = os.environ.get("NLMEFIT_SMALL") == "1"
bench = simulate_benchmark("1cmt_oral", n_train=60 if SMALL else 500, n_test=30 if SMALL else 200, seed=0)
bench.train.head()"""),
("markdown", """## Subjects as vectors

A baseline sees each subject as the vector of its concentrations at the common sampling times. `PanelView`
builds it (and refuses data that are not on a common design); the dose history becomes the *context*, the
cumulative amount dosed by each sampling time."""),
("code", """train = PanelView.from_panel(bench.train)
test = PanelView.from_panel(bench.test)
q12 = PanelView.from_panel(bench.unseen["100 mg q12h"], common_regimen=False)
print(train, "design times", train.times)
print("context, 100 mg q12h:", q12.context[0])"""),
("markdown", """## One interface: fit, sample, log_prob, and the likelihood's kind

Every NLL is per subject on the concentration scale (the per-time-point standardisation's log-Jacobian is
included). PPCA is also an NLME model: its closed form and the Laplace fit give the same likelihood."""),
("code", """ppca = PPCA(2).fit(train)
ppca_laplace = PPCA(2, method="laplace").fit(train)
flow = NormalizingFlow(flow="nsf", trainer_options={"max_epochs": 30} if SMALL else None).fit(train)
pd.DataFrame({"kind": [ppca.kind, ppca_laplace.kind, flow.kind],
              "held-out NLL": [ppca.nll(test), ppca_laplace.nll(test), flow.nll(test)]},
             index=["PPCA closed form", "PPCA by Laplace", "NSF flow"])"""),
("code", """ratio, se = sample_log_prob_identity(flow, 500 if SMALL else 4000)
print(f"E_p[r/p] = {ratio:.3f} ± {se:.3f} (1 when sample and log_prob describe the same law)")
compare(flow.sample(1000), test, model="nsf")"""),
("markdown", """## The benchmark table

`run_benchmark` (and `nlmefit bench` on the command line) fits every model and scores it. On the unseen
regimens NLME predicts through its mechanism; the dose-conditioned baselines get the new context (outside their
training range), the others are "not applicable"."""),
("code", """# small settings: four of the nine models (the test suite runs all of them through `nlmefit bench`)
models = ("nlme_focei", "ppca", "nf", "flow_matching") if SMALL else None
res = run_benchmark(bench, **({"models": models} if models else {}), n_samples=300 if SMALL else 1000,
                    quick=SMALL, seed=0)
print(res.format())"""),
("code", """paths = save(res, "bench_out")
fig, ax = plt.subplots(figsize=(8, 3))
held = res.table[res.table["REGIMEN"] == res.table["REGIMEN"].iloc[0]]
ax.bar(held["MODEL"], held["COVERAGE_MAE"])
ax.set_ylabel("VPC coverage error"); ax.tick_params(axis="x", labelrotation=45)
plt.show()"""),
("markdown", """`bench_out/profiles.png` shows each model's simulated 5/50/95 % band against the held-out data, per regimen:
on the training regimen most models reproduce the data; on 300 mg and on the q12h regimen only NLME does."""),
], HERE / "06_benchmark_vs_generative.ipynb")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execute", action="store_true", help="execute the notebooks and store their outputs")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a cell may run (default 1800)")
    ap.add_argument("names", nargs="*", help="only these notebooks (file name, stem or its start: 05; default all)")
    args = ap.parse_args(argv)
    wanted = [pathlib.Path(n).stem for n in args.names]
    unknown = [w for w in wanted if not any(p.stem.startswith(w) for p, _ in NOTEBOOKS)]
    if unknown:
        ap.error(f"no such notebook: {unknown}")
    for path, notebook in NOTEBOOKS:
        if wanted and not any(path.stem.startswith(w) for w in wanted):
            continue
        if args.execute:
            t0 = time.perf_counter()
            notebook = execute(notebook, SMALL[path.stem], args.timeout)
            dt = time.perf_counter() - t0
        write(notebook, path)
        print("wrote", path.name, f"(executed, {'small' if SMALL[path.stem] else 'full'} settings, {dt:.0f} s)"
              if args.execute else "(sources only)", file=sys.stderr)


if __name__ == "__main__":
    main()
