"""HD95 / ASD / ASSD (surface_metrics.py) against an independent brute force (explicit erosion loops and
all-pairs distances), analytic cases, empty-mask conventions, evaluation (rank shards, two gloo
processes) and the report tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import semiseg.surface_metrics as surface_metrics
from semiseg.config import DataConfig, EvalConfig
from semiseg.evaluate import evaluate, evaluate_to_results
from semiseg.experiment import rows_csv, summarize, table1_markdown
from semiseg.metrics import (
    ConfusionMatrix,
    SurfaceDistances,
    binary_surface_metrics,
    directed_distances,
    format_table,
    mask_surface,
)

# ----------------------------------------------------------------------------- brute force


def bf_surface(mask: np.ndarray) -> np.ndarray:
    """Mask minus its erosion by the 4-connected cross, outside = background, by explicit loops."""
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            neighbours = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
            inside = all(0 <= j < h and 0 <= i < w and mask[j, i] for j, i in neighbours)
            out[y, x] = not inside
    return out


def bf_directed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All-pairs Euclidean distances between the pixel coordinates of a and b; min over b."""
    pa, pb = np.argwhere(a).astype(float), np.argwhere(b).astype(float)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(1)


def bf_metrics(pred: np.ndarray, ref: np.ndarray):
    """medpy's hd95 / asd / assd, rebuilt from the definitions (plus our empty-mask convention)."""
    if not pred.any() and not ref.any():
        return None
    if pred.any() != ref.any():
        d = math.sqrt(pred.shape[0] ** 2 + pred.shape[1] ** 2)
        return d, d, d
    sp, sr = bf_surface(pred), bf_surface(ref)
    d_pr, d_rp = bf_directed(sp, sr), bf_directed(sr, sp)
    return float(np.percentile(np.hstack([d_pr, d_rp]), 95)), d_pr.mean(), (d_pr.mean() + d_rp.mean()) / 2


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def random_mask(rng: np.random.Generator, h: int, w: int, density: float) -> np.ndarray:
    return rng.random((h, w)) < density


# ----------------------------------------------------------------------------- against brute force


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    dp=st.floats(0.0, 1.0),
    dr=st.floats(0.0, 1.0),
    window=st.sampled_from([0, 1, 2, 8]),
    seed=st.integers(0, 2**16),
)
def test_matches_brute_force(h, w, dp, dr, window, seed):
    rng = np.random.default_rng(seed)
    pred, ref = random_mask(rng, h, w, dp), random_mask(rng, h, w, dr)
    np.testing.assert_array_equal(mask_surface(t(pred)).numpy(), bf_surface(pred))
    expected = bf_metrics(pred, ref)
    saved, surface_metrics._WINDOW = surface_metrics._WINDOW, window  # the windowed search and its fallback
    try:
        got = binary_surface_metrics(t(pred), t(ref))
        if ref.any() and pred.any():
            sp, sr = bf_surface(pred), bf_surface(ref)
            np.testing.assert_allclose(
                np.sort(directed_distances(t(sp), t(sr)).numpy()), np.sort(bf_directed(sp, sr)), atol=1e-12
            )
    finally:
        surface_metrics._WINDOW = saved
    if expected is None:
        assert got is None
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_directed_distances_in_small_blocks_wide_and_tall(monkeypatch, window):
    """The block-wise search (forced to a few pixels per block), the ±window first pass with its
    whole-row fallback (sparse targets: many pixels farther than the window) and both orientations
    agree with the brute force."""
    monkeypatch.setattr(surface_metrics, "_CHUNK", 7)
    monkeypatch.setattr(surface_metrics, "_WINDOW", window)
    rng = np.random.default_rng(3)
    for shape in ((9, 40), (40, 9), (25, 25)):
        a, b = random_mask(rng, *shape, 0.3), np.zeros(shape, bool)
        b[rng.integers(shape[0], size=2), rng.integers(shape[1], size=2)] = True  # two target pixels
        got = np.sort(directed_distances(t(a), t(b)).numpy())
        np.testing.assert_allclose(got, np.sort(bf_directed(a, b)), atol=1e-12)
        assert got.max() > window  # the fallback ran


# ----------------------------------------------------------------------------- analytic cases


def squares(n: int, shift: int, size: int = 40, vertical: bool = False):
    """Two n×n squares, the second shifted by ``shift`` pixels (along x, or y when vertical)."""
    a = np.zeros((size, size), bool)
    b = np.zeros((size, size), bool)
    a[5 : 5 + n, 5 : 5 + n] = True
    b[5 : 5 + n, 5 + shift : 5 + shift + n] = True
    return (a.T, b.T) if vertical else (a, b)


