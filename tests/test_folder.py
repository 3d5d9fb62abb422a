"""The custom folder format (docs/own-data.md): discovery, classes.yaml, one-line errors, split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data.base import DATASETS, make_splits
from semiseg.data.datasets import EvalDataset, LabeledDataset
from semiseg.data.folder import build_folder, write_split
from semiseg.data.io import read_record
from semiseg.errors import DataError


def write_dataset(
    root: Path, n: int = 6, n_unlabeled: int = 2, size=(12, 10), mode: str = "RGB", classes=None
) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        shape = (size[0], size[1], 3) if mode == "RGB" else size
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
            root / "images" / f"img{i}.png"
        )
        mask = rng.integers(0, 3, size, dtype=np.uint8)
        mask[0, 0] = 255
        Image.fromarray(mask).save(root / "masks" / f"img{i}.png")
    if n_unlabeled:
        (root / "unlabeled").mkdir()
        for i in range(n_unlabeled):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
                root / "unlabeled" / f"u{i}.jpg"
            )
    if classes is not None:
        (root / "classes.yaml").write_text(classes)
    return root


def cfg_for(root: Path, **kw) -> DataConfig:
    return DataConfig(name="folder", root=str(root), **kw)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_builder_discovers_images_masks_and_unlabeled(tmp_path):
    root = write_dataset(tmp_path / "ds", classes="[background, road, car]\n")
    assert DATASETS["folder"] is build_folder
    src = build_folder(cfg_for(root))
    assert [r.name for r in src.train_pool] == [f"images/img{i}.png" for i in range(6)]
    assert [r.name for r in src.extra_unlabeled] == ["unlabeled/u0.jpg", "unlabeled/u1.jpg"]
    assert all(r.mask is None for r in src.extra_unlabeled)
    assert src.val == [] and src.test == []
    assert src.class_names == ["background", "road", "car"] and src.in_channels == 3
    splits = make_splits(src, cfg_for(root, labeled=2), seed=0)
    assert len(splits.labeled) == 2 and len(splits.unlabeled) == 6
    image, mask = read_record(splits.labeled[0], cfg_for(root), 3, 3)
    assert image.shape == (12, 10, 3) and mask[0, 0] == 255


def test_classes_yaml_mapping_with_palette_and_greyscale(tmp_path):
    text = "names: [bg, lesion]\npalette: [[0, 0, 0], [255, 0, 0]]\n"
    root = write_dataset(tmp_path / "ds", mode="L", n_unlabeled=0, classes=text)
    src = build_folder(cfg_for(root))
    assert src.class_names == ["bg", "lesion"] and src.palette == [(0, 0, 0), (255, 0, 0)]
    assert src.in_channels == 1 and src.extra_unlabeled == []


def test_num_classes_from_config_or_error(tmp_path):
    root = write_dataset(tmp_path / "ds")
    with pytest.raises(DataError, match="data.num_classes") as exc:
        build_folder(cfg_for(root))
    assert str(root) in one_line(exc)
    src = build_folder(cfg_for(root, num_classes=3))
    assert src.class_names == ["class_0", "class_1", "class_2"]


def test_classes_yaml_conflicting_with_num_classes(tmp_path):
    root = write_dataset(tmp_path / "ds", classes="[a, b, c]\n")
    with pytest.raises(DataError, match="classes.yaml") as exc:
        build_folder(cfg_for(root, num_classes=4))
    one_line(exc)


@pytest.mark.parametrize(
    "text", ["{names: 3}\n", "{names: [a, b], palette: [[0, 0]]}\n", "{colors: [a]}\n", "[a, b\n"]
)
def test_bad_classes_yaml(tmp_path, text):
    root = write_dataset(tmp_path / "ds", classes=text)
    with pytest.raises(DataError, match="classes.yaml") as exc:
        build_folder(cfg_for(root))
    one_line(exc)


def test_error_missing_folders(tmp_path):
    with pytest.raises(DataError, match="not found") as exc:
        build_folder(cfg_for(tmp_path / "nowhere", num_classes=2))
    assert "nowhere" in one_line(exc)
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="images") as exc:
        build_folder(cfg_for(tmp_path / "ds", num_classes=2))
    one_line(exc)
    (tmp_path / "ds" / "images").mkdir()
    with pytest.raises(DataError, match="masks") as exc:
        build_folder(cfg_for(tmp_path / "ds", num_classes=2))
    one_line(exc)


def test_error_zero_images(tmp_path):
    root = write_dataset(tmp_path / "ds", n=0, n_unlabeled=0)
    with pytest.raises(DataError, match="no images") as exc:
        build_folder(cfg_for(root, num_classes=2))
    assert "images" in one_line(exc)


def test_error_image_without_mask(tmp_path):
    root = write_dataset(tmp_path / "ds")
    (root / "masks" / "img3.png").unlink()
    with pytest.raises(DataError, match="has no mask") as exc:
        build_folder(cfg_for(root, num_classes=3))
    assert "img3.png" in one_line(exc)


def test_error_mask_without_image(tmp_path):
    root = write_dataset(tmp_path / "ds")
    (root / "images" / "img2.png").unlink()
    with pytest.raises(DataError, match="mask without an image") as exc:
        build_folder(cfg_for(root, num_classes=3))
    assert "img2.png" in one_line(exc)


def test_error_unreadable_image(tmp_path):
    root = write_dataset(tmp_path / "ds")
    (root / "unlabeled" / "u1.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image") as exc:
        build_folder(cfg_for(root, num_classes=3))
    assert "u1.jpg" in one_line(exc)


def test_error_channel_mismatch(tmp_path):
    root = write_dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((12, 10), np.uint8), "L").save(root / "images" / "img4.png")
    with pytest.raises(DataError, match="channel") as exc:
        build_folder(cfg_for(root, num_classes=3))
    assert "img4.png" in one_line(exc)


def test_error_size_mismatch_on_read(tmp_path):
    root = write_dataset(tmp_path / "ds")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "img1.png")
    src = build_folder(cfg_for(root, num_classes=3))
    with pytest.raises(DataError, match="differs") as exc:
        read_record(src.train_pool[1], cfg_for(root), 3, 3)
    assert "img1.png" in one_line(exc)


# ------------------------------------------------------------------ split files


def test_write_split_counts_disjoint_and_covering(tmp_path):
    root = write_dataset(tmp_path / "ds", n=10, n_unlabeled=3)
    out = write_split(root, labeled=0.25, seed=1, val=2, test=0.2)
    assert len(out["val"]) == 2 and len(out["test"]) == 2
    assert len(out["labeled"]) == 2  # round(0.25 * 6 remaining)
    masked = {f"images/img{i}.png" for i in range(10)}
    parts = [set(out[k]) for k in ("labeled", "val", "test")]
    unl_masked = set(out["unlabeled"]) & masked
    assert sum(len(p) for p in parts) + len(unl_masked) == 10
    assert set().union(*parts, unl_masked) == masked
    assert {n for n in out["unlabeled"] if n.startswith("unlabeled/")} == {
        f"unlabeled/u{i}.jpg" for i in range(3)
    }
    for part, names in out.items():
        assert (root / "splits" / f"{part}.txt").read_text().split() == names


def test_write_split_is_seeded(tmp_path):
    root = write_dataset(tmp_path / "ds", n=12, n_unlabeled=0)
    a = write_split(root, labeled=3, seed=0, val=2, out_dir=tmp_path / "a")
    b = write_split(root, labeled=3, seed=0, val=2, out_dir=tmp_path / "b")
    c = write_split(root, labeled=3, seed=1, val=2, out_dir=tmp_path / "c")
    assert a == b and a != c


def test_write_split_refuses_to_overwrite(tmp_path):
    root = write_dataset(tmp_path / "ds")
    write_split(root, labeled=2, seed=0)
    with pytest.raises(DataError, match="exists") as exc:
        write_split(root, labeled=3, seed=0)
    assert "labeled.txt" in one_line(exc)
    out = write_split(root, labeled=3, seed=0, overwrite=True)
    assert (root / "splits" / "labeled.txt").read_text().split() == out["labeled"]
    assert len(out["labeled"]) == 3


def test_write_split_bad_amounts(tmp_path):
    root = write_dataset(tmp_path / "ds", n=4)
    with pytest.raises(DataError, match="no images to train"):
        write_split(root, labeled=1, seed=0, val=2, test=2)
    with pytest.raises(DataError, match="labeled"):
        write_split(root, labeled=9, seed=0)
    assert not (root / "splits").exists()


def test_split_files_drive_make_splits_only_when_named(tmp_path):
    root = write_dataset(tmp_path / "ds", n=8, n_unlabeled=2, classes="[a, b, c]\n")
    out = write_split(root, labeled=2, seed=0, val=1, test=2)
    # Not picked up implicitly: val/test stay empty without data.split_dir.
    implicit = make_splits(build_folder(cfg_for(root, labeled=2)), cfg_for(root, labeled=2), seed=0)
    assert implicit.val == [] and implicit.test == []
    cfg = cfg_for(root, split_dir="splits")
    splits = make_splits(build_folder(cfg), cfg, seed=123)
    assert [r.name for r in splits.labeled] == out["labeled"]
    assert [r.name for r in splits.unlabeled] == out["unlabeled"]
    assert [r.name for r in splits.val] == out["val"] and [r.name for r in splits.test] == out["test"]
    assert all(r.mask is None for r in splits.unlabeled)
    assert all(r.mask is not None for r in splits.val + splits.test)
    cfg.crop_size = 8
    lab = LabeledDataset(splits.labeled, cfg, splits.num_classes, splits.in_channels)[(0, 0)]
    assert lab["label"].shape == (8, 8)
    ev = EvalDataset(splits.test, cfg, splits.num_classes, splits.in_channels)[1]
    assert ev["name"] == out["test"][1] and ev["image"].shape == (3, 12, 10)


def test_mask_values_map_masks_when_read(tmp_path):
    """``data.mask_values`` maps saved values to class indices wherever a mask is read (the data
    check, training, evaluation); values it does not list are kept."""
    from semiseg.config import load_config
    from semiseg.data.io import read_record
    from semiseg.data.validate import check_data
    from semiseg.errors import ConfigError

    root = write_dataset(tmp_path / "ds", n=2, n_unlabeled=0, classes="[a, b, c]\n")
    mask = np.zeros((12, 10), np.uint8)
    mask[:, 5:] = 200
    mask[0, 0] = 255
    Image.fromarray(mask).save(root / "masks" / "img0.png")
    overrides = ["data.name=folder", f"data.root={root}", "data.labeled=1.0", "data.mask_values={200: 2}"]
    cfg = load_config(None, overrides).data
    splits = make_splits(build_folder(cfg), cfg, seed=0)
    record = next(r for r in splits.labeled if r.name == "images/img0.png")
    _, read = read_record(record, cfg, 3)
    assert read[0, 0] == 255 and (read[1:, :5] == 0).all() and (read[:, 5:] == 2).all()
    assert check_data(splits, cfg).class_pixels[2] >= 60  # 200 is no class index: fine once mapped
    cfg.mask_values = None
    with pytest.raises(DataError, match="mask value 200"):
        check_data(splits, cfg)
    cfg.mask_values = {"x": 1}
    with pytest.raises(ConfigError, match="data.mask_values: key 'x'"):
        check_data(splits, cfg)
