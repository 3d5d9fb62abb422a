"""Inference modes (whole / sliding window), evaluation over records, rank sharding and DDP reduction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from semiseg.config import DataConfig, EvalConfig
from semiseg.data.base import Record
from semiseg.errors import DataError
from semiseg.evaluate import (
    evaluate,
    evaluate_to_results,
    predict_logits,
    sliding_windows,
    window_starts,
)

# ----------------------------------------------------------------------------- fakes and fixtures


class ThresholdModel(nn.Module):
    """Class 1 where channel 0 of the (normalised) input is > 0, else class 0. Records its calls."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = 2
        self.dummy = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), self.training))
        fg = (x[:, :1] > 0).float()
        return torch.cat([1 - fg, fg], 1) * 4.0 + self.dummy


class PointwiseModel(nn.Module):
    """A 1×1 convolution: translation-equivariant with a 1-pixel receptive field."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.conv(x)


def write_pair(root: Path, name: str, img: np.ndarray, mask: np.ndarray | None) -> Record:
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(root / f"{name}.png")
    mask_path = None
    if mask is not None:
        Image.fromarray(mask.astype(np.uint8)).save(root / f"{name}_mask.png")
        mask_path = str(root / f"{name}_mask.png")
    return Record(name=name, image=str(root / f"{name}.png"), mask=mask_path)


def make_dataset(root: Path, sizes, seed: int = 0):
    """Greyscale 0/255 images; masks = threshold truth with some flips and ignores. Returns records and
    the expected 2×2 confusion matrix of :class:`ThresholdModel`."""
    rng = np.random.default_rng(seed)
    records, expected = [], np.zeros((2, 2), dtype=np.int64)
    for i, (h, w) in enumerate(sizes):
        img = (rng.random((h, w)) > 0.6).astype(np.uint8) * 255
        pred = (img > 127).astype(np.uint8)
        mask = pred.copy()
        flip = rng.random((h, w)) < 0.2
        mask[flip] = 1 - mask[flip]
        mask[rng.random((h, w)) < 0.1] = 255
        for t, p in zip(mask.ravel(), pred.ravel()):
            if t != 255:
                expected[t, p] += 1
        records.append(write_pair(root, f"img{i}", img, mask))
    return records, expected


SIZES = [(13, 17), (20, 9), (33, 40), (8, 8), (25, 31)]

# ----------------------------------------------------------------------------- window geometry


def test_window_starts_stride_and_last_aligned():
    assert window_starts(100, 32, 16) == [0, 16, 32, 48, 64, 68]
    assert window_starts(64, 32, 16) == [0, 16, 32]
    assert window_starts(20, 32, 16) == [0]
    assert sliding_windows(40, 32, 32, 0.0) == [(0, 0), (8, 0)]


@settings(max_examples=80, deadline=None)
@given(
    h=st.integers(1, 90),
    w=st.integers(1, 90),
    window=st.integers(1, 40),
    overlap=st.floats(0.0, 0.95),
)
def test_sliding_windows_cover_everything_in_bounds(h, w, window, overlap):
    hp, wp = max(h, window), max(w, window)
    covered = np.zeros((hp, wp), dtype=bool)
    corners = sliding_windows(h, w, window, overlap)
    assert len(set(corners)) == len(corners)
    for y, x in corners:
        assert 0 <= y <= hp - window and 0 <= x <= wp - window
        covered[y : y + window, x : x + window] = True
    assert covered.all()
    stride = max(1, int(window * (1 - overlap)))
    ys = sorted({y for y, _ in corners})
    assert all(0 < b - a <= stride for a, b in zip(ys, ys[1:]))


# ----------------------------------------------------------------------------- predict_logits


def test_whole_pads_to_divisor_and_crops_back():
    model = ThresholdModel()
    seen = {}

    def spy(x):
        seen["x"] = x.clone()
        return model(x)

    x = torch.randn(2, 1, 37, 50)
    out = predict_logits(spy, x, EvalConfig(mode="whole", size_divisor=32), pad_value=[-1.0])
    assert seen["x"].shape == (2, 1, 64, 64)
    assert torch.equal(seen["x"][:, :, :37, :50], x)
    assert (seen["x"][:, :, 37:] == -1).all() and (seen["x"][:, :, :, 50:] == -1).all()
    assert out.shape == (2, 2, 37, 50)
    assert torch.equal(out.argmax(1), (x[:, 0] > 0).long())

    out = predict_logits(spy, x, EvalConfig(mode="whole", size_divisor=1))
    assert seen["x"].shape == (2, 1, 37, 50) and out.shape == (2, 2, 37, 50)


@pytest.mark.parametrize(
    ("size", "window", "overlap"),
    [((45, 70), 32, 0.5), ((20, 25), 32, 0.5), ((45, 70), 16, 0.0), ((33, 33), 32, 0.25), ((7, 64), 8, 0.9)],
)
def test_sliding_equals_whole_for_pointwise_model(size, window, overlap):
    model = PointwiseModel()
    torch.manual_seed(1)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        whole = predict_logits(model, x, EvalConfig(mode="whole", size_divisor=32))
        model.shapes.clear()
        cfg = EvalConfig(mode="sliding", window=window, overlap=overlap)
        slide = predict_logits(model, x, cfg, window_batch=3)
    assert slide.shape == whole.shape == (2, 4, *size)
    assert torch.isfinite(slide).all()
    torch.testing.assert_close(slide.softmax(1), whole.softmax(1), atol=1e-5, rtol=1e-5)
    assert all(s[-2:] == (window, window) for s in model.shapes)  # the model only ever sees windows
    expected_windows = len(sliding_windows(*size, window, overlap))
    assert sum(s[0] for s in model.shapes) == 2 * expected_windows


def test_sliding_averages_probabilities_over_overlaps():
    probs = [torch.tensor([0.8, 0.2]), torch.tensor([0.2, 0.8])]
    calls = []

    def model(x):
        p = probs[len(calls)]
        calls.append(x.shape)
        return p.log().view(1, 2, 1, 1).expand(x.shape[0], 2, *x.shape[-2:])

    x = torch.zeros(1, 1, 4, 6)
    out = predict_logits(model, x, EvalConfig(mode="sliding", window=4, overlap=0.5), window_batch=1)
    p1 = out.softmax(1)[0, 1, 0]  # class-1 probability along a row
    torch.testing.assert_close(p1, torch.tensor([0.2, 0.2, 0.5, 0.5, 0.8, 0.8]))
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 4, 6))  # log-probabilities


def test_unknown_mode_raises():
    cfg = EvalConfig()
    cfg.mode = "tiles"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="tiles"):
        predict_logits(ThresholdModel(), torch.zeros(1, 1, 4, 4), cfg)


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_evaluate_known_answer(tmp_path, mode):
    records, expected = make_dataset(tmp_path, SIZES)
    model = ThresholdModel()
    model.train()
    cfg = EvalConfig(mode=mode, window=16, overlap=0.5, size_divisor=32)
    cm = evaluate(model, records, DataConfig(), cfg, 2, 1, "cpu", amp=True)  # amp ignored on CPU
    np.testing.assert_array_equal(cm.numpy(), expected)
    assert model.training  # state restored
    assert model.calls and not any(training for _, training in model.calls)  # ran in eval mode


def test_evaluate_keeps_eval_state(tmp_path):
    records, _ = make_dataset(tmp_path, SIZES[:2])
    model = ThresholdModel().eval()
    evaluate(model, records, DataConfig(), EvalConfig(), 2, 1, "cpu")
    assert not model.training


def test_rank_shards_partition_the_records(tmp_path):
    records, expected = make_dataset(tmp_path, SIZES)
    cfg, data = EvalConfig(mode="whole"), DataConfig()
    full = evaluate(ThresholdModel(), records, data, cfg, 2, 1, "cpu")
    m0, m1 = ThresholdModel(), ThresholdModel()
    r0 = evaluate(m0, records, data, cfg, 2, 1, "cpu", rank=0, world_size=2)
    r1 = evaluate(m1, records, data, cfg, 2, 1, "cpu", rank=1, world_size=2)
    assert (len(m0.calls), len(m1.calls)) == (3, 2)  # 5 records: no padding duplicates
    np.testing.assert_array_equal((r0 + r1).numpy(), full.numpy())
    np.testing.assert_array_equal(full.numpy(), expected)
    assert r0.numpy().sum() > 0 and r1.numpy().sum() > 0


def test_evaluate_with_resize(tmp_path):
    # Blocks of 4×4 pixels survive a ×0.5 resize exactly (bilinear image, nearest mask).
    img = np.kron(np.array([[0, 255], [255, 0]], dtype=np.uint8), np.ones((4, 4), dtype=np.uint8))
    mask = (img > 127).astype(np.uint8)
    rec = write_pair(tmp_path, "blocks", img, mask)
    cm = evaluate(ThresholdModel(), [rec], DataConfig(resize=0.5), EvalConfig(), 2, 1, "cpu")
    assert cm.numpy().tolist() == [[8, 0], [0, 8]]  # 4×4 pixels after resizing, all correct


def test_missing_mask_raises_before_inference(tmp_path):
    records, _ = make_dataset(tmp_path, SIZES[:3])
    records[2] = records[2].unlabeled()
    model = ThresholdModel()
    with pytest.raises(DataError, match=r"img2\.png.*mask"):
        evaluate(model, records, DataConfig(), EvalConfig(), 2, 1, "cpu", rank=0, world_size=2)
    assert model.calls == []


def test_wrong_channel_count_names_the_file(tmp_path):
    records, _ = make_dataset(tmp_path, SIZES[:1])
    with pytest.raises(DataError, match=r"img0\.png.*3"):
        evaluate(ThresholdModel(3), records, DataConfig(), EvalConfig(), 2, 3, "cpu")


def test_evaluate_to_results(tmp_path):
    records, expected = make_dataset(tmp_path, SIZES)
    res = evaluate_to_results(ThresholdModel(), records, DataConfig(), EvalConfig(), ["bg", "fg"], 1, "cpu")
    assert res["confusion"] == expected.tolist()
    tp = np.diag(expected)
    iou = tp / (expected.sum(0) + expected.sum(1) - tp)
    assert res["iou"]["fg"] == pytest.approx(iou[1])
    assert res["miou"] == pytest.approx(iou.mean())


def test_ddp_wrapped_model_is_unwrapped(tmp_path):
    records, expected = make_dataset(tmp_path, SIZES[:2])
    inner = ThresholdModel()
    wrapped = nn.DataParallel(inner)  # stands in for DDP (same .module contract), CPU-only
    cm = evaluate(wrapped, records, DataConfig(), EvalConfig(), 2, 1, "cpu")
    assert len(inner.calls) == 2 and cm.numpy().sum() > 0


# ----------------------------------------------------------------------------- real 2-process reduction


def _ddp_worker(rank: int, world: int, init_file: str, records: list[Record], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = ThresholdModel()
        cm = evaluate(model, records, DataConfig(), EvalConfig(), 2, 1, "cpu", rank=rank, world_size=world)
        np.save(Path(out) / f"rank{rank}.npy", np.array([*cm.numpy().ravel(), len(model.calls)]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_all_reduce_across_two_gloo_processes(tmp_path):
    records, expected = make_dataset(tmp_path / "data", SIZES)
    init_file = tmp_path / "init"
    mp.spawn(_ddp_worker, args=(2, str(init_file), records, str(tmp_path)), nprocs=2)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npy") for r in (0, 1))
    assert r0[-1] + r1[-1] == len(records)  # each record evaluated exactly once
    np.testing.assert_array_equal(r0[:-1].reshape(2, 2), expected)  # both ranks hold the full matrix
    np.testing.assert_array_equal(r1[:-1].reshape(2, 2), expected)
    assert not math.isnan(float(r0[0]))
