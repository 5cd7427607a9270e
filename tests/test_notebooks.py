"""Every notebook runs top to bottom with small settings (NLMEFIT_SMALL=1), in a temporary folder."""
import json
import pathlib

import matplotlib
import pytest

matplotlib.use("Agg")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("NLMEFIT_SMALL", "1")
    monkeypatch.chdir(tmp_path)
    cells = json.loads(path.read_text())["cells"]
    namespace = {"__name__": "__notebook__"}
    for k, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        exec(compile(src, f"{path.name}[cell {k}]", "exec"), namespace)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"01_data_and_models", "02_fit_theophylline_pheno",
                                           "03_em_and_exact_likelihood", "04_diagnostics_and_regimens",
                                           "05_variational", "06_benchmark_vs_generative"}
