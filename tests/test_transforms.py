"""Weak / strong views and CutMix boxes (UniMatch's): geometry, padding, determinism, probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semiseg.config import StrongAugConfig
from semiseg.data.transforms import (
    _aa_bilinear_rows,
    blur_kernel_size,
    cutmix_box,
    resize_window,
    strong_view,
    weak_view,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coded_image(h: int, w: int, num_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mask with random class per pixel and an image whose channel 0 encodes the class exactly."""
    rng = np.random.default_rng(seed)
    mask = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
    image = np.stack([mask / 10.0, rng.random((h, w)), np.full((h, w), 0.5)], axis=-1).astype(np.float32)
    return image, mask


# ------------------------------------------------------------------ weak view


def test_weak_view_shapes_and_dtypes():
    image, mask = coded_image(40, 50)
    img, label, ignore = weak_view(image, mask, 32, [0.5, 2.0], True, gen(0))
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert label.shape == (32, 32) and label.dtype == torch.long
    assert ignore.shape == (32, 32) and ignore.dtype == torch.uint8
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_weak_view_is_a_function_of_the_seed():
    image, mask = coded_image(40, 50)
    a = weak_view(image, mask, 24, [0.5, 2.0], True, gen(7))
    b = weak_view(image, mask, 24, [0.5, 2.0], True, gen(7))
    c = weak_view(image, mask, 24, [0.5, 2.0], True, gen(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_weak_view_keeps_image_and_label_aligned_through_crop_and_flip():
    image, mask = coded_image(30, 45)
    flips = 0
    for seed in range(40):
        img, label, ignore = weak_view(image, mask, 20, [1.0, 1.0], True, gen(seed))
        assert (ignore == 0).all()
        # channel 0 encodes the class: equality proves crop + flip moved both identically
        assert torch.equal(torch.round(img[0] * 10).long(), label)
        flipped = not any(
            torch.equal(img[1], torch.from_numpy(image[y : y + 20, x : x + 20, 1]))
            for y in range(11)
            for x in range(26)
        )
        flips += flipped
    assert 10 <= flips <= 30  # hflip p = 0.5


def test_weak_view_no_flip_when_disabled():
    image, mask = coded_image(20, 20)
    for seed in range(10):
        img, _, _ = weak_view(image, mask, 20, [1.0, 1.0], False, gen(seed))
        assert torch.equal(img[1], torch.from_numpy(image[..., 1]))


def test_weak_view_pads_image_zero_label_and_ignore_255():
    image, mask = coded_image(10, 12)
    image = image + 0.05  # no zero pixels in the image itself
    img, label, ignore = weak_view(image, mask, 32, [1.0, 1.0], False, gen(3))
    assert torch.equal(ignore[:10, :12], torch.zeros(10, 12, dtype=torch.uint8))
    assert (ignore[10:] == 255).all() and (ignore[:, 12:] == 255).all()
    assert (label[ignore == 255] == 255).all()
    assert torch.equal(label[:10, :12], torch.from_numpy(mask).long())
    assert (img[:, ignore == 255] == 0).all()
    assert (img[:, :10, :12] > 0).all()


def test_weak_view_unlabeled_has_zero_label_and_marks_padding():
    image, _ = coded_image(10, 40)
    img, label, ignore = weak_view(image, None, 24, [1.0, 1.0], True, gen(1))
    assert (label == 0).all()
    assert (ignore[:10] == 0).all() and (ignore[10:] == 255).all()


def test_weak_view_rescales_the_long_side():
    # Blocks of 8 px: after a 2x resize of a 16x24 image the 48-long side fills a 48 crop.
    mask = np.kron(np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((8, 8), dtype=np.uint8))
    image = np.repeat((mask / 10.0)[..., None], 3, axis=-1).astype(np.float32)
    img, label, ignore = weak_view(image, mask, 48, [2.0, 2.0], False, gen(0))
    assert (ignore[:32] == 0).all() and (ignore[32:] == 255).all()  # 16 -> 32 rows, padded to 48
    expected = np.kron(np.arange(6).reshape(2, 3), np.ones((16, 16), dtype=np.int64))
    assert torch.equal(label[:32], torch.from_numpy(expected))  # nearest keeps blocks exact
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}


def test_weak_view_scale_range_is_sampled():
    image, mask = coded_image(64, 64)
    pads = []
    for seed in range(30):
        _, _, ignore = weak_view(image, mask, 64, [0.5, 1.0], False, gen(seed))
        pads.append(int((ignore == 255).sum()))
    assert min(pads) < 64 * 64 * 0.2 and max(pads) > 64 * 64 * 0.5  # scale varied in [0.5, 1]


@pytest.mark.parametrize(
    ("in_size", "out_size"), [(50, 13), (97, 40), (480, 333), (500, 1000), (37, 37), (7, 64)]
)
def test_windowed_resampling_weights_are_pytorchs(in_size, out_size):
    """Rows of the antialiased bilinear matrix equal F.interpolate's own weights (read off an identity)."""
    eye = torch.eye(in_size)[None, None]
    reference = F.interpolate(
        eye, size=(out_size, in_size), mode="bilinear", align_corners=False, antialias=True
    )
    start, stop = out_size // 3, out_size - out_size // 4
    first, weights = _aa_bilinear_rows(in_size, out_size, start, stop)
    full = torch.zeros(stop - start, in_size)
    full[:, first : first + weights.shape[1]] = weights
    torch.testing.assert_close(full, reference[0, 0, start:stop], rtol=0, atol=2e-7)


def test_resize_window_equals_a_crop_of_the_full_resize():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((3, 41, 57), dtype=np.float32))
    lab = torch.from_numpy(rng.integers(0, 5, (41, 57)).astype(np.uint8))
    for size in [(90, 125), (20, 28), (41, 80)]:
        full = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        full_lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(
            torch.uint8
        )
        rows, cols = (size[0] // 4, size[0] - 2), (3, size[1] // 2)
        out, out_lab = resize_window(img.permute(1, 2, 0).numpy(), lab.numpy(), size, rows, cols)
        window = (slice(*rows), slice(*cols))
        torch.testing.assert_close(out, full[(slice(None), *window)].clamp(0, 1), rtol=0, atol=1e-6)
        assert torch.equal(out_lab, full_lab[window])


def test_resize_crop_only_draws_the_same_views_up_to_rounding():
    """``data.resize_crop_only``: same crop, flip, labels and ignore map; image equal to ≤ 1e-6; the
    generator ends in the same state (later draws are unchanged), over up-, down- and no rescale,
    padding, grey and RGB."""
    rng = np.random.default_rng(1)
    for case in range(60):
        h, w = (int(v) for v in rng.integers(12, 160, 2))
        channels = int(rng.choice([1, 3]))
        image = rng.random((h, w, channels), dtype=np.float32)
        mask = rng.integers(0, 4, (h, w)).astype(np.uint8) if case % 3 else None
        crop = int(rng.integers(8, 120))
        scales = [1.0, 1.0] if case % 7 == 0 else sorted(rng.uniform(0.3, 2.5, 2).tolist())
        g_full, g_window = gen(case), gen(case)
        full = weak_view(image, mask, crop, scales, True, g_full)
        window = weak_view(image, mask, crop, scales, True, g_window, resize_crop_only=True)
        torch.testing.assert_close(window[0], full[0], rtol=0, atol=1e-6)
        assert torch.equal(window[1], full[1]) and torch.equal(window[2], full[2])
        assert torch.equal(g_window.get_state(), g_full.get_state())
        if scales == [1.0, 1.0]:
            assert torch.equal(window[0], full[0])  # no resampling: exact


# ------------------------------------------------------------------ strong view


def _no_aug() -> StrongAugConfig:
    return StrongAugConfig(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutmix_p=0.0)


def test_strong_view_identity_when_all_probabilities_zero():
    img = torch.rand(3, 16, 16, generator=gen(0))
    assert torch.equal(strong_view(img, _no_aug(), gen(1)), img)


def test_strong_view_deterministic_and_in_range():
    img = torch.rand(3, 24, 24, generator=gen(0))
    cfg = StrongAugConfig(color_jitter_p=1.0, grayscale_p=0.5, blur_p=1.0)
    a, b = strong_view(img, cfg, gen(5)), strong_view(img, cfg, gen(5))
    assert torch.equal(a, b) and a.shape == img.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    outs = {tuple(strong_view(img, cfg, gen(s)).flatten()[:20].tolist()) for s in range(6)}
    assert len(outs) == 6


def test_strong_view_grayscale():
    img = torch.rand(3, 16, 16, generator=gen(0))
    cfg = StrongAugConfig(color_jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)
    out = strong_view(img, cfg, gen(0))
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])
    assert not torch.allclose(out[0], img[0])


