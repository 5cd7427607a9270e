"""Shipped NONMEM-style datasets.

>>> from nlmefit import datasets
>>> datasets.names()
['theophylline', 'warfarin', 'pheno', 'wang2007', 'oral_1cpt', 'bolus_2cpt', 'infusion_1cpt', 'bolus_1cpt', ...]
>>> df = datasets.load("theophylline")        # a fresh DataFrame on every call

The canonical CSVs live in the repository's top-level ``data/`` folder, described (source, licence, units,
transformations) in ``data/PROVENANCE.md``. A built wheel carries them as ``nlmefit/datasets/files/*.csv``
(setup.cfg maps the package ``nlmefit.datasets.files`` to ``data/``); a source checkout or editable install reads
``data/`` itself.

``load`` returns the file as stored, with one exception: the simulated ACOP-2016 sets with linear elimination
(``bolus_1cpt``, ``bolus_2cpt``, ``infusion_1cpt``, ``infusion_2cpt``, ``oral_1cpt``, ``oral_2cpt``) mark the
records that are not part of the steady-state block with ``SS = 99``, which is not a NONMEM SS value; ``load``
maps it to ``SS = 0``. ``load(name, raw=True)`` keeps ``99`` — use that to select the steady-state subset of the
validation runs (``df[df.SS != 99]``). The Michaelis–Menten sets (``*_1cptmm``, ``*_2cptmm``) have no SS column.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["load", "names", "path", "describe"]

#: name -> (file name, one-line description)
_DATASETS: dict[str, tuple[str, str]] = {
    "theophylline": ("theophylline.csv", "Theophylline, single oral dose, 12 subjects (Boeckmann et al. 1994; THEOPP)"),
    "warfarin": ("warfarin.csv", "Warfarin PK (DVID cp) and PCA PD (DVID pca), 32 subjects (O'Reilly)"),
    "pheno": ("pheno.csv", "Phenobarbital in 59 neonates, repeated IV doses (Grasela & Donn 1985; pheno_real)"),
    "wang2007": ("wang2007.csv", "Wang (2007) toy data, 10 subjects x 2 observations, no dose records"),
}
# the simulated ACOP 2016 / Schoemaker et al. sets of nlmixr2data (120 subjects each; data/PROVENANCE.md)
_ACOP_LINEAR = {"oral_1cpt": ("Oral_1CPT", "1-cmt oral"), "bolus_2cpt": ("Bolus_2CPT", "2-cmt IV bolus"),
                "infusion_1cpt": ("Infusion_1CPT", "1-cmt 1-h infusion"),
                "bolus_1cpt": ("Bolus_1CPT", "1-cmt IV bolus"),
                "infusion_2cpt": ("Infusion_2CPT", "2-cmt 1-h infusion"), "oral_2cpt": ("Oral_2CPT", "2-cmt oral")}
_ACOP_MM = {"bolus_1cptmm": ("Bolus_1CPTMM", "1-cmt IV bolus"), "bolus_2cptmm": ("Bolus_2CPTMM", "2-cmt IV bolus"),
            "infusion_1cptmm": ("Infusion_1CPTMM", "1-cmt 1-h infusion"),
            "infusion_2cptmm": ("Infusion_2CPTMM", "2-cmt 1-h infusion"),
            "oral_1cptmm": ("Oral_1CPTMM", "1-cmt oral"), "oral_2cptmm": ("Oral_2CPTMM", "2-cmt oral")}
for _n, (_f, _d) in _ACOP_LINEAR.items():
    _DATASETS[_n] = (f"{_f}.csv", f"Simulated {_d}, 120 subjects, SD + MD + SS (ACOP 2016 / nlmixr2data)")
for _n, (_f, _d) in _ACOP_MM.items():
    _DATASETS[_n] = (f"{_f}.csv", f"Simulated {_d}, Michaelis-Menten elimination, 120 subjects, SD + MD (ACOP 2016 "
                                  f"/ nlmixr2data)")

#: the simulated sets whose SS column uses 99 for "not a steady-state record"
_SS99 = frozenset(_ACOP_LINEAR)

_HERE = Path(__file__).resolve().parent


def _data_dir() -> Path:
    """The folder holding the CSVs: inside the package (wheel install) or the checkout's ``data/``."""
    candidates = (_HERE / "files", _HERE.parent.parent / "data")
    for d in candidates:
        if (d / "theophylline.csv").is_file():
            return d
    raise FileNotFoundError("nlmefit's dataset files were not found (looked in "
                            + ", ".join(str(d) for d in candidates) + "); the installation is incomplete")


def names() -> list[str]:
    """The names of the shipped datasets."""
    return list(_DATASETS)


def _check(name: str) -> str:
    if not isinstance(name, str) or name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(_DATASETS)}")
    return name


def path(name: str) -> Path:
    """The path of the CSV file behind dataset ``name``."""
    return _data_dir() / _DATASETS[_check(name)][0]


def describe(name: str) -> str:
    """A one-line description of dataset ``name`` (details in data/PROVENANCE.md)."""
    return _DATASETS[_check(name)][1]


def load(name: str, *, raw: bool = False) -> pd.DataFrame:
    """Dataset ``name`` as a new DataFrame (NONMEM event format; see data/PROVENANCE.md for columns and units).

    ``raw=False`` (default) maps ``SS = 99`` to ``0`` in the simulated sets; ``raw=True`` returns the file as stored.
    """
    df = pd.read_csv(path(name))
    if not raw and name in _SS99:
        df["SS"] = df["SS"].where(df["SS"] != 99, 0)
    return df
