"""CHASE_DB1 retinal vessels (source, terms and layout: docs/datasets.md).

Layout under ``data.root`` (the original flat folder, file names unchanged)::

    Image_XX{L,R}.jpg                    28 RGB fundus photographs, 999 × 960, XX = 01..14
    Image_XX{L,R}{data.mask_suffix}.png  1-bit masks, 0 = background, 1 = vessel (~6.9 % vessel)

``data.mask_suffix`` picks the observer: ``_1stHO`` (the usual ground truth, default) or ``_2ndHO``.

Split (the papers'): the images in sorted name order, the first 23 (01L..12L) are the training pool
and the last 5 (12R..14R) the test set; there is no validation set. The labeled subset of a fraction
is drawn (seeded) from the 23 with the count *floored* as in the papers: 1/8 -> 2, 1/4 -> 5.
"""

from __future__ import annotations

import re

from ..config import DataConfig
from ..errors import DataError
from .base import DatasetSource, Record, register_dataset, require_root
from .io import list_images

CLASS_NAMES = ["background", "vessel"]
PALETTE = [(0, 0, 0), (255, 255, 255)]
NUM_IMAGES = 28
NUM_TRAIN = 23  # the papers' split: first 23 in sorted order train, last 5 test
IMAGE_PATTERN = re.compile(r"Image_\d{2}[LR]")


@register_dataset("chase_db1")
def build_chase(cfg: DataConfig) -> DatasetSource:
    """Records of CHASE_DB1 under ``cfg.root``: 23 train-pool images, 5 test images."""
    root = require_root(cfg, "Image_XX{L,R}.jpg and Image_XX{L,R}" + f"{cfg.mask_suffix}.png")
    images = [p for p in list_images(root) if p.suffix.lower() == ".jpg" and IMAGE_PATTERN.fullmatch(p.stem)]
    if len(images) != NUM_IMAGES:
        raise DataError(
            f"{root}: expected {NUM_IMAGES} CHASE_DB1 images Image_XX{{L,R}}.jpg, found {len(images)}"
        )
    records = []
    for path in images:  # list_images sorts by name: Image_01L, Image_01R, ..., Image_14R
        mask = root / f"{path.stem}{cfg.mask_suffix}.png"
        if not mask.is_file():
            raise DataError(f"{mask}: mask not found (data.mask_suffix={cfg.mask_suffix!r})")
        records.append(Record(name=path.stem, image=str(path), mask=str(mask)))
    return DatasetSource(
        train_pool=records[:NUM_TRAIN],
        test=records[NUM_TRAIN:],
        class_names=list(CLASS_NAMES),
        in_channels=3,
        palette=list(PALETTE),
        labeled_rounding="floor",
    )
