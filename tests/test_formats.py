"""Dataset builders and readers of the built-in formats (docs/datasets.md).

CHASE_DB1 and the COVID Inf-Net derivative are checked on the real files in ``../shared/data``
(skipped when absent); MedSeg NIfTI, ACDC, VOC and Cityscapes on tiny fixtures written here in
their real layouts.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data import acdc, chase, cityscapes, covid, voc  # noqa: F401  (registers builders/readers)
from semiseg.data.base import DATASETS, DatasetSource, default_palette, labeled_count, make_splits
from semiseg.data.io import LABEL_MAPS, READERS, read_record
from semiseg.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHASE_ROOT = SHARED / "chase_db1"
INFNET_ROOT = SHARED / "covid19_ct" / "infnet_derivative"
needs_shared = pytest.mark.skipif(
    not CHASE_ROOT.is_dir() or not INFNET_ROOT.is_dir(),
    reason="../shared/data not present: real-data tests need the shared datasets",
)


def build(name: str, root: Path | None, **kw) -> tuple[DataConfig, DatasetSource]:
    cfg = DataConfig(name=name, root=None if root is None else str(root), **kw)
    return cfg, DATASETS[name](cfg)


def names(records) -> list[str]:
    return [r.name for r in records]


def save_palette_png(path: Path, mask: np.ndarray, num_classes: int = 21) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [c for rgb in default_palette(256) for c in rgb]
    img.putpalette(flat)
    img.save(path)


def save_rgb(path: Path, h: int = 12, w: int = 16, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


# --------------------------------------------------------------------------------------------
# Registry and the labeled-count rule
# --------------------------------------------------------------------------------------------


def test_builders_readers_and_label_maps_are_registered():
    assert {"chase_db1", "covid_infnet", "covid_medseg", "acdc", "voc", "cityscapes"} <= set(DATASETS)
    assert {"nifti", "h5"} <= set(READERS)
    assert "cityscapes_trainid" in LABEL_MAPS


@pytest.mark.parametrize(
    ("pool", "fraction", "rounding", "expected"),
    [
        (23, 0.125, "floor", 2),  # CHASE_DB1: the papers' 2 labeled of 23
        (23, 0.25, "floor", 5),
        (50, 0.125, "floor", 6),  # COVID Inf-Net derivative
        (50, 0.25, "floor", 12),
        (50, 0.125, "round", 6),
        (50, 0.25, "round", 12),
        (70, 0.125, "round", 9),  # MedSeg 70-slice pool: the papers' 9 labeled
        (70, 0.25, "round", 18),
        (23, 0.01, "floor", 1),  # floor keeps at least one
        (23, 1.0, "floor", 23),
    ],
)
def test_labeled_count_rounding(pool, fraction, rounding, expected):
    assert labeled_count(pool, fraction, rounding=rounding) == expected


def test_missing_root_is_a_data_error_naming_the_key_or_path(tmp_path):
    for name in ("chase_db1", "covid_infnet", "covid_medseg", "acdc", "voc", "cityscapes"):
        with pytest.raises(DataError, match=r"data\.root"):
            build(name, None)
        missing = tmp_path / f"no_{name}"
        with pytest.raises(DataError, match=re.escape(str(missing))):
            build(name, missing)


# --------------------------------------------------------------------------------------------
# CHASE_DB1 and COVID Inf-Net derivative: real files
# --------------------------------------------------------------------------------------------


@needs_shared
def test_chase_db1_real_split_sizes_and_masks():
    cfg, src = build("chase_db1", CHASE_ROOT)
    assert len(src.train_pool) == 23 and len(src.test) == 5 and src.val == []
    assert names(src.train_pool)[0] == "Image_01L" and names(src.train_pool)[-1] == "Image_12L"
    assert names(src.test) == ["Image_12R", "Image_13L", "Image_13R", "Image_14L", "Image_14R"]
    assert src.class_names == ["background", "vessel"] and src.in_channels == 3
    assert all(r.mask.endswith("_1stHO.png") for r in src.train_pool + src.test)
    for rec in (src.train_pool[0], src.test[-1]):
        image, mask = read_record(rec, cfg, num_classes=2, in_channels=3)
        assert image.shape == (960, 999, 3) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert set(np.unique(mask)) == {0, 1}
        assert 0.05 < mask.mean() < 0.09  # README: 1stHO vessel fraction 0.0506..0.0852
    for fraction, count in ((0.125, 2), (0.25, 5)):
        splits = make_splits(src, DataConfig(name="chase_db1", labeled=fraction), seed=0)
        assert len(splits.labeled) == count and len(splits.unlabeled) == 23 - count
        assert len(splits.test) == 5
    other = make_splits(src, DataConfig(name="chase_db1", labeled=0.125), seed=1)
    assert len(other.labeled) == 2


@needs_shared
def test_chase_db1_second_observer_and_missing_mask(tmp_path):
    _, src = build("chase_db1", CHASE_ROOT, mask_suffix="_2ndHO")
    assert all(r.mask.endswith("_2ndHO.png") for r in src.train_pool + src.test)
    with pytest.raises(DataError, match=r"Image_01L_3rdHO\.png"):
        build("chase_db1", CHASE_ROOT, mask_suffix="_3rdHO")
    (tmp_path / "Image_01L.jpg").write_bytes((CHASE_ROOT / "Image_01L.jpg").read_bytes())
    with pytest.raises(DataError, match="expected 28"):
        build("chase_db1", tmp_path)


@needs_shared
def test_covid_infnet_real_parts():
    cfg, src = build("covid_infnet", INFNET_ROOT)
    assert len(src.train_pool) == 50 and len(src.test) == 48
    assert src.in_channels == 1 and src.class_names == ["background", "ground_glass", "consolidation"]
    train_k = [int(n) for n in names(src.train_pool)]
    assert train_k == sorted(train_k) and train_k[:8] == [0, 1, 2, 3, 4, 5, 10, 11]  # numeric order
    assert not {22, 48} & {int(n) for n in names(src.train_pool + src.test)}  # dropped by Inf-Net
    image, mask = read_record(src.train_pool[0], cfg, num_classes=3, in_channels=1)
    assert image.ndim == 3 and image.shape[2] == 1 and mask.shape == image.shape[:2]
    assert mask.max() <= 2 and set(np.unique(mask)) >= {0, 1}
    splits = make_splits(src, DataConfig(name="covid_infnet", labeled=0.125), seed=0)
    assert len(splits.labeled) == 6 and len(splits.unlabeled) == 44


# --------------------------------------------------------------------------------------------
# MedSeg NIfTI
# --------------------------------------------------------------------------------------------


def write_medseg(root: Path, depth: int = 10, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    hu = np.full((size, size, depth), -1000.0, dtype=np.float32)
    hu[:, :, :] += np.arange(depth, dtype=np.float32) * 10.0
    hu[0, 5, :] = 400.0  # a marker to check the orientation
    hu[1, 1, :] = -300.0  # mid-window
    mask = np.zeros((size, size, depth), dtype=np.float32)
    mask[0, 5, :] = 3.0
    mask[10:20, 10:20, :] = 1.0
    mask[12:14, 12:14, :] = 2.0
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(root / "tr_im.nii.gz"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / "tr_mask.nii.gz"))
    return hu, mask


def test_covid_medseg_split_windowing_and_orientation(tmp_path):
    hu, mask = write_medseg(tmp_path)
    cfg, src = build("covid_medseg", tmp_path)
    assert (len(src.train_pool), len(src.val), len(src.test)) == (7, 1, 2)  # 70 / 10 / 20 %
    assert [r.index for r in src.train_pool + src.val + src.test] == list(range(10))  # slice order
    assert src.in_channels == 1 and len(src.class_names) == 4
    assert src.class_names[3] == "pleural_effusion"
    rec = src.test[-1]  # slice 9
    image, m = read_record(rec, cfg, num_classes=4, in_channels=1)
    assert image.shape == (32, 32, 1) and m.shape == (32, 32) and m.dtype == np.uint8
    expected = np.rot90(np.clip(hu[..., 9], -1000, 400) + 1000) / 1400
    np.testing.assert_allclose(image[..., 0], expected, atol=1e-6)
    # rot90 (counter-clockwise): element [0, 5] of the stored slice lands at [size - 1 - 5, 0]
    assert image[26, 0, 0] == pytest.approx(1.0) and m[26, 0] == 3
    assert image[30, 1, 0] == pytest.approx(0.5)  # -300 HU is mid-window of [-1000, 400]
    np.testing.assert_array_equal(m, np.rot90(mask[..., 9]).astype(np.uint8))
    narrow = DataConfig(name="covid_medseg", root=str(tmp_path), hu_window=[-1000.0, -900.0])
    img2, _ = read_record(rec, narrow, num_classes=4)
    assert img2[26, 0, 0] == pytest.approx(1.0) and img2[0, 0, 0] == pytest.approx(0.9)
    unl, none_mask = read_record(rec.unlabeled(), cfg, num_classes=4)
    assert none_mask is None and unl.shape == (32, 32, 1)
    splits = make_splits(src, DataConfig(name="covid_medseg", labeled=0.25), seed=0)
    assert len(splits.labeled) == 2 and len(splits.val) == 1  # round(7 / 4) = 2


def test_covid_medseg_errors(tmp_path):
    write_medseg(tmp_path)
    bad = DataConfig(name="covid_medseg", root=str(tmp_path), hu_window=[400.0, -1000.0])
    _, src = build("covid_medseg", tmp_path)
    with pytest.raises(DataError, match=r"data\.hu_window"):
        read_record(src.train_pool[0], bad, num_classes=4)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 9), np.float32), np.eye(4)), str(tmp_path / "tr_mask.nii.gz"))
    with pytest.raises(DataError, match=r"tr_mask\.nii\.gz: mask shape"):
        build("covid_medseg", tmp_path)
    (tmp_path / "tr_mask.nii.gz").unlink()
    with pytest.raises(DataError, match=r"tr_mask\.nii\.gz: file not found"):
        build("covid_medseg", tmp_path)


# --------------------------------------------------------------------------------------------
# ACDC (SSL4MIS h5)
# --------------------------------------------------------------------------------------------


def write_acdc(root: Path, patients: int = 4, slices: int = 3, order: list[int] | None = None) -> None:
    """A tiny SSL4MIS ACDC tree; ``order``: the patients' order in ``train_slices.list``."""
    (root / "data" / "slices").mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for p in order or range(1, patients + 1):
        for k in range(slices):
            name = f"patient{p:03d}_frame01_slice_{k}"
            train.append(name)
            with h5py.File(root / "data" / "slices" / f"{name}.h5", "w") as f:
                f["image"] = rng.normal(size=(8, 10)).astype(np.float32) * 3 + p
                f["label"] = np.full((8, 10), k % 4, dtype=np.uint8)
    (root / "train_slices.list").write_text("\n".join(train) + "\n")
    for name, depth, listing in (
        ("patient090_frame01", 2, "val.list"),
        ("patient100_frame02", 3, "test.list"),
    ):
        with h5py.File(root / "data" / f"{name}.h5", "w") as f:
            f["image"] = rng.normal(size=(depth, 8, 10)).astype(np.float32)
            f["label"] = np.stack([np.full((8, 10), d, np.uint8) for d in range(depth)])
        (root / listing).write_text(name + "\n")


