"""Issue 11, item 16: units where the data declare them (df.attrs["units"] or --units), carried into the
summary with the parameters' derived units (CL in L/h from AMT mg, DV mg/L, TIME h)."""
import json

import pytest

import nlmefit
from nlmefit.cli import main
from nlmefit.results.units import parameter_units


def test_parameter_units_follow_from_the_column_units():
    u = parameter_units(["cl", "v", "ka", "tlag", "beta_cl_wt", "omega_cl"], {"time": "h", "AMT": "mg", "DV": "mg/L"})
    assert u == {"cl": "L/h", "v": "L", "ka": "1/h", "tlag": "h"}
    assert parameter_units(["v"], {"AMT": "mg", "DV": "ng/mL"}) == {"v": "mg/(ng/mL)"}  # no silent conversion
    assert parameter_units(["cl"], {"AMT": "mg"}) == {}  # unknown: no guess
    with pytest.raises(ValueError, match="units"):
        parameter_units(["cl"], {"TIME": 3})


def test_dataframe_attrs_units_reach_the_summary():
    df = nlmefit.datasets.load("theophylline")
    df.attrs["units"] = {"TIME": "h", "AMT": "mg", "DV": "mg/L"}
    fit = nlmefit.fit(nlmefit.library.get("1cmt_oral"), df, method="fo", covariance=None)
    assert fit.source["units"]["DV"] == "mg/L"
    tab = fit.summary()
    assert tab.loc["cl", "unit"] == "L/h" and tab.loc["v", "unit"] == "L" and tab.loc["ka", "unit"] == "1/h"
    text = fit.summary_text()
    assert "units (declared by the data): TIME h, AMT mg, DV mg/L" in text and "L/h" in text
    plain = nlmefit.fit(nlmefit.library.get("1cmt_oral"), nlmefit.datasets.load("theophylline"), method="fo",
                        covariance=None)
    assert "units" not in plain.summary_text() and not plain.summary()["unit"].astype(bool).any()


def test_cli_units(tmp_path, capsys):
    out = tmp_path / "u"
    assert main(["fit", "theophylline", "--method", "fo", "--no-cov", "--quiet", "--units", "TIME=h", "--units",
                 "AMT=mg", "--units", "DV=mg/L", "--out", str(out)]) == 0
    assert "L/h" in capsys.readouterr().out
    assert json.loads((out / "result.json").read_text())["source"]["units"] == {"TIME": "h", "AMT": "mg",
                                                                              "DV": "mg/L"}
    assert main(["fit", "theophylline", "--units", "TIME", "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
