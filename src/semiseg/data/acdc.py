"""ACDC cardiac MRI in the SSL4MIS layout (DESIGN §4).

Layout under ``data.root`` (SSL4MIS ``data/ACDC``)::

    train_slices.list                        names <case>_frame<NN>_slice_<k>, one a line
    val.list, test.list                      names <case>_frame<NN> (val.list is optional)
    data/slices/<case>_frame<NN>_slice_<k>.h5   2-D training slices: 'image' float H×W, 'label' uint8
    data/<case>_frame<NN>.h5                 volumes for val/test: 'image' D×H×W, 'label' D×H×W

Classes: background, RV, MYO, LV; 1 channel. The ``"h5"`` reader reads ``'image'`` (slice
``record.index`` of the first axis for a volume, the whole array for a 2-D slice file) and
min-max normalises each slice to [0, 1] (SSL4MIS slices are already normalised floats, with no
fixed range); the mask comes from ``'label'`` of ``record.mask``.

Val/test volumes are expanded into per-slice records ``<case>_frame<NN>_slice_<k>`` (index k), so
metrics are 2-D per slice, not SSL4MIS's per-volume 3-D Dice.

Labeled subset (SSL4MIS protocol, patient-wise): the labeled slices are *all* slices of the first
K patients in sorted order, where K = ``data.labeled`` for an int (a number of **patients**, e.g.
3 or 7 as in the papers) or ceil(fraction × patients) for a float. The choice is fixed (no seed).
Any other selection, e.g. a random set of slices, is given through ``data.split_dir`` files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import DatasetSource, Record, register_dataset, require_root
from .io import register_reader

CLASS_NAMES = ["background", "RV", "MYO", "LV"]
PALETTE = [(0, 0, 0), (220, 40, 40), (40, 200, 40), (40, 80, 255)]
TRAIN_LIST = "train_slices.list"
VAL_LIST = "val.list"
TEST_LIST = "test.list"


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: split list not found")
    names = [Path(line.strip()).name.removesuffix(".h5") for line in path.read_text().splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def patient_of(name: str) -> str:
    """``patient001_frame01_slice_3`` -> ``patient001``."""
    for sep in ("_frame", "_slice"):
        if sep in name:
            return name.split(sep)[0]
    return name


def patients_for(labeled: float | int, num_patients: int) -> int:
    """Number of labeled patients: the count itself, or ceil(fraction × patients) for a float."""
    if isinstance(labeled, float):
        count = num_patients if labeled >= 1.0 else math.ceil(labeled * num_patients - 1e-9)
    else:
        count = int(labeled)
    if not 1 <= count <= num_patients:
        raise DataError(
            f"data.labeled={labeled}: gives {count} labeled patients but the ACDC pool has {num_patients}"
        )
    return count


def _h5_depth(path: Path) -> int | None:
    """Slices of a volume file (first axis of 'image'), or None for a 2-D slice file."""
    import h5py

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            shape = f["image"].shape
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: cannot read dataset 'image' ({type(exc).__name__}: {exc})") from None
    if len(shape) == 2:
        return None
    if len(shape) != 3:
        raise DataError(f"{path}: 'image' must be H×W or D×H×W, got shape {shape}")
    return int(shape[0])


def _volume_records(root: Path, names: list[str]) -> list[Record]:
    records = []
    for name in names:
        path = root / "data" / f"{name}.h5"
        depth = _h5_depth(path)
        if depth is None:
            records.append(Record(name=name, image=str(path), mask=str(path), reader="h5"))
            continue
        records += [
            Record(name=f"{name}_slice_{k}", image=str(path), mask=str(path), reader="h5", index=k)
            for k in range(depth)
        ]
    return records


def _read_h5_array(path: str, key: str, index: int | None) -> np.ndarray:
    import h5py

    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            data = f[key]
            if index is None:
                arr = data[()]
            elif data.ndim == 3 and 0 <= index < data.shape[0]:
                arr = data[index]
            else:
                raise DataError(f"{path}: slice index {index} outside '{key}' of shape {data.shape}")
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: cannot read dataset '{key}' ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DataError(f"{path}: '{key}' slice must be 2-D, got shape {arr.shape}")
    return arr


@register_reader("h5")
def read_h5_record(record: Record, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """'image' (slice ``record.index`` or the 2-D array) min-max scaled to [0, 1] as H×W×1; 'label' mask."""
    image = _read_h5_array(record.image, "image", record.index).astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    mask = None
    if record.mask:
        label = _read_h5_array(record.mask, "label", record.index)
        mask = np.rint(label).clip(0, 255).astype(np.uint8)
    return image[..., None], mask


@register_dataset("acdc")
def build_acdc(cfg: DataConfig) -> DatasetSource:
    """SSL4MIS ACDC: training slices as the pool, val/test volumes expanded into slices."""
    root = require_root(cfg, f"{TRAIN_LIST}, {TEST_LIST} and data/ (SSL4MIS ACDC layout)")
    pool = []
    for name in _read_list(root / TRAIN_LIST):
        path = root / "data" / "slices" / f"{name}.h5"
        if not path.is_file():
            raise DataError(f"{path}: slice listed in {TRAIN_LIST} not found")
        pool.append(Record(name=name, image=str(path), mask=str(path), reader="h5"))
    val_list = root / VAL_LIST
    val = _volume_records(root, _read_list(val_list)) if val_list.is_file() else []
    test = _volume_records(root, _read_list(root / TEST_LIST))
    patients = sorted({patient_of(r.name) for r in pool})

    def first_patients(labeled: float | int) -> list[str]:
        chosen = set(patients[: patients_for(labeled, len(patients))])
        return [r.name for r in pool if patient_of(r.name) in chosen]

    return DatasetSource(
        train_pool=pool,
        val=val,
        test=test,
        class_names=list(CLASS_NAMES),
        in_channels=1,
        palette=list(PALETTE),
        fixed_labeled=first_patients,
    )
