"""Benchmark helper scripts that decide which images a selection run may see."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPT = REPO / "benchmarks" / "hold_out_split.py"


def _write(folder, part, names):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{part}.txt").write_text("".join(f"{n}\n" for n in names))


def _read(path):
    return path.read_text().split()


def test_hold_out_split_never_touches_labeled_or_test(tmp_path):
    """Validation comes from the unlabeled pool only; the full twin labels exactly the rest."""
    source = tmp_path / "cell"
    labeled, unlabeled, test = ["a", "b"], [f"u{i}" for i in range(9)], ["t1", "t2"]
    _write(source, "labeled", labeled)
    _write(source, "unlabeled", unlabeled)
    _write(source, "test", test)
    out = tmp_path / "val_split"
    args = [
        sys.executable,
        str(SCRIPT),
        str(source),
        "--val",
        "3",
        "--seed",
        "2",
        "--out",
        str(out),
        "--full",
    ]
    subprocess.run(args, check=True, capture_output=True, text=True)
    val, rest = _read(out / "val.txt"), _read(out / "unlabeled.txt")
    assert len(val) == 3 and set(val) <= set(unlabeled)
    assert sorted(val + rest) == sorted(unlabeled) and not set(val) & set(rest)
    assert _read(out / "labeled.txt") == labeled and _read(out / "test.txt") == test
    full = tmp_path / "val_split_full"
    assert _read(full / "labeled.txt") == labeled + rest and _read(full / "val.txt") == val
    assert not (full / "unlabeled.txt").exists()
    again = subprocess.run(args, capture_output=True, text=True)  # an existing output is never overwritten
    assert again.returncode != 0 and "exists" in again.stderr and _read(out / "val.txt") == val


def test_hold_out_split_rejects_a_pool_too_small(tmp_path):
    source = tmp_path / "cell"
    _write(source, "labeled", ["a"])
    _write(source, "unlabeled", ["u0", "u1"])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(source), "--val", "2", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "--val 2" in result.stderr and not (tmp_path / "o").exists()


def test_label_ceiling_pairs_seeds_and_flags_a_bar_above_full_labels(tmp_path):
    """The bar is the same seed's supervised + margin, flagged when above that seed's full-label run."""

    def record(method, seed, miou, fraction=0.125):
        return {"dataset": "d", "fraction": fraction, "method": method, "seed": seed, "miou": miou}

    table = [record("sup", 0, 0.60), record("ssl", 0, 0.66), record("sup", 1, 0.70), record("ssl", 1, 0.69)]
    full = [record("sup", 0, 0.70, 1.0), record("sup", 1, 0.72, 1.0)]
    (tmp_path / "t.json").write_text(json.dumps(table))
    (tmp_path / "f.json").write_text(json.dumps(full))
    out = tmp_path / "ceiling"
    script = REPO / "benchmarks" / "label_ceiling.py"
    args = [str(tmp_path / "t.json"), str(tmp_path / "f.json"), "--baseline", "sup", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0]["bar"] == pytest.approx(63.0) and rows[0]["headroom"] == pytest.approx(10.0)
    assert rows[0]["best_method"] == "ssl" and rows[0]["best"] == pytest.approx(66.0)
    assert not rows[0]["bar_above_ceiling"] and rows[1]["bar_above_ceiling"]  # 73 > 72
    table_md = out.with_suffix(".md").read_text()
    assert "| d | 0.125 | mean | 65.00 | 68.00 | – | 71.00 | +6.00 | no |" in table_md