def test_acdc_records_and_volumes(tmp_path):
    write_acdc(tmp_path)
    cfg, src = build("acdc", tmp_path)
    assert len(src.train_pool) == 12 and src.in_channels == 1
    assert src.class_names == ["background", "RV", "MYO", "LV"]
    assert names(src.val) == ["patient090_frame01_slice_0", "patient090_frame01_slice_1"]
    assert [r.index for r in src.test] == [0, 1, 2]
    image, mask = read_record(src.train_pool[4], cfg, num_classes=4, in_channels=1)  # patient002 slice 1
    assert image.shape == (8, 10, 1) and image.min() == 0.0 and image.max() == pytest.approx(1.0)
    assert mask.shape == (8, 10) and set(np.unique(mask)) == {1}
    with h5py.File(src.test[2].image, "r") as f:
        raw = f["image"][2]
    image, mask = read_record(src.test[2], cfg, num_classes=4)
    np.testing.assert_allclose(image[..., 0], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert set(np.unique(mask)) == {2}


def test_acdc_patient_wise_labeled_protocol(tmp_path):
    write_acdc(tmp_path, order=[3, 1, 4, 2])  # file order, not patient order (as SSL4MIS's list)
    _, src = build("acdc", tmp_path)
    splits = make_splits(src, DataConfig(name="acdc", labeled=2), seed=0)  # int: 2 patients
    # the first two patients of train_slices.list in file order, not the first two sorted
    assert {n.split("_")[0] for n in names(splits.labeled)} == {"patient003", "patient001"}
    assert len(splits.labeled) == 6 and len(splits.unlabeled) == 6
    assert all(r.mask is None for r in splits.unlabeled)
    again = make_splits(src, DataConfig(name="acdc", labeled=2), seed=5)
    assert names(again.labeled) == names(splits.labeled)  # fixed, not seeded
    half = make_splits(src, DataConfig(name="acdc", labeled=0.3), seed=0)  # ceil(0.3 * 4) = 2
    assert len(half.labeled) == 6
    assert acdc.patients_for(0.1, 70) == 7  # 0.1 * 70 = 7.000000000000001 in floats
    assert acdc.patients_for(0.05, 70) == 4
    with pytest.raises(DataError, match=r"data\.labeled=5"):
        make_splits(src, DataConfig(name="acdc", labeled=5), seed=0)


def test_acdc_errors(tmp_path):
    write_acdc(tmp_path)
    (tmp_path / "data" / "slices" / "patient003_frame01_slice_2.h5").unlink()
    with pytest.raises(DataError, match=r"patient003_frame01_slice_2\.h5"):
        build("acdc", tmp_path)
    (tmp_path / "train_slices.list").unlink()
    with pytest.raises(DataError, match=r"train_slices\.list: split list not found"):
        build("acdc", tmp_path)


# --------------------------------------------------------------------------------------------
# PASCAL VOC
# --------------------------------------------------------------------------------------------


def write_voc(root: Path, with_aug: bool = True) -> None:
    ids = [f"2007_00000{i}" for i in range(6)]
    for i, ident in enumerate(ids):
        save_rgb(root / "JPEGImages" / f"{ident}.jpg", seed=i)
    fine = np.zeros((12, 16), np.uint8)
    fine[2:8, 3:9] = 15  # person
    fine[2, 3:9] = 255  # boundary
    for ident in ids[:4]:
        save_palette_png(root / "SegmentationClass" / f"{ident}.png", fine)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (sets / "val.txt").write_text("\n".join(ids[2:4]) + "\n")
    if with_aug:
        aug = np.full((12, 16), 7, np.uint8)
        for ident in (ids[0], ids[4], ids[5]):
            save_palette_png(root / "SegmentationClassAug" / f"{ident}.png", aug)
        lines = [
            f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in (ids[0], ids[1], ids[4], ids[5])
        ]
        (sets / "train_aug.txt").write_text("\n".join(lines) + "\n")


def test_voc_classic_protocol_and_ignore(tmp_path):
    write_voc(tmp_path)
    cfg, src = build("voc", tmp_path)
    assert names(src.train_pool) == ["2007_000000", "2007_000001"]
    assert names(src.extra_unlabeled) == ["2007_000004", "2007_000005"]
    assert all(r.mask is None for r in src.extra_unlabeled)
    assert names(src.test) == ["2007_000002", "2007_000003"] and src.val == []
    assert len(src.class_names) == 21 and src.class_names[15] == "person" and src.in_channels == 3
    assert src.palette == default_palette(21) and src.palette[15] == (192, 128, 128)
    assert "SegmentationClassAug" in src.train_pool[0].mask  # aug preferred for training
    assert "SegmentationClassAug" not in src.train_pool[1].mask
    image, mask = read_record(src.test[0], cfg, num_classes=21, in_channels=3)
    assert image.shape == (12, 16, 3) and mask.shape == (12, 16)
    assert set(np.unique(mask)) == {0, 15, 255} and (mask[2, 3:9] == 255).all()
    _, aug_mask = read_record(src.train_pool[0], cfg, num_classes=21)
    assert set(np.unique(aug_mask)) == {7}
    splits = make_splits(src, DataConfig(name="voc", labeled=1), seed=0)
    assert len(splits.labeled) == 1 and len(splits.unlabeled) == 3


def test_voc_blended_pool_and_errors(tmp_path):
    write_voc(tmp_path)
    sets = tmp_path / "ImageSets" / "Segmentation"
    (sets / "train.txt").unlink()
    _, src = build("voc", tmp_path)
    assert names(src.train_pool) == ["2007_000000", "2007_000001", "2007_000004", "2007_000005"]
    assert src.extra_unlabeled == []
    (sets / "train.txt").write_text("2007_000009\n")
    with pytest.raises(DataError, match=r"JPEGImages/2007_000009\.jpg: image not found"):
        build("voc", tmp_path)
    (sets / "train.txt").write_text("2007_000005\n")
    (tmp_path / "SegmentationClassAug" / "2007_000005.png").unlink()
    with pytest.raises(DataError, match=r"SegmentationClass/2007_000005\.png: mask not found"):
        build("voc", tmp_path)


# --------------------------------------------------------------------------------------------
# Cityscapes
# --------------------------------------------------------------------------------------------


def write_cityscapes(root: Path) -> np.ndarray:
    label_ids = np.array([[7, 8, 26, 33], [0, 1, 6, 34], [24, 31, 30, 255]], dtype=np.uint8)
    for split, city, stem in (
        ("train", "aachen", "aachen_000000_000019"),
        ("train", "bremen", "bremen_000001_000019"),
        ("val", "frankfurt", "frankfurt_000000_000294"),
    ):
        save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", h=3, w=4)
        gt = root / "gtFine" / split / city
        gt.mkdir(parents=True)
        Image.fromarray(label_ids).save(gt / f"{stem}_gtFine_labelIds.png")
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(gt / f"{stem}_gtFine_color.png")
    trainids = np.array([[0, 1, 13, 18]] * 3, dtype=np.uint8)
    Image.fromarray(trainids).save(
        root / "gtFine" / "train" / "bremen" / "bremen_000001_000019_gtFine_labelTrainIds.png"
    )
    return label_ids


def test_cityscapes_records_and_label_map(tmp_path):
    write_cityscapes(tmp_path)
    cfg, src = build("cityscapes", tmp_path)
    assert names(src.train_pool) == ["aachen_000000_000019", "bremen_000001_000019"]
    assert names(src.test) == ["frankfurt_000000_000294"] and src.val == []
    assert len(src.class_names) == 19 and src.class_names[13] == "car" and src.in_channels == 3
    assert len(src.palette) == 19 and src.palette[0] == (128, 64, 128) and src.palette[18] == (119, 11, 32)
    aachen, bremen = src.train_pool
    assert aachen.label_map == "cityscapes_trainid" and aachen.mask.endswith("_gtFine_labelIds.png")
    assert bremen.label_map is None and bremen.mask.endswith("_gtFine_labelTrainIds.png")
    image, mask = read_record(aachen, cfg, num_classes=19, in_channels=3)
    assert image.shape == (3, 4, 3)
    expected = [[0, 1, 13, 18], [255, 255, 255, 255], [11, 16, 255, 255]]
    np.testing.assert_array_equal(mask, np.array(expected, dtype=np.uint8))
    _, direct = read_record(bremen, cfg, num_classes=19)
    np.testing.assert_array_equal(direct[0], [0, 1, 13, 18])


def test_cityscapes_missing_mask(tmp_path):
    write_cityscapes(tmp_path)
    (tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"frankfurt_000000_000294_gtFine_labelIds\.png: mask not found"):
        build("cityscapes", tmp_path)
