import json
import pathlib

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

RESULTS = pathlib.Path(__file__).parent / "results"


@pytest.fixture(scope="session")
def reference():
    def load(name: str) -> dict:
        return json.loads((RESULTS / name).read_text())

    return load