@pytest.mark.parametrize(("n", "k"), [(4, 3), (5, 4), (5, 9), (3, 12)])
@pytest.mark.parametrize("vertical", [False, True])
def test_two_squares_shifted_by_k(n, k, vertical):
    """For k ≥ n − 1 every square's surface pixel at column offset x (0 … n−1) is exactly k − x from
    the other square's surface (its facing side): top and bottom rows give k − x for every x, the
    n − 2 remaining pixels of the left side k, of the right side k − n + 1. Symmetric, so ASD = ASSD."""
    a, b = squares(n, k, vertical=vertical)
    d = [k - x for x in range(n)] * 2 + [k] * (n - 2) + [k - n + 1] * (n - 2)
    hd95, asd, assd = binary_surface_metrics(t(a), t(b))
    assert asd == pytest.approx(np.mean(d)) and assd == pytest.approx(np.mean(d))
    assert hd95 == pytest.approx(np.percentile(d + d, 95))
    if (n, k) == (4, 3):  # by hand: 0 ×4, then 3, 2, 1 twice, 3 twice -> 18 / 12
        assert (hd95, asd) == (pytest.approx(3.0), pytest.approx(1.5))


def test_identical_masks_and_single_pixels():
    a, _ = squares(6, 0)
    assert binary_surface_metrics(t(a), t(a)) == (0.0, 0.0, 0.0)
    p = np.zeros((10, 10), bool)
    r = np.zeros((10, 10), bool)
    p[1, 1], r[4, 5] = True, True  # a (3, 4, 5) triangle
    assert binary_surface_metrics(t(p), t(r)) == pytest.approx((5.0, 5.0, 5.0))


def test_hd95_and_assd_are_symmetric_asd_is_directed():
    """A small blob inside a large square: from the blob, the square's side is 3 away; from the
    square's side, the blob is farther on average. Swapping prediction and reference keeps HD95 and
    ASSD and changes ASD (medpy's asd is prediction → reference)."""
    ref = np.zeros((20, 20), bool)
    ref[2:17, 2:17] = True  # 15×15
    pred = np.zeros((20, 20), bool)
    pred[5:14, 5:14] = True  # 9×9, 3 pixels inside every side
    fwd, back = binary_surface_metrics(t(pred), t(ref)), binary_surface_metrics(t(ref), t(pred))
    assert fwd[1] == pytest.approx(3.0)  # every blob surface pixel is 3 from the square's side
    assert back[1] > fwd[1]  # the square's corners are farther from the blob
    assert fwd[0] == pytest.approx(back[0]) and fwd[2] == pytest.approx(back[2])
    assert fwd[2] == pytest.approx((fwd[1] + back[1]) / 2)
    np.testing.assert_allclose(fwd, bf_metrics(pred, ref))


def test_mask_touching_the_image_border_has_a_surface_there():
    full = np.ones((5, 6), bool)
    surface = mask_surface(t(full)).numpy()
    assert surface[0].all() and surface[-1].all() and surface[:, 0].all() and surface[:, -1].all()
    assert not surface[1:-1, 1:-1].any()


# ----------------------------------------------------------------------------- empty masks


def test_empty_masks():
    empty = np.zeros((6, 8), bool)
    some = empty.copy()
    some[2, 3] = True
    assert binary_surface_metrics(t(empty), t(empty)) is None  # not counted
    diagonal = 10.0  # √(6² + 8²)
    assert binary_surface_metrics(t(empty), t(some)) == (diagonal, diagonal, diagonal)  # missed
    assert binary_surface_metrics(t(some), t(empty)) == (diagonal, diagonal, diagonal)  # hallucinated
    with pytest.raises(ValueError, match="empty"):
        directed_distances(t(some), t(empty))


def test_accumulator_skips_both_empty_penalises_one_empty_and_averages_over_images():
    sd = SurfaceDistances(4)  # background, a, b, never
    target = torch.zeros(6, 8, dtype=torch.int64)
    target[1:4, 1:4] = 1
    pred = target.clone()
    pred[1:4, 1:4] = 0
    pred[1:4, 2:5] = 1  # class 1 shifted by one pixel
    pred[5, 7] = 2  # class 2 predicted, absent from the reference: penalty
    sd.update(pred, target)
    sd.update(target, target)  # a perfect image: class 1 scores 0, class 2 both empty (skipped)
    res = sd.results(["background", "a", "b", "never"])
    shifted = bf_metrics(pred.numpy() == 1, target.numpy() == 1)
    assert res["hd95"]["a"] == pytest.approx(shifted[0] / 2)  # (shifted + 0) / 2 images
    assert res["asd"]["a"] == pytest.approx(shifted[1] / 2)
    assert res["hd95"]["b"] == pytest.approx(10.0) and res["asd"]["b"] == pytest.approx(10.0)
    assert res["hd95"]["background"] is None and res["hd95"]["never"] is None
    assert res["mhd95"] == pytest.approx((shifted[0] / 2 + 10.0) / 2)  # over classes with a value
    assert res["surface_counts"] == {
        "a": {"images": 2, "one_empty": 0},
        "b": {"images": 1, "one_empty": 1},
        "never": {"images": 0, "one_empty": 0},
    }
    json.dumps(res, allow_nan=False)


