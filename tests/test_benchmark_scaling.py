"""The scale-out benchmarks run (tiny sizes): ``nlmefit.benchmark.scaling`` and ``nlmefit.benchmark.devices``."""
from __future__ import annotations

import numpy as np
import pandas as pd

from nlmefit.benchmark import devices, scaling


def test_population_is_written_in_blocks_with_distinct_ids(tmp_path, monkeypatch):
    monkeypatch.setattr(scaling, "BLOCK", 40)
    csv = tmp_path / "sim.csv"
    scaling.write_population(csv, 100)  # blocks of 40, 40, 20 subjects
    df = pd.read_csv(csv)
    assert df["ID"].nunique() == 100 and df["ID"].min() == 1 and df["ID"].max() == 100
    assert (df.groupby("ID").size() == 11).all()  # one dose + 10 samples each
    first = df[df["ID"] == 1]["DV"].to_numpy()
    block2 = df[df["ID"] == 41]["DV"].to_numpy()
    assert not np.allclose(first, block2, equal_nan=True)  # each block has its own seed


def test_devices_prints_per_subject_costs(capsys):
    rows = devices.run([30], ["fo", "saem", "simulate"], repeats=1)
    assert [r["task"] for r in rows] == ["fo", "saem", "simulate"]
    assert all(r["cpu_us"] > 0 for r in rows)
    assert "CPU us/subj" in capsys.readouterr().out
