"""The built-in procedural dataset: determinism, class balance, appearance, records and reader."""

from __future__ import annotations

import time

import numpy as np
import pytest

from semiseg.config import DataConfig, SyntheticConfig
from semiseg.data.base import DATASETS, make_splits
from semiseg.data.io import read_record
from semiseg.data.synthetic import build_synthetic, generate_sample
from semiseg.errors import DataError


def test_generate_is_deterministic_and_seed_dependent():
    a_img, a_mask = generate_sample(3, 64, 3, 3)
    b_img, b_mask = generate_sample(3, 64, 3, 3)
    c_img, c_mask = generate_sample(4, 64, 3, 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_mask, c_mask) and not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_shapes_dtypes_and_range(channels):
    img, mask = generate_sample(0, 48, 3, channels)
    assert img.shape == (48, 48, channels) and img.dtype == np.float32
    assert mask.shape == (48, 48) and mask.dtype == np.uint8
    assert img.min() >= 0.0 and img.max() <= 1.0


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_classes_present_and_imbalanced(num_classes):
    masks = np.stack([generate_sample(s, 96, num_classes, 3)[1] for s in range(20)])
    assert set(np.unique(masks).tolist()) == set(range(num_classes))
    fractions = np.array([(masks == c).mean() for c in range(num_classes)])
    foreground = 1.0 - fractions[0]
    assert 0.03 <= foreground <= 0.12, fractions
    assert fractions[1] == max(fractions[1:])  # vessels are the largest foreground class
    per_image_fg = (masks > 0).mean(axis=(1, 2))
    assert per_image_fg.min() > 0.01  # every image has foreground


def test_vessels_are_thin_structures():
    mask = generate_sample(1, 96, 2, 3)[1] == 1
    # A thin structure loses most of its pixels under a 5x5 erosion; a blob would not.
    padded = np.pad(mask, 2)
    eroded = np.ones_like(mask)
    for dy in range(5):
        for dx in range(5):
            eroded &= padded[dy : dy + 96, dx : dx + 96]
    assert eroded.sum() < 0.1 * mask.sum()


def test_classes_differ_in_appearance():
    darker = brighter = 0
    for s in range(10):
        img, mask = generate_sample(s, 96, 4, 3)
        lum = img.mean(axis=-1)
        bg = lum[mask == 0].mean()
        darker += lum[mask == 1].mean() < bg
        brighter += lum[mask == 2].mean() > bg
        if (mask == 3).any():  # lesion_b: dark, redder than lesion
            assert img[mask == 3].mean() < img[mask == 2].mean()
    assert darker == 10 and brighter == 10


def test_not_trivially_separable_by_intensity():
    img, mask = generate_sample(2, 96, 2, 1)
    vessel, bg = img[mask == 1, 0], img[mask == 0, 0]
    # Noise and illumination make the intensity ranges overlap: no global threshold is perfect.
    assert vessel.max() > np.quantile(bg, 0.1)


def test_fast_enough():
    generate_sample(0, 96, 4, 3)
    start = time.perf_counter()
    for s in range(20):
        generate_sample(s, 96, 4, 3)
    assert (time.perf_counter() - start) / 20 < 0.05  # ~4-6 ms on one core; generous for loaded CI


def test_bad_arguments():
    with pytest.raises(DataError, match="num_classes"):
        generate_sample(0, 32, 5, 3)


def test_builder_records_and_reader():
    syn = SyntheticConfig(num_labeled_pool=5, num_val=2, num_test=3, size=32, num_classes=4, channels=1)
    cfg = DataConfig(name="synthetic", synthetic=syn, labeled=2)
    assert DATASETS["synthetic"] is build_synthetic
    src = build_synthetic(cfg)
    assert (len(src.train_pool), len(src.val), len(src.test)) == (5, 2, 3)
    assert src.class_names == ["background", "vessel", "lesion", "lesion_b"] and src.in_channels == 1
    records = src.train_pool + src.val + src.test
    assert len({r.name for r in records}) == 10 and len({r.index for r in records}) == 10
    assert all(r.reader == "synthetic" and r.mask is not None for r in records)
    image, mask = read_record(src.test[0], cfg, 4, 1)
    ref_img, ref_mask = generate_sample(src.test[0].index, 32, 4, 1)
    assert np.array_equal(image, ref_img) and np.array_equal(mask, ref_mask)
    image, mask = read_record(src.test[0].unlabeled(), cfg, 4, 1)
    assert mask is None
    # Test images do not move when the pool grows.
    bigger = DataConfig(synthetic=SyntheticConfig(num_labeled_pool=9, num_test=3, size=32, num_classes=4))
    assert [r.index for r in build_synthetic(bigger).test] == [r.index for r in src.test]
    splits = make_splits(src, cfg, seed=0)
    assert len(splits.labeled) == 2 and len(splits.unlabeled) == 3 and splits.num_classes == 4


def test_differently_configured_records_do_not_share_cache():
    small = DataConfig(synthetic=SyntheticConfig(size=32))
    large = DataConfig(synthetic=SyntheticConfig(size=48))
    a = read_record(build_synthetic(small).test[0], small, 3, 3)[0]
    b = read_record(build_synthetic(large).test[0], large, 3, 3)[0]
    assert a.shape == (32, 32, 3) and b.shape == (48, 48, 3)


@pytest.mark.parametrize("classes", [2, 3])
def test_builder_class_names(classes):
    src = build_synthetic(DataConfig(synthetic=SyntheticConfig(num_classes=classes)))
    assert src.class_names == ["background", "vessel", "lesion"][:classes]
    assert len(src.palette) == classes