def test_ignored_pixels_leave_both_masks():
    target = torch.zeros(8, 8, dtype=torch.int64)
    target[2:6, 2:6] = 1
    pred = target.clone()
    pred[6:8, 6:8] = 1  # a false positive ...
    target[6:8, 6:8] = 255  # ... on ignored pixels: not counted
    sd = SurfaceDistances(2)
    sd.update(pred, target)
    assert sd.results()["hd95"]["class_1"] == 0.0
    ignored = torch.full((8, 8), 255)
    sd = SurfaceDistances(2)
    sd.update(pred, ignored)  # nothing left of either mask: both empty, skipped
    assert sd.results()["surface_counts"]["class_1"]["images"] == 0


def test_add_and_confusion_matrix_results():
    target = torch.zeros(6, 6, dtype=torch.int64)
    target[1:4, 1:4] = 1
    a, b = SurfaceDistances(2), SurfaceDistances(2)
    a.update(target, target)
    b.update(torch.zeros_like(target), target)
    both = SurfaceDistances(2)
    both.update(target, target)
    both.update(torch.zeros_like(target), target)
    torch.testing.assert_close((a + b).state, both.state)
    cm = ConfusionMatrix(2)
    cm.update(target, target)
    assert "hd95" not in cm.results()  # no surface distances attached: the old keys only
    cm.surface = a
    res = cm.results(["bg", "fg"])
    assert res["hd95"] == {"bg": None, "fg": 0.0} and res["masd"] == 0.0
    cm2 = ConfusionMatrix(2)
    cm2.surface = b
    assert (cm + cm2).surface.state.equal(both.state)
    cm3 = ConfusionMatrix(2)  # without surface distances: a sum of the two has none
    assert (cm + cm3).surface is None


def test_format_table_with_surface_columns():
    target = torch.zeros(6, 6, dtype=torch.int64)
    target[1:4, 1:4] = 1
    pred = target.roll(1, 1)
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    cm.surface = SurfaceDistances(3)
    cm.surface.update(pred, target)
    names = ["background", "vessel", "lesion"]
    lines = format_table(cm.results(names), names).splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["class", "IoU", "Dice", "HD95 px", "ASD px"]
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    expected = bf_metrics(pred.numpy() == 1, target.numpy() == 1)
    assert row["vessel"][2:] == [f"{expected[0]:.2f}", f"{expected[1]:.2f}"]
    assert row["background"][2:] == ["–", "–"]  # not scored
    assert row["lesion"][2:] == ["n/a", "n/a"]  # scored on no image (absent from both)
    assert row["mIoU / mDice"][2:] == [f"{expected[0]:.2f}", f"{expected[1]:.2f}"]
    assert len({len(ln) for ln in lines}) == 1


# ----------------------------------------------------------------------------- evaluation


def _dataset(root: Path):
    """Tiny 0/255 images; the threshold model predicts their foreground; masks are shifted squares."""
    from PIL import Image

    from semiseg.data.base import Record

    root.mkdir(parents=True, exist_ok=True)
    records, pairs = [], []
    for i, (h, w, shift) in enumerate([(16, 20, 1), (12, 12, 3), (20, 14, 0), (10, 16, 2), (9, 9, 1)]):
        img = np.zeros((h, w), np.uint8)
        img[2:7, 2 + shift : 7 + shift] = 255
        mask = np.zeros((h, w), np.uint8)
        mask[2:7, 2:7] = 1
        if i == 2:
            mask[:] = 0  # reference empty, prediction not: the penalty
        Image.fromarray(img).save(root / f"i{i}.png")
        Image.fromarray(mask).save(root / f"i{i}_mask.png")
        records.append(Record(name=f"i{i}", image=str(root / f"i{i}.png"), mask=str(root / f"i{i}_mask.png")))
        pairs.append((img > 127, mask == 1))
    per_image = [bf_metrics(p, r) for p, r in pairs]
    expected = np.mean(per_image, axis=0)
    return records, expected


