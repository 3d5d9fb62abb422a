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


def test_noise_budget_separates_init_from_draw_spread_and_gives_the_mdd(tmp_path):
    """Init runs (split seed fixed, every image labeled, or an --init file) and draw runs are pooled
    apart; the MDD is t_{0.975,n−1} · sd_paired / √n, from paired differences where a baseline pairs."""

    def record(method, seed, miou, fraction=0.125, **extra):
        return {"dataset": "d", "fraction": fraction, "method": method, "seed": seed, "miou": miou, **extra}

    draw = [record("sup", s, v) for s, v in enumerate((0.50, 0.54, 0.58))]
    draw += [record("ssl", s, v) for s, v in enumerate((0.52, 0.57, 0.59))]  # paired diffs 2, 3, 1 points
    init = [record("sup", s, v, split_seed=7) for s, v in enumerate((0.60, 0.61, 0.62))]  # sd 1
    init += [record("sup", s, v, split_seed=8) for s, v in enumerate((0.70, 0.72))]  # sd √2
    full = [record("sup", s, v, fraction=1.0) for s, v in enumerate((0.80, 0.80, 0.83))]
    fixed = [record("ssl", s, v) for s, v in enumerate((0.40, 0.44))]  # one split, older records
    (tmp_path / "draw.json").write_text(json.dumps(draw + init))
    (tmp_path / "full.json").write_text(json.dumps(full))
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    out = tmp_path / "budget"
    script = REPO / "benchmarks" / "noise_budget.py"
    args = [str(tmp_path / "draw.json"), str(tmp_path / "full.json"), str(tmp_path / "draw.json")]
    args += ["--init", str(tmp_path / "fixed.json"), "--baseline", "sup", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True, text=True)
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    sup, ssl = rows["sup"], rows["ssl"]
    assert sup["draw"]["sd"] == pytest.approx(4.0) and sup["draw"]["runs"] == 3  # the file twice: once
    # split seeds 7 and 8 and the full-label runs: Σ (n−1) s² = 2·1 + 1·2 + 2·3 = 10 over 5 df
    assert sup["init"]["runs"] == 8 and sup["init"]["groups"] == 3
    assert sup["init"]["sd"] == pytest.approx((10 / 5) ** 0.5)
    assert ssl["init"]["sd"] == pytest.approx(2 * 2**0.5) and ssl["init"]["fractions"] == ["1/8"]
    # ssl − sup paired by seed: 2, 3, 1 points → sd 1; t_{0.975,2} = 4.302653, t_{0.975,4} = 2.776445
    assert ssl["mdd_draw"]["sd_paired"] == pytest.approx(1.0)
    assert ssl["mdd_draw"]["n3"] == pytest.approx(4.302653 / 3**0.5, abs=1e-5)
    assert ssl["mdd_draw"]["n5"] == pytest.approx(2.776445 / 5**0.5, abs=1e-5)
    # the baseline itself, and ssl's init runs (no sup run on that split): √2 · sd
    assert sup["mdd_draw"]["sd_paired"] == pytest.approx(4.0 * 2**0.5)
    assert ssl["mdd_init"]["sd_paired"] == pytest.approx(4.0) and "√2" in ssl["mdd_init"]["source"]
    table = out.with_suffix(".md").read_text()
    lines = table.splitlines()
    ssl_line = next(line for line in lines if line.startswith("| d | ssl |"))
    assert ssl_line == (
        "| d | ssl | 2.83 (2 runs, 1/8) | 3.61 (3 runs, 1/8) | 2.48 / 1.24 (sd 1.00: paired vs sup, 3 pairs) "
        "| 9.94 / 4.97 (sd 4.00: √2 · 2.83) |"
    )
    sup_line = next(line for line in lines if line.startswith("| d | sup |"))
    assert sup_line.startswith("| d | sup | 1.41 (8 runs, 3 groups, 1/8, 1/1) | 4.00 (3 runs, 1/8) | 14.05 ")
    assert "t_{0.975,n−1} · sd_paired / √n" in table and "noise_budget.py" in table
    nothing = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fixed.json"), "--metric", "mdice"],
        capture_output=True,
        text=True,
    )
    assert nothing.returncode != 0 and "no (dataset, method)" in nothing.stderr
