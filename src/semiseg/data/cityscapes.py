"""Cityscapes fine annotations, 19 training classes (docs/datasets.md).

Layout under ``data.root``::

    leftImg8bit/{train,val}/<city>/<x>_leftImg8bit.png
    gtFine/{train,val}/<city>/<x>_gtFine_labelTrainIds.png   used as is when present, else
    gtFine/{train,val}/<city>/<x>_gtFine_labelIds.png        mapped by "cityscapes_trainid"

The label map sends the 19 evaluated labelIds to trainIds 0..18 and every other id to 255
(ignore), as the official ``cityscapesscripts`` ``labels.py`` does. Training pool: the train split
(2,975 images); test = the val split (500 images; the test split's labels are not public). No
separate val set is made. Records are named ``<x>`` (e.g. ``aachen_000000_000019``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import IGNORE_INDEX, DatasetSource, Record, register_dataset, require_root
from .io import register_label_map

CLASS_NAMES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip
# labelId of each trainId 0..18 (cityscapesscripts labels.py)
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]

_TRAIN_ID_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_TRAIN_ID_LUT[LABEL_IDS] = np.arange(len(LABEL_IDS), dtype=np.uint8)


@register_label_map("cityscapes_trainid")
def labelids_to_trainids(mask: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds -> trainIds (19 classes, everything else 255)."""
    return _TRAIN_ID_LUT[mask]


def _split_records(root: Path, split: str) -> list[Record]:
    folder = root / "leftImg8bit" / split
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected leftImg8bit/{split}/<city>/*_leftImg8bit.png)")
    records = []
    for image in sorted(folder.glob("*/*_leftImg8bit.png")):
        stem = image.name.removesuffix("_leftImg8bit.png")
        gt = root / "gtFine" / split / image.parent.name
        train_ids, label_ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            records.append(Record(name=stem, image=str(image), mask=str(train_ids)))
        elif label_ids.is_file():
            records.append(
                Record(name=stem, image=str(image), mask=str(label_ids), label_map="cityscapes_trainid")
            )
        else:
            raise DataError(f"{label_ids}: mask not found (nor {train_ids.name})")
    if not records:
        raise DataError(f"{folder}: no <city>/*_leftImg8bit.png images")
    return records


@register_dataset("cityscapes")
def build_cityscapes(cfg: DataConfig) -> DatasetSource:
    """Cityscapes records: the train split as the pool, the val split as the test set."""
    root = require_root(cfg, "leftImg8bit/{train,val}/ and gtFine/{train,val}/")
    return DatasetSource(
        train_pool=_split_records(root, "train"),
        test=_split_records(root, "val"),
        class_names=list(CLASS_NAMES),
        in_channels=3,
        palette=list(PALETTE),
    )