def _threshold_model():
    from test_evaluate import ThresholdModel

    return ThresholdModel()


def test_evaluate_attaches_surface_distances_and_rank_shards_add_up(tmp_path):
    records, expected = _dataset(tmp_path)
    data = DataConfig()
    res = evaluate_to_results(_threshold_model(), records, data, EvalConfig(), ["bg", "fg"], 1, "cpu")
    assert (res["hd95"]["fg"], res["asd"]["fg"], res["assd"]["fg"]) == pytest.approx(tuple(expected))
    assert res["surface_counts"] == {"fg": {"images": 5, "one_empty": 1}}
    off = EvalConfig(surface_metrics=False)
    assert "hd95" not in evaluate_to_results(_threshold_model(), records, data, off, ["bg", "fg"], 1, "cpu")
    assert "hd95" not in evaluate_to_results(
        _threshold_model(), records, data, EvalConfig(), ["bg", "fg"], 1, "cpu", surface_metrics=False
    )
    full = evaluate(_threshold_model(), records, data, EvalConfig(), 2, 1, "cpu")
    r0 = evaluate(_threshold_model(), records, data, EvalConfig(), 2, 1, "cpu", rank=0, world_size=2)
    r1 = evaluate(_threshold_model(), records, data, EvalConfig(), 2, 1, "cpu", rank=1, world_size=2)
    assert r0.surface.state[1, 3] == 3 and r1.surface.state[1, 3] == 2  # no duplicated image
    torch.testing.assert_close((r0 + r1).surface.state, full.surface.state)


def _ddp_worker(rank: int, world: int, init_file: str, records, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cm = evaluate(
            _threshold_model(), records, DataConfig(), EvalConfig(), 2, 1, "cpu", rank=rank, world_size=world
        )
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(cm.results(["bg", "fg"])))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_surface_distances_reduce_across_two_gloo_processes(tmp_path):
    records, expected = _dataset(tmp_path / "data")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), records, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (res["hd95"]["fg"], res["asd"]["fg"], res["assd"]["fg"]) == pytest.approx(tuple(expected))
        assert res["surface_counts"]["fg"] == {"images": 5, "one_empty": 1}  # each image once


# ----------------------------------------------------------------------------- report tables


def _record(method: str, seed: int, hd95: float | None = None) -> dict:
    rec = {"dataset": "d", "fraction": 0.125, "method": method, "seed": seed, "miou": 0.5,
           "iou": {"background": 0.9, "a": 0.1, "b": 0.2}, "seconds": 1.0}  # fmt: skip
    if hd95 is not None:  # a run evaluated with surface distances
        rec.update(
            hd95={"background": None, "a": hd95, "b": 2 * hd95},
            asd={"background": None, "a": hd95 / 4, "b": None},
            mhd95=1.5 * hd95,
            masd=hd95 / 4,
            surface_counts={"a": {"images": 3, "one_empty": 0}, "b": {"images": 3, "one_empty": 1}},
        )
    return rec


def test_tables_with_old_and_new_records():
    old_only = summarize([_record("old", 0), _record("old", 1)])
    text = table1_markdown(old_only, "c")
    assert "HD95" not in text  # runs without surface distances: the IoU table only, as before
    assert "hd95" not in rows_csv(old_only)

    rows = summarize(
        [_record("old", 0), _record("new", 0, 4.0), _record("new", 1, 8.0), _record("mix", 0, 2.0)]
    )
    text = table1_markdown(rows, "c")
    lines = text.splitlines()
    header = next(ln for ln in lines if "HD95" in ln and ln.startswith("| method"))
    assert header == "| method | seeds | a HD95 | a ASD | b HD95 | b ASD | mean HD95 | mean ASD |"
    assert "| old | – | – | – | – | – | – | – |" in lines
    assert (
        "| new | 0, 1 | 6.00 ± 2.83 | 1.50 ± 0.71 | 12.00 ± 5.66 | – | 9.00 ± 4.24 | 1.50 ± 0.71 |" in lines
    )
    mixed = summarize([_record("mix", 0, 2.0), _record("mix", 1)])
    assert mixed[0]["surface_seeds"] == [0] and mixed[0]["hd95"]["a"][2] == 1  # only the seed with it
    assert "| mix | 0 | 2.00 | 0.50 | 4.00 | – | 3.00 | 0.50 |" in table1_markdown(mixed, "c")
    csv = rows_csv(rows).splitlines()
    assert "d,0.125,new,2,hd95/a,6.000000,2.828427" in csv
    assert not any(ln.startswith("d,0.125,old,") and "hd95" in ln for ln in csv)
    assert not any("asd/b" in ln for ln in csv)  # no value on any seed
