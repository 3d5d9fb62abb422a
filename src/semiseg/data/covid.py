"""COVID-19 CT lung infection (MedSeg), in its two layouts (source, terms: docs/datasets.md).

``covid_infnet`` — the Inf-Net "COVID-SemiSeg" multi-class derivative (what ``shared/data`` holds)::

    MultiClassInfection-Train/Imgs/<k>.jpg, GT/<k>.png   50 slices: the training pool
    MultiClassInfection-Test/Imgs/<k>.jpg,  GT/<k>.png   48 slices: the test set

  ``<k>`` is the 0-based MedSeg slice index; records are sorted numerically by it and named by it.
  Images are 8-bit greyscale JPEG crops of varying size (1 channel); masks are palette PNGs with
  0 = background, 1 = ground-glass opacity, 2 = consolidation (pleural effusion does not occur).

``covid_medseg`` — the original MedSeg files (not staged here)::

    tr_im.nii.gz    512 × 512 × 100 float CT slices in Hounsfield units
    tr_mask.nii.gz  same shape, 0 = background, 1 = ground glass, 2 = consolidation, 3 = pleural effusion

  The papers' split is 70 / 10 / 20 slices (train / val / test). The papers do not publish which
  slices, so we take them **in slice-index order**: slices 0..69 train, 70..79 val, 80..99 test
  (for a volume of depth n: floor(0.7 n), floor(0.1 n), the rest). Fractions round to nearest as
  in the papers' 1/8 and 1/4 settings (1/8 -> 9, 1/4 -> 18 of 70). ``val_im.nii.gz`` (10 slices
  without masks) is not used.

  The ``"nifti"`` reader loads slice ``record.index`` along the last axis (the whole volume is read
  once and cached per process), clips to ``data.hu_window`` = [lo, hi] HU and scales to [0, 1].
  Orientation: each slice is turned by ``np.rot90`` (90° counter-clockwise), the rotation usually
  applied to display this volume's slices upright like the Inf-Net JPEGs; image and mask are turned
  alike, so the pairing never depends on it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import DatasetSource, Record, register_dataset, require_root
from .io import register_reader

CLASS_NAMES_INFNET = ["background", "ground_glass", "consolidation"]
CLASS_NAMES_MEDSEG = ["background", "ground_glass", "consolidation", "pleural_effusion"]
PALETTE = [(0, 0, 0), (255, 200, 0), (220, 40, 40), (40, 120, 255)]
INFNET_TRAIN = "MultiClassInfection-Train"
INFNET_TEST = "MultiClassInfection-Test"
MEDSEG_IMAGE = "tr_im.nii.gz"
MEDSEG_MASK = "tr_mask.nii.gz"
MEDSEG_SPLIT = (0.7, 0.1)  # train, val fractions of the slices in index order; test = the rest

# --------------------------------------------------------------------------------------------
# Inf-Net derivative
# --------------------------------------------------------------------------------------------


def _infnet_part(folder: Path) -> list[Record]:
    """Records of one Inf-Net part folder (``Imgs/<k>.jpg`` + ``GT/<k>.png``), sorted by ``k``."""
    imgs = folder / "Imgs"
    if not imgs.is_dir():
        raise DataError(f"{imgs}: folder not found (expected the Inf-Net layout {folder.name}/Imgs, /GT)")
    paths = [p for p in imgs.iterdir() if p.suffix.lower() == ".jpg" and p.is_file()]
    bad = [p for p in paths if not p.stem.isdigit()]
    if bad:
        raise DataError(f"{bad[0]}: Inf-Net image names must be slice numbers (<k>.jpg)")
    records = []
    for path in sorted(paths, key=lambda p: int(p.stem)):
        mask = folder / "GT" / f"{path.stem}.png"
        if not mask.is_file():
            raise DataError(f"{mask}: mask not found for {path.name}")
        records.append(Record(name=path.stem, image=str(path), mask=str(mask)))
    if not records:
        raise DataError(f"{imgs}: no <k>.jpg images")
    return records


@register_dataset("covid_infnet")
def build_covid_infnet(cfg: DataConfig) -> DatasetSource:
    """Inf-Net derivative: the Train folder is the training pool (50), the Test folder the test set (48)."""
    root = require_root(cfg, f"{INFNET_TRAIN}/ and {INFNET_TEST}/ (Imgs/<k>.jpg, GT/<k>.png)")
    return DatasetSource(
        train_pool=_infnet_part(root / INFNET_TRAIN),
        test=_infnet_part(root / INFNET_TEST),
        class_names=list(CLASS_NAMES_INFNET),
        in_channels=1,
        palette=PALETTE[: len(CLASS_NAMES_INFNET)],
    )


# --------------------------------------------------------------------------------------------
# Original MedSeg NIfTI
# --------------------------------------------------------------------------------------------

_VOLUMES: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_VOLUME_CACHE_SIZE = 2  # the image and the mask volume


def _nifti_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises several types for bad files
        raise DataError(f"{path}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from None


def load_volume(path: str, dtype: str = "float32") -> np.ndarray:
    """Whole NIfTI volume as a 3-D array (trailing singleton axes dropped), cached per process."""
    key = (path, dtype)
    hit = _VOLUMES.get(key)
    if hit is not None:
        _VOLUMES.move_to_end(key)
        return hit
    import nibabel as nib

    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel / zlib raise several types for bad files
        raise DataError(f"{path}: cannot read NIfTI volume ({type(exc).__name__}: {exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume (H × W × slices), got shape {data.shape}")
    if dtype == "uint8":
        data = np.rint(data).clip(0, 255).astype(np.uint8)
    data.setflags(write=False)
    _VOLUMES[key] = data
    while len(_VOLUMES) > _VOLUME_CACHE_SIZE:
        _VOLUMES.popitem(last=False)
    return data


def hu_to_unit(slice_hu: np.ndarray, window: list[float]) -> np.ndarray:
    """Clip Hounsfield units to ``window`` = [lo, hi] and scale linearly to [0, 1]."""
    if len(window) != 2 or not window[0] < window[1]:
        raise DataError(f"data.hu_window: expected [low, high] with low < high, got {window}")
    lo, hi = float(window[0]), float(window[1])
    return ((np.clip(slice_hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _slice(volume: np.ndarray, index: int | None, path: str) -> np.ndarray:
    if index is None or not 0 <= index < volume.shape[-1]:
        raise DataError(f"{path}: slice index {index} outside 0..{volume.shape[-1] - 1}")
    return np.rot90(volume[..., index])  # upright display orientation (module docstring)


@register_reader("nifti")
def read_nifti_record(record: Record, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Slice ``record.index`` (last axis) of a NIfTI volume: HU-windowed image H×W×1, uint8 mask."""
    image = hu_to_unit(_slice(load_volume(record.image), record.index, record.image), cfg.hu_window)
    mask = None
    if record.mask:
        mask = np.ascontiguousarray(_slice(load_volume(record.mask, "uint8"), record.index, record.mask))
    return np.ascontiguousarray(image[..., None]), mask


