"""The shipped datasets: names, shapes, counts and spot values.

Every expected number below was written down from the raw source files (see data/PROVENANCE.md); the tests do
not read anything outside the package, so they run where the reference collection is absent (CI).
"""
from __future__ import annotations

import pandas as pd
import pytest

from nlmefit import datasets

NAMES = ["theophylline", "warfarin", "pheno", "wang2007", "oral_1cpt", "bolus_2cpt", "infusion_1cpt", "bolus_1cpt",
         "infusion_2cpt", "oral_2cpt", "bolus_1cptmm", "bolus_2cptmm", "infusion_1cptmm", "infusion_2cptmm",
         "oral_1cptmm", "oral_2cptmm"]

# name -> (rows, subjects, observation records (EVID 0 / all rows when there is no EVID), dose records, columns)
EXPECTED = {
    "theophylline": (144, 12, 132, 12, ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "WT", "DOSE_MGKG"]),
    "warfarin": (515, 32, 483, 32, ["ID", "TIME", "AMT", "DV", "DVID", "EVID", "MDV", "WT", "AGE", "SEX"]),
    "pheno": (744, 59, 155, 589, ["ID", "TIME", "AMT", "WGT", "APGR", "DV", "FA1", "FA2", "EVID", "MDV"]),
    "wang2007": (20, 10, 20, 0, ["ID", "TIME", "DV"]),
    "oral_1cpt": (7920, 120, 6947, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V", "CL", "KA",
                                         "SS", "II", "SD", "CMT"]),
    "bolus_2cpt": (7920, 120, 6960, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V1", "CL", "Q",
                                          "V2", "SS", "II", "SD", "CMT"]),
    "infusion_1cpt": (7920, 120, 6953, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "RATE", "EVID", "DOSE", "V",
                                             "CL", "SS", "II", "SD", "CMT"]),
    "bolus_1cpt": (7920, 120, 6951, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V", "CL", "SS",
                                          "II", "SD", "CMT"]),
    "infusion_2cpt": (7920, 120, 6960, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "RATE", "EVID", "DOSE", "V",
                                             "CL", "Q", "V2", "SS", "II", "SD", "CMT"]),
    "oral_2cpt": (7920, 120, 6960, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V1", "CL", "Q",
                                         "V2", "KA", "SS", "II", "SD", "CMT"]),
    "bolus_1cptmm": (7920, 120, 6950, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V", "VM", "KM",
                                            "SD", "CMT"]),
    "bolus_2cptmm": (7920, 120, 6960, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V", "VM", "KM",
                                            "Q", "V2", "SD", "CMT"]),
    "infusion_1cptmm": (7920, 120, 6955, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "RATE", "EVID", "DOSE", "V",
                                               "VM", "KM", "SD", "CMT"]),
    "infusion_2cptmm": (7920, 120, 6960, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "RATE", "EVID", "DOSE", "V",
                                               "VM", "KM", "Q", "V2", "SD", "CMT"]),
    "oral_1cptmm": (7920, 120, 6959, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V", "VM", "KM",
                                           "KA", "SD", "CMT"]),
    "oral_2cptmm": (7920, 120, 6960, 960, ["ID", "TIME", "DV", "LNDV", "MDV", "AMT", "EVID", "DOSE", "V1", "VM", "KM",
                                           "Q", "V2", "KA", "SD", "CMT"]),
}

