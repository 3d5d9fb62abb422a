"""Confusion-matrix metrics against brute-force loops, edge cases and formatting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semiseg.metrics import ConfusionMatrix, format_table


def brute_force(pred: np.ndarray, target: np.ndarray, c: int):
    """Per-class IoU/Dice, nan-mean IoU and accuracy from explicit loops (no matrix)."""
    iou, dice = [], []
    for k in range(c):
        tp = fp = fn = 0
        for p, t in zip(pred.ravel(), target.ravel()):
            if t == 255:
                continue
            tp += int(p == k and t == k)
            fp += int(p == k and t != k)
            fn += int(p != k and t == k)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan)
    valid = [(p, t) for p, t in zip(pred.ravel(), target.ravel()) if t != 255]
    acc = sum(p == t for p, t in valid) / len(valid) if valid else math.nan
    present = [v for v in iou if not math.isnan(v)]
    miou = sum(present) / len(present) if present else math.nan
    return np.array(iou), np.array(dice), miou, acc


@settings(max_examples=60, deadline=None)
@given(
    c=st.integers(1, 5),
    n=st.integers(1, 2),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    ignore_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_matches_brute_force(c, n, h, w, ignore_frac, seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, c, size=(n, h, w))
    target = rng.integers(0, c, size=(n, h, w))
    target[rng.random((n, h, w)) < ignore_frac] = 255
    cm = ConfusionMatrix(c)
    cm.update(torch.from_numpy(pred[:1]), torch.from_numpy(target[:1]))
    cm.update(torch.from_numpy(pred[1:]), torch.from_numpy(target[1:]))  # accumulates (n=1: empty)

    expected = np.zeros((c, c), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(cm.numpy(), expected)

    iou, dice, miou, acc = brute_force(pred, target, c)
    np.testing.assert_allclose(cm.iou(), iou, equal_nan=True)
    np.testing.assert_allclose(cm.dice(), dice, equal_nan=True)
    assert (math.isnan(miou) and math.isnan(cm.miou())) or cm.miou() == pytest.approx(miou)
    assert (math.isnan(acc) and math.isnan(cm.accuracy())) or cm.accuracy() == pytest.approx(acc)


def test_rows_are_ground_truth_columns_prediction():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([2, 2, 1]), torch.tensor([0, 0, 0]))
    assert cm.numpy().tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]


def test_known_values_and_absent_class_excluded_from_miou():
    # class 2 never appears in GT nor prediction -> NaN, not a 0 dragging the mean down
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    target = torch.tensor([[0, 0, 1, 0], [0, 255, 1, 1]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # GT0: pixels (0,0)p0 (0,1)p0 (0,3)p1 (1,0)p0 -> tp0=3 fn0=1; GT1: (0,2)p1 (1,2)p0 (1,3)p1 -> tp1=2 fn1=1
    # fp0 = 1 (GT1 predicted 0), fp1 = 1 (GT0 predicted 1)
    iou = cm.iou()
    assert iou[0] == pytest.approx(3 / 5)
    assert iou[1] == pytest.approx(2 / 4)
    assert math.isnan(iou[2])
    assert cm.dice()[0] == pytest.approx(6 / 8)
    assert cm.miou() == pytest.approx((3 / 5 + 2 / 4) / 2)
    assert cm.accuracy() == pytest.approx(5 / 7)


def test_class_predicted_but_absent_from_gt_counts_as_zero():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert cm.iou().tolist() == [0.5, 0.0]
    assert cm.miou() == pytest.approx(0.25)


def test_ignore_everywhere():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1], [1, 0]]), torch.full((2, 2), 255))
    assert cm.numpy().sum() == 0
    assert np.isnan(cm.iou()).all() and math.isnan(cm.miou()) and math.isnan(cm.accuracy())
    res = cm.results(["bg", "fg"])
    assert res["miou"] is None and res["iou"] == {"bg": None, "fg": None}
    json.dumps(res, allow_nan=False)  # strict JSON


def test_logits_are_reduced_with_argmax():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = 5.0  # pixel (0,0) -> class 2, rest -> class 0 (first max)
    cm = ConfusionMatrix(3)
    cm.update(logits, torch.tensor([[[2, 0], [0, 1]]]))
    assert cm.numpy().tolist() == [[2, 0, 0], [1, 0, 0], [0, 0, 1]]


def test_invalid_values_and_shapes_raise():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="target value 7"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="prediction value 3"):
        cm.update(torch.tensor([3, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    assert cm.numpy().sum() == 0  # nothing half-counted


def test_add_and_reset():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    b.update(torch.tensor([1]), torch.tensor([1]))
    total = a + b
    assert total.numpy().tolist() == [[1, 1], [0, 1]]
    assert a.numpy().sum() == 2  # operands untouched
    a += b
    assert a.numpy().tolist() == total.numpy().tolist()
    a.reset()
    assert a.numpy().sum() == 0


def test_all_reduce_is_noop_without_distributed():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert cm.all_reduce().numpy().tolist() == [[0, 0], [1, 1]]


def test_results_dict_and_json():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
    res = cm.results(["background", "vessel", "lesion"])
    assert set(res) == {"miou", "mdice", "accuracy", "iou", "dice", "confusion"}
    assert res["iou"]["lesion"] is None
    assert res["iou"]["vessel"] == pytest.approx(0.5)
    assert res["miou"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert res["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert json.loads(json.dumps(res, allow_nan=False)) == res
    with pytest.raises(ValueError, match="class names"):
        cm.results(["a", "b"])


def test_format_table():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
    names = ["background", "vessel", "lesion"]
    table = format_table(cm.results(names), names)
    lines = table.splitlines()
    assert lines[0].split("|")[1].strip() == "class"
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in lines[2:]}
    assert row["background"] == ["66.67", "80.00"]
    assert row["vessel"] == ["50.00", "66.67"]
    assert row["lesion"] == ["n/a", "n/a"]
    assert row["mIoU / mDice"] == ["58.33", "73.33"]
    assert row["pixel accuracy"][0] == "75.00"
    assert len({len(ln) for ln in lines}) == 1  # aligned columns
