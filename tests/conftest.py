import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
# benchmarks/common.py, which the benchmark scripts tests load by path import (as `python
# benchmarks/SCRIPT.py` finds it beside the script)
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so default run directories (runs/...) never collide."""
    monkeypatch.chdir(tmp_path)