@register_dataset("covid_medseg")
def build_covid_medseg(cfg: DataConfig) -> DatasetSource:
    """MedSeg ``tr_im.nii.gz`` / ``tr_mask.nii.gz``: 70 / 10 / 20 % of the slices in index order."""
    root = require_root(cfg, f"{MEDSEG_IMAGE} and {MEDSEG_MASK}")
    image, mask = root / MEDSEG_IMAGE, root / MEDSEG_MASK
    shape, mask_shape = _nifti_shape(image), _nifti_shape(mask)
    if mask_shape != shape:
        raise DataError(f"{mask}: mask shape {mask_shape} differs from image {image.name} shape {shape}")
    depth = shape[2] if len(shape) >= 3 else 0
    if depth < 3:
        raise DataError(f"{image}: expected an H × W × slices volume with >= 3 slices, got shape {shape}")
    n_train = math.floor(MEDSEG_SPLIT[0] * depth + 1e-9)
    n_val = math.floor(MEDSEG_SPLIT[1] * depth + 1e-9)
    records = [
        Record(name=f"tr_im_{k:03d}", image=str(image), mask=str(mask), reader="nifti", index=k)
        for k in range(depth)
    ]
    return DatasetSource(
        train_pool=records[:n_train],
        val=records[n_train : n_train + n_val],
        test=records[n_train + n_val :],
        class_names=list(CLASS_NAMES_MEDSEG),
        in_channels=1,
        palette=list(PALETTE),
    )