# name -> [(row index, {column: value})] copied from the raw files
SPOTS = {
    "theophylline": [(0, {"ID": 1, "TIME": 0.0, "DV": 0.0, "AMT": 319.992, "EVID": 1, "MDV": 1, "CMT": 1, "WT": 79.6,
                          "DOSE_MGKG": 4.02}),
                     (1, {"ID": 1, "TIME": 0.0, "DV": 0.74, "AMT": 0.0, "EVID": 0, "CMT": 2}),
                     (2, {"TIME": 0.25, "DV": 2.84}),
                     (143, {"ID": 12, "TIME": 24.15, "DV": 1.17, "WT": 60.5})],
    "warfarin": [(0, {"ID": 1, "TIME": 0.0, "AMT": 100.0, "DV": 0.0, "DVID": "cp", "EVID": 1, "MDV": 1, "WT": 66.7,
                      "AGE": 50, "SEX": "male"}),
                 (2, {"TIME": 1.0, "DV": 1.9, "DVID": "cp", "EVID": 0, "MDV": 0}),
                 (9, {"TIME": 24.0, "DV": 44.0, "DVID": "pca"}),
                 (514, {"ID": 33, "TIME": 120.0, "DV": 22.0, "DVID": "pca", "WT": 62.0, "AGE": 21})],
    "pheno": [(0, {"ID": 1, "TIME": 0.0, "AMT": 25.0, "WGT": 1.4, "APGR": 7, "DV": 0.0, "FA1": 1, "FA2": 1, "EVID": 1,
                   "MDV": 1}),
              (1, {"ID": 1, "TIME": 2.0, "AMT": 0.0, "DV": 17.3, "EVID": 0, "MDV": 0}),
              (2, {"TIME": 12.5, "AMT": 3.5}),
              (743, {"ID": 59, "TIME": 146.8, "WGT": 1.1, "APGR": 6, "DV": 40.2})],
    "wang2007": [(0, {"ID": 1, "TIME": 0, "DV": 10.68}), (1, {"ID": 1, "TIME": 1, "DV": 3.6837}),
                 (19, {"ID": 10, "TIME": 1, "DV": 6.6402})],
    "oral_1cpt": [(0, {"ID": 1, "TIME": 0.0, "AMT": 60000, "EVID": 1, "CMT": 1, "V": 86.51, "CL": 4.88, "KA": 1.089}),
                  (1, {"TIME": 0.25, "DV": 204.8, "LNDV": 5.3221, "CMT": 2}),
                  (7919, {"ID": 120, "TIME": 288.0, "DV": 1.4, "CL": 5.5, "KA": 0.752})],
    "bolus_2cpt": [(0, {"ID": 1, "AMT": 120000, "V1": 101.5, "CL": 3.57, "Q": 6.99, "V2": 59.19}),
                   (1, {"TIME": 0.25, "DV": 1040.7, "LNDV": 6.9476}),
                   (7919, {"ID": 120, "TIME": 288.0, "DV": 1.9, "DOSE": 10000, "V2": 45.2})],
    "infusion_1cpt": [(0, {"ID": 1, "AMT": 120000, "RATE": 120000, "EVID": 1, "V": 75.22, "CL": 3.36}),
                      (1, {"TIME": 0.25, "DV": 343.2}),
                      (7919, {"ID": 120, "TIME": 288.0, "DV": 1.7, "CL": 6.04})],
    "bolus_1cpt": [(0, {"ID": 1, "AMT": 60000.0, "V": 65.14, "CL": 4.07}),
                   (7919, {"ID": 120, "TIME": 288.0, "DV": 27.7})],
    "infusion_2cpt": [(0, {"ID": 1, "AMT": 60000.0, "V": 67.2, "CL": 4.0}),
                      (7919, {"ID": 120, "TIME": 288.0, "DV": 134.2})],
    "oral_2cpt": [(0, {"ID": 1, "AMT": 60000.0, "V1": 66.56, "CL": 2.59, "KA": 1.047}),
                  (7919, {"ID": 120, "TIME": 288.0, "DV": 351.9})],
    "bolus_1cptmm": [(0, {"ID": 1, "AMT": 40000.0, "V": 55.6, "VM": 800.7, "KM": 184.2}),
                     (7919, {"ID": 120, "TIME": 288.0, "DV": 1321.4})],
    "bolus_2cptmm": [(0, {"ID": 1, "AMT": 40000.0, "V": 35.54, "VM": 523.5, "KM": 194.9}),
                     (7919, {"ID": 120, "TIME": 288.0, "DV": 10.3})],
    "infusion_1cptmm": [(0, {"ID": 1, "AMT": 30000.0, "V": 63.54, "VM": 1058.0, "KM": 275.1}),
                        (7919, {"ID": 120, "TIME": 288.0, "DV": 423.3})],
    "infusion_2cptmm": [(0, {"ID": 1, "AMT": 60000.0, "V": 105.2, "VM": 868.0, "KM": 356.2}),
                        (7919, {"ID": 120, "TIME": 288.0, "DV": 18.2})],
    "oral_1cptmm": [(0, {"ID": 1, "AMT": 10000.0, "V": 80.95, "VM": 1029.2, "KM": 181.7, "KA": 0.968}),
                    (7919, {"ID": 120, "TIME": 288.0, "DV": 9.4})],
    "oral_2cptmm": [(0, {"ID": 1, "AMT": 20000.0, "V1": 94.18, "VM": 606.5, "KM": 249.8, "KA": 0.884}),
                    (7919, {"ID": 120, "TIME": 288.0, "DV": 1165.6})],
}

