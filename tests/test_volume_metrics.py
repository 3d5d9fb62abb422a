"""Per-volume 3-D Dice / HD95 / ASD against brute force, the SSL4MIS empty-mask cases, and the
volume evaluation path (slices predicted at the input size, resized back, scored per volume)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from semiseg.config import DataConfig, EvalConfig
from semiseg.data.base import Record
from semiseg.data.io import resize_pair
from semiseg.errors import DataError
from semiseg.evaluate import evaluate, primary_metric, resolve_unit, volume_groups
from semiseg.metrics import format_table
from semiseg.volume_metrics import VolumeMetrics, binary_volume_metrics, confusion_counts


def brute_surface(mask: np.ndarray) -> list[tuple[int, ...]]:
    """Voxels of the mask with a face neighbour outside it (or on the volume's edge)."""
    out = []
    for idx in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if not 0 <= nb[axis] < mask.shape[axis] or not mask[tuple(nb)]:
                out.append(tuple(int(i) for i in idx))
                break
    return out


def brute_metrics(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(Dice, HD95, ASD) by the definitions: all-pairs distances between surface voxels."""
    sp, sr = np.array(brute_surface(pred), float), np.array(brute_surface(ref), float)
    dist = np.sqrt(((sp[:, None, :] - sr[None, :, :]) ** 2).sum(-1))
    d_pr, d_rp = dist.min(1), dist.min(0)
    dice = 2 * np.logical_and(pred, ref).sum() / (pred.sum() + ref.sum())
    return float(dice), float(np.percentile(np.concatenate([d_pr, d_rp]), 95)), float(d_pr.mean())


@pytest.mark.parametrize("seed", range(6))
def test_binary_volume_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (3 + seed % 3, 7, 9)
    pred = rng.random(shape) < 0.3
    ref = rng.random(shape) < 0.25
    pred[0, 0, 0] = ref[1, 2, 3] = True  # both non-empty
    got = binary_volume_metrics(pred, ref)
    dice, hd95, asd = brute_metrics(pred, ref)
    assert got["dice"] == pytest.approx(dice)
    assert got["hd95"] == pytest.approx(hd95)
    assert got["asd"] == pytest.approx(asd)


def test_distances_are_3d_with_unit_slice_spacing():
    ref = np.zeros((6, 5, 5), bool)
    ref[0, 2, 2] = True
    pred = np.zeros_like(ref)
    pred[4, 2, 2] = True  # 4 slices apart: 4 voxels with spacing 1 on the slice axis
    assert binary_volume_metrics(pred, ref)["hd95"] == pytest.approx(4.0)
    assert binary_volume_metrics(pred, ref)["dice"] == 0.0


def test_empty_masks_follow_ssl4mis():
    ref = np.zeros((2, 4, 4), bool)
    ref[0, 1, 1] = True
    empty = np.zeros_like(ref)
    # empty prediction: Dice 0 and HD95 0 (SSL4MIS val_2D), whatever the reference
    assert binary_volume_metrics(empty, ref) == {"dice": 0.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0}
    # a prediction against an empty reference: Dice 0, no distance
    got = binary_volume_metrics(ref, empty)
    assert got["dice"] == 0.0 and got["hd95"] is None
    assert binary_volume_metrics(ref, ref, distances=False) == {"dice": 1.0}


def test_volume_metrics_average_over_volumes_and_count_empties():
    vm = VolumeMetrics(3)
    label = np.zeros((2, 4, 4), np.uint8)
    label[:, :2] = 1
    label[:, 2:] = 2
    perfect = label.copy()
    missed = label.copy()
    missed[missed == 2] = 0  # class 2 never predicted in the second volume
    vm.update("b", missed, label)
    vm.update("a", perfect, label)
    res = vm.all_gather().results(["bg", "one", "two"])
    assert [case["name"] for case in res["per_image"]] == ["a", "b"]
    assert res["dice"] == {"bg": None, "one": 1.0, "two": pytest.approx(0.5)}  # (1 + 0) / 2
    assert res["mdice"] == pytest.approx(0.75)
    assert res["hd95"]["two"] == 0.0  # both volumes 0: a perfect one and SSL4MIS's empty-prediction 0
    assert res["volume_counts"]["two"] == {"volumes": 2, "empty_prediction": 1, "empty_reference": 0}
    assert res["evaluation"] == "volume"
    table = format_table({"iou": dict.fromkeys(["bg", "one", "two"], 1.0), "miou": 1.0, **res})
    assert "fg mean Dice" in table and "HD95 vox" in table
    assert "empty prediction" in table and "two 1" in table


def test_confusion_counts_match_definition():
    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 3, (5, 6)), rng.integers(0, 3, (5, 6))
    target[0, 0] = 255
    counts = confusion_counts(pred, target, 3)
    valid = target != 255
    for c in range(3):
        assert counts["tp"][c] == np.sum((pred == c) & (target == c) & valid)
        assert counts["fp"][c] == np.sum((pred == c) & (target != c) & valid)
        assert counts["fn"][c] == np.sum((pred != c) & (target == c) & valid)


# ------------------------------------------------------------------------------------------------
# The evaluation path
# ------------------------------------------------------------------------------------------------


class IntensityModel(nn.Module):
    """Class = round(3 × intensity) for a 1-channel image normalised with mean 0.5, std 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.input_sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.input_sizes.append(tuple(x.shape[-2:]))
        value = (x * 0.5 + 0.5).clamp(0, 1) * 3
        cls = value.round().long().clamp(0, 3)[:, 0]
        return nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float() * 10 + self.dummy


def write_volume(path: Path, label: np.ndarray) -> list[Record]:
    with h5py.File(path, "w") as f:
        f["image"] = (label / 3.0).astype(np.float32)
        f["label"] = label
    return [Record(f"{path.stem}_slice_{k}", str(path), str(path), "h5", k) for k in range(label.shape[0])]


def test_volume_evaluation_predicts_at_input_size_and_scores_full_size(tmp_path):
    import semiseg.data.acdc  # noqa: F401  (registers the h5 reader)

    rng = np.random.default_rng(1)
    label = np.zeros((3, 20, 14), np.uint8)
    label[:, 4:16, 3:11] = 1
    label[:, 7:13, 5:9] = 2
    label[1:, 9:11, 6:8] = 3
    label[0, 0:2, 0:3] = rng.integers(0, 4, (2, 3))
    records = write_volume(tmp_path / "p1_frame01.h5", label)
    # slices in the wrong order: the evaluator sorts them by index
    records = records[::-1] + write_volume(tmp_path / "p2_frame01.h5", label[::-1].copy())
    model = IntensityModel()
    data = DataConfig(mean=[0.5], std=[0.5])
    cm = evaluate(model, records, data, EvalConfig(size_divisor=1), 4, 1, "cpu", unit="volume")
    res = cm.results(["bg", "RV", "MYO", "LV"])
    assert res["mdice"] == pytest.approx(1.0) and res["mhd95"] == pytest.approx(0.0)
    assert res["miou"] == pytest.approx(1.0)
    assert [c["name"] for c in res["per_image"]] == ["p1_frame01", "p2_frame01"]
    assert int(cm.mat.sum()) == 2 * label.size  # pooled over the full-size volumes

    # at another input size: predicted there, zoomed back (nearest) and scored at full size
    model = IntensityModel()
    small_cfg = DataConfig(size=[9, 6], mean=[0.5], std=[0.5])
    cm = evaluate(model, records[:3], small_cfg, EvalConfig(size_divisor=1), 4, 1, "cpu", unit="volume")
    assert set(model.input_sizes) == {(9, 6)}
    case = cm.results(["bg", "RV", "MYO", "LV"])["per_image"][0]
    expected = []
    for k in range(label.shape[0]):
        small, _ = resize_pair((label[k] / 3.0).astype(np.float32)[..., None], None, (9, 6))
        pred_small = np.clip(np.round(small[..., 0] * 3), 0, 3).astype(np.uint8)
        expected.append(ndimage.zoom(pred_small, (20 / 9, 14 / 6), order=0))
    expected = np.stack(expected)
    assert expected.shape == label.shape
    for c in (1, 2, 3):
        p, r = expected == c, label == c
        assert case["dice"][c] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
    assert min(case["dice"][1:]) < 1.0  # the round trip through 9×6 loses detail


def test_volume_evaluation_ddp_partition_and_errors(tmp_path):
    import semiseg.data.acdc  # noqa: F401

    label = np.zeros((2, 8, 8), np.uint8)
    label[:, 2:6, 2:6] = 1
    records = write_volume(tmp_path / "a.h5", label) + write_volume(tmp_path / "b.h5", label)
    data = DataConfig(mean=[0.5], std=[0.5])
    assert [name for name, _ in volume_groups(records)] == ["a", "b"]
    r0 = evaluate(
        IntensityModel(), records, data, EvalConfig(), 4, 1, "cpu", rank=0, world_size=2, unit="volume"
    )
    r1 = evaluate(
        IntensityModel(), records, data, EvalConfig(), 4, 1, "cpu", rank=1, world_size=2, unit="volume"
    )
    assert [c["name"] for c in r0.volumes.cases] == ["a"] and [c["name"] for c in r1.volumes.cases] == ["b"]
    with pytest.raises(DataError, match="eval.unit=volume"):
        evaluate(
            IntensityModel(), [Record("x", "x.png", "x.png")], data, EvalConfig(), 4, 1, "cpu", unit="volume"
        )


def test_units_and_primary_metric():
    assert resolve_unit(EvalConfig(), "volume") == "volume"
    assert resolve_unit(EvalConfig(unit="image"), "volume") == "image"
    assert resolve_unit(EvalConfig(), "image") == "image"
    assert primary_metric({"miou": 0.5, "mdice": 0.7}) == ("miou", 0.5)
    assert primary_metric({"miou": 0.5, "mdice": 0.7, "evaluation": "volume"}) == ("mdice", 0.7)
    assert math.isnan(primary_metric({"miou": None})[1])


def test_image_evaluation_keeps_per_image_counts(tmp_path):
    import semiseg.data.acdc  # noqa: F401

    label = np.zeros((2, 8, 8), np.uint8)
    label[:, 2:6, 2:6] = 1
    records = write_volume(tmp_path / "a.h5", label)
    cm = evaluate(IntensityModel(), records, DataConfig(mean=[0.5], std=[0.5]), EvalConfig(), 4, 1, "cpu")
    res = cm.results()
    assert [e["name"] for e in res["per_image"]] == ["a_slice_0", "a_slice_1"]
    summed = np.sum([e["tp"] for e in res["per_image"]], axis=0)
    assert summed.tolist() == np.diag(cm.numpy()).tolist()
    assert "evaluation" not in res