def test_strong_view_brightness_only_scales_pixels():
    img = 0.2 + 0.5 * torch.rand(3, 16, 16, generator=gen(0))
    cfg = StrongAugConfig(color_jitter=[0.5, 0.0, 0.0, 0.0], color_jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    factors = []
    for s in range(20):
        ratio = strong_view(img, cfg, gen(s)) / img
        inside = ratio[(img * ratio.max()) < 1.0]
        assert torch.allclose(inside, inside[0].expand_as(inside), atol=1e-5)
        factors.append(float(inside[0]))
    assert 0.5 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.5


def test_strong_view_blur_smooths():
    img = torch.rand(3, 32, 32, generator=gen(0))
    cfg = StrongAugConfig(color_jitter_p=0.0, grayscale_p=0.0, blur_p=1.0, blur_sigma=[1.0, 2.0])
    out = strong_view(img, cfg, gen(0))
    assert float(out.std()) < 0.6 * float(img.std())
    assert abs(float(out.mean()) - float(img.mean())) < 0.02


@pytest.mark.parametrize("channels", [1, 2])
def test_strong_view_other_channel_counts(channels):
    img = torch.rand(channels, 16, 16, generator=gen(0))
    cfg = StrongAugConfig(color_jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    out = strong_view(img, cfg, gen(2))
    assert out.shape == img.shape and not torch.equal(out, img)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_blur_kernel_size_is_odd_covers_three_sigma_and_fits():
    assert blur_kernel_size(0.1, 64, 64) == 3
    assert blur_kernel_size(2.0, 64, 64) == 13
    assert blur_kernel_size(2.0, 8, 10) == 7
    for s in (0.1, 0.5, 1.3, 2.0):
        assert blur_kernel_size(s, 64, 64) % 2 == 1


# ------------------------------------------------------------------ CutMix box


def test_cutmix_box_probability_zero_and_one():
    assert not cutmix_box(32, 32, StrongAugConfig(cutmix_p=0.0), gen(0)).any()
    drawn = sum(bool(cutmix_box(32, 32, StrongAugConfig(cutmix_p=0.5), gen(s)).any()) for s in range(200))
    assert 70 <= drawn <= 130


@pytest.mark.parametrize("h,w", [(32, 32), (24, 48)])
def test_cutmix_box_is_one_rectangle_of_the_configured_area_and_aspect(h, w):
    cfg = StrongAugConfig(cutmix_p=1.0)
    areas = []
    for s in range(100):
        box = cutmix_box(h, w, cfg, gen(s))
        assert box.shape == (h, w) and box.dtype == torch.uint8
        assert set(box.unique().tolist()) <= {0, 1}
        ys, xs = torch.nonzero(box, as_tuple=True)
        bh, bw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert int(box.sum()) == bh * bw  # a filled rectangle
        assert 0.3 * 0.8 <= bh / bw <= (1 / 0.3) * 1.25  # aspect in [a, 1/a] up to int truncation
        areas.append(bh * bw / (h * w))
    assert min(areas) >= 0.0 and max(areas) <= 0.4
    assert min(areas) < 0.1 and max(areas) > 0.25


def test_cutmix_box_deterministic_and_terminates_on_extreme_shapes():
    cfg = StrongAugConfig(cutmix_p=1.0)
    assert torch.equal(cutmix_box(32, 32, cfg, gen(3)), cutmix_box(32, 32, cfg, gen(3)))
    box = cutmix_box(2, 400, cfg, gen(0))  # no aspect in [0.3, 3.3] fits: clipped after max tries
    assert box.any() and box.shape == (2, 400)