SIMULATED = ["oral_1cpt", "bolus_2cpt", "infusion_1cpt", "bolus_1cpt", "infusion_2cpt", "oral_2cpt"]


def test_names():
    assert datasets.names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_counts(name):
    rows, subjects, n_obs, n_dose, columns = EXPECTED[name]
    df = datasets.load(name)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == columns
    assert df.shape == (rows, len(columns))
    assert df["ID"].nunique() == subjects
    assert not df.isna().any().any()
    if "EVID" in df:
        assert int((df["EVID"] == 0).sum()) == n_obs
        assert int((df["EVID"] == 1).sum()) == n_dose
        assert ((df["MDV"] == 1) == (df["EVID"] != 0)).all()
    else:
        assert rows == n_obs and n_dose == 0


@pytest.mark.parametrize("name", NAMES)
def test_spot_values(name):
    df = datasets.load(name)
    for i, values in SPOTS[name]:
        for col, want in values.items():
            got = df[col].iloc[i]
            if isinstance(want, str):
                assert got == want, (name, i, col)
            else:
                assert got == pytest.approx(want, abs=1e-9), (name, i, col)


def test_column_sums():
    # whole-column checks that catch a changed or shifted value anywhere
    assert datasets.load("theophylline")["DV"].sum() == pytest.approx(654.78)
    assert datasets.load("theophylline")["AMT"].sum() == pytest.approx(3785.278)
    assert datasets.load("warfarin")["DV"].sum() == pytest.approx(10310.3)
    assert datasets.load("warfarin")["AMT"].sum() == pytest.approx(3360.0)
    assert datasets.load("pheno")["DV"].sum() == pytest.approx(3964.3)
    assert datasets.load("pheno")["AMT"].sum() == pytest.approx(3929.2)
    assert datasets.load("wang2007")["DV"].sum() == pytest.approx(161.7008)
    assert datasets.load("oral_1cpt")["DV"].sum() == pytest.approx(3507718.4)
    assert datasets.load("bolus_2cpt")["DV"].sum() == pytest.approx(4165371.4)
    assert datasets.load("infusion_1cpt")["DV"].sum() == pytest.approx(3823511.6)
    assert datasets.load("bolus_1cpt")["DV"].sum() == pytest.approx(4297301.7)
    assert datasets.load("infusion_2cpt")["DV"].sum() == pytest.approx(3799887.7)
    assert datasets.load("oral_2cpt")["DV"].sum() == pytest.approx(3508168.6)
    assert datasets.load("bolus_1cptmm")["DV"].sum() == pytest.approx(11067110.3)
    assert datasets.load("bolus_2cptmm")["DV"].sum() == pytest.approx(6801929.0)
    assert datasets.load("infusion_1cptmm")["DV"].sum() == pytest.approx(16798799.9)
    assert datasets.load("infusion_2cptmm")["DV"].sum() == pytest.approx(10267880.2)
    assert datasets.load("oral_1cptmm")["DV"].sum() == pytest.approx(9802530.6)
    assert datasets.load("oral_2cptmm")["DV"].sum() == pytest.approx(6404310.0)
    for name in SIMULATED:
        assert datasets.load(name)["AMT"].sum() == 52_800_000


