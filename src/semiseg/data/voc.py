"""PASCAL VOC 2012 (+ SBD augmented masks, as UniMatch uses it).

Layout under ``data.root`` (``VOCdevkit/VOC2012``, with the usual SBD additions)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png         palette PNG, class index per pixel, 255 = boundary (ignore)
    SegmentationClassAug/<id>.png      optional: the 10,582 SBD-augmented masks
    ImageSets/Segmentation/train.txt   1,464 finely annotated training ids
    ImageSets/Segmentation/val.txt     1,449 validation ids
    ImageSets/Segmentation/train_aug.txt  optional: the 10,582 augmented training ids

Training pool: ``train.txt`` when present (UniMatch's "classic" protocol: labeled images drawn
from the 1,464); the ``train_aug.txt`` ids not in it (and not in val) are extra unlabeled images.
Without ``train.txt`` the pool is ``train_aug.txt`` ("blended" protocol). A training mask is read
from ``SegmentationClassAug`` when that file exists, else ``SegmentationClass``. Lines may be bare
ids or ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png`` pairs.

Test = the val list (VOC convention: the test server's labels are not public); masks from
``SegmentationClass`` (falling back to ``SegmentationClassAug``). No separate val set is made.
21 classes with the standard names and the VOC colour map; 255 is kept as ignore.
"""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import DataError
from .base import DatasetSource, Record, default_palette, register_dataset, require_root

CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
SPLIT_DIR = Path("ImageSets") / "Segmentation"


def read_ids(path: Path) -> list[str]:
    """Ids of a VOC/SBD list: the first token of each line, reduced to its file stem."""
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    ids = []
    for line in path.read_text().splitlines():
        token = line.split()[0] if line.strip() else ""
        if token and not token.startswith("#"):
            ids.append(Path(token).stem)
    return ids


def _mask_path(root: Path, ident: str, prefer_aug: bool) -> Path:
    fine, aug = root / "SegmentationClass" / f"{ident}.png", root / "SegmentationClassAug" / f"{ident}.png"
    for path in (aug, fine) if prefer_aug else (fine, aug):
        if path.is_file():
            return path
    raise DataError(f"{fine}: mask not found (nor in SegmentationClassAug/)")


def _image_path(root: Path, ident: str) -> Path:
    path = root / "JPEGImages" / f"{ident}.jpg"
    if not path.is_file():
        raise DataError(f"{path}: image not found")
    return path


@register_dataset("voc")
def build_voc(cfg: DataConfig) -> DatasetSource:
    """VOC 2012 records: train pool (train.txt or train_aug.txt), extra unlabeled, test = val."""
    root = require_root(cfg, "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/")
    train_file, aug_file = root / SPLIT_DIR / "train.txt", root / SPLIT_DIR / "train_aug.txt"
    if not train_file.is_file() and not aug_file.is_file():
        raise DataError(f"{train_file}: split list not found (nor {aug_file.name})")
    val_ids = read_ids(root / SPLIT_DIR / "val.txt")
    pool_ids = read_ids(train_file) if train_file.is_file() else read_ids(aug_file)
    extra_ids = []
    if train_file.is_file() and aug_file.is_file():
        taken = set(pool_ids) | set(val_ids)
        extra_ids = [i for i in read_ids(aug_file) if i not in taken]
    pool = [
        Record(name=i, image=str(_image_path(root, i)), mask=str(_mask_path(root, i, prefer_aug=True)))
        for i in pool_ids
    ]
    extra = [Record(name=i, image=str(_image_path(root, i))) for i in extra_ids]
    test = [
        Record(name=i, image=str(_image_path(root, i)), mask=str(_mask_path(root, i, prefer_aug=False)))
        for i in val_ids
    ]
    return DatasetSource(
        train_pool=pool,
        test=test,
        extra_unlabeled=extra,
        class_names=list(CLASS_NAMES),
        in_channels=3,
        palette=default_palette(len(CLASS_NAMES)),
    )