def test_dataset_specifics():
    warf = datasets.load("warfarin")
    obs = warf[warf["EVID"] == 0]
    assert obs["DVID"].value_counts().to_dict() == {"cp": 251, "pca": 232}
    assert set(warf.loc[warf["EVID"] == 1, "DVID"]) == {"cp"}
    assert 11 not in set(warf["ID"]) and warf["ID"].max() == 33
    assert int(((obs["DVID"] == "cp") & (obs["DV"] == 0)).sum()) == 4

    pheno = datasets.load("pheno")
    assert ((pheno["EVID"] == 1) == (pheno["AMT"] > 0)).all()
    assert (pheno["DV"][pheno["EVID"] == 1] == 0).all()

    theo = datasets.load("theophylline")
    assert (theo.loc[theo["EVID"] == 1, "TIME"] == 0).all()
    assert (theo.loc[theo["EVID"] == 1, "CMT"] == 1).all() and (theo.loc[theo["EVID"] == 0, "CMT"] == 2).all()

    wang = datasets.load("wang2007")
    assert "AMT" not in wang and sorted(wang["TIME"].unique()) == [0, 1]


@pytest.mark.parametrize("name", SIMULATED)
def test_ss99_mapped(name):
    raw = datasets.load(name, raw=True)
    assert raw["SS"].value_counts().to_dict() == {99: 5520, 0: 2280, 1: 120}
    assert raw.loc[raw["SS"] != 99, "TIME"].min() == 216.0
    df = datasets.load(name)
    assert df["SS"].value_counts().to_dict() == {0: 7800, 1: 120}
    pd.testing.assert_frame_equal(df.drop(columns="SS"), raw.drop(columns="SS"))
    ss_dose = df[df["SS"] == 1]
    assert (ss_dose["TIME"] == 216.0).all() and (ss_dose["II"] == 24).all() and (ss_dose["EVID"] == 1).all()
    assert df["SD"].value_counts().to_dict() == {0: 5520, 1: 2400}


def test_fresh_copy():
    a = datasets.load("theophylline")
    a.loc[0, "DV"] = -1.0
    a["NEW"] = 1
    b = datasets.load("theophylline")
    assert b.loc[0, "DV"] == 0.0 and "NEW" not in b
    assert a is not b


def test_path():
    for name in NAMES:
        p = datasets.path(name)
        assert p.is_file() and p.suffix == ".csv"
    assert datasets.path("pheno").name == "pheno.csv"


@pytest.mark.parametrize("bad", ["nope", "Theophylline", "theo_sd", ""])
def test_unknown_name(bad):
    with pytest.raises(ValueError) as exc:
        datasets.load(bad)
    for name in NAMES:
        assert name in str(exc.value)
    with pytest.raises(ValueError):
        datasets.path(bad)


def test_provenance_documents_every_file():
    prov = datasets.path("theophylline").parent / "PROVENANCE.md"
    assert prov.is_file()
    text = prov.read_text(encoding="utf-8")
    for name in NAMES:
        assert datasets.path(name).name in text


@pytest.mark.parametrize("name", NAMES)
def test_builds_a_panel(name):
    from nlmefit.panel import Panel

    rows, subjects, n_obs, n_dose, _ = EXPECTED[name]
    panel = Panel.from_dataframe(datasets.load(name))
    assert (panel.n_subjects, panel.n_obs, panel.n_dose_records) == (subjects, n_obs, n_dose)
