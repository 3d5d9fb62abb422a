"""ACDC cardiac cine-MRI in the SSL4MIS layout: the semi-supervised medical benchmark.

Layout under ``data.root`` (SSL4MIS ``data/ACDC``)::

    train_slices.list                        names <case>_frame<NN>_slice_<k>, one a line
    val.list, test.list                      names <case>_frame<NN> (val.list is optional)
    data/slices/<case>_frame<NN>_slice_<k>.h5   2-D training slices: 'image' float H×W, 'label' uint8
    data/<case>_frame<NN>.h5                 volumes for val/test: 'image' D×H×W, 'label' D×H×W

Classes: background, RV, MYO, LV; 1 channel. The ``"h5"`` reader reads ``'image'`` (slice
``record.index`` of the first axis for a volume, the whole array for a 2-D slice file). SSL4MIS
stores images already scaled to [0, 1] per volume, and they are used **as stored**; a slice with
values outside [0, 1] (data not preprocessed by SSL4MIS) is min-max scaled to [0, 1]. The mask
comes from ``'label'`` of ``record.mask``. Slices have their original in-plane size (16 sizes, e.g.
256×216): the published protocol resizes every slice to 256×256 (``data.size: [256, 256]``).

**Evaluation by volume** (the dataset's ``eval_unit``): val/test volumes are expanded into slice
records ``<case>_frame<NN>_slice_<k>`` (index k), and :func:`semiseg.evaluate.evaluate` puts them back
together: each slice predicted at the training input size, resized back, Dice and HD95 per class
on the whole 3-D volume, averaged over volumes (SSL4MIS ``test_2D_fully.py``).

**Labeled set, the published protocol.** ``data.labeled: K`` (an int, a number of **cases**, i.e.
patients) labels every slice of the **first K patients of ``train_slices.list`` in file order**,
which is what SSL4MIS's ``patients_to_slices`` (3 → 68 lines, 7 → 136) and the official UniMatch and
BCP scripts take: patients 099, 038, 050 for 3 cases, plus 100, 058, 021, 049 for 7. (The list is
not in patient order; the first K patients in sorted order would be a different set.) A float
fraction takes the first ``ceil(fraction × patients)`` patients the same way. The choice has no
seed. Patient-wise random draws, for labeled-set variance, are written as split files by
:func:`write_patient_split` (``semiseg data split --dataset acdc``) and used with ``data.split_dir``.
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


def patients_in_order(records: list[Record]) -> list[str]:
    """The patients of ``records`` in order of first appearance (``train_slices.list`` file order)."""
    return list(dict.fromkeys(patient_of(r.name) for r in records))


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


def h5_depth(path: Path) -> int | None:
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
        depth = h5_depth(path)
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


def unit_range(image: np.ndarray) -> np.ndarray:
    """A slice as float32, as stored when it lies in [0, 1] (SSL4MIS), else min-max scaled to [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image


def read_h5_slices(path: Path) -> tuple[list[np.ndarray], bool]:
    """Every slice of an ``.h5`` file's ``'image'`` as ``H×W×1``, scaled per slice as the ``"h5"``
    reader scales it (:func:`unit_range`), read in one pass; and whether the file is one 2-D slice."""
    import h5py

    depth = h5_depth(path)  # checks the file and the shape of 'image'
    try:
        with h5py.File(path, "r") as f:
            data = np.asarray(f["image"][()])
    except (OSError, KeyError) as exc:
        raise DataError(f"{path}: cannot read dataset 'image' ({type(exc).__name__}: {exc})") from None
    stack = data[None] if depth is None else data
    return [unit_range(image)[..., None] for image in stack], depth is None


@register_reader("h5")
def read_h5_record(record: Record, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """'image' (slice ``record.index`` or the 2-D array) as H×W×1, as stored when it lies in [0, 1]
    (SSL4MIS), else min-max scaled to [0, 1]; 'label' mask."""
    image = unit_range(_read_h5_array(record.image, "image", record.index))
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
    patients = patients_in_order(pool)

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
        eval_unit="volume",
    )


def write_patient_split(
    root: str | Path, cases: int, seed: int, out: str | Path, overwrite: bool = False
) -> dict[str, int]:
    """Draw ``cases`` training patients at random (``random.Random(seed)`` over the patients in
    sorted order) and write ``labeled.txt`` (all their slices) and ``unlabeled.txt`` (every other
    training slice) to ``out``, for ``data.split_dir``; val and test stay the dataset's volumes.

    Refuses an ``out`` folder that already holds either file unless ``overwrite`` (nothing is then
    written). Returns the number of slices written per file.
    """
    import random

    from ..checkpoint import atomic_write_text

    root, out = Path(root), Path(out)
    names = _read_list(root / TRAIN_LIST)
    patients = sorted(dict.fromkeys(patient_of(n) for n in names))
    if not 1 <= cases <= len(patients):
        raise DataError(f"--labeled {cases}: ACDC's training list has {len(patients)} patients")
    for part in ("labeled.txt", "unlabeled.txt"):
        if (out / part).exists() and not overwrite:
            raise DataError(f"{out / part}: exists; choose another --out or --overwrite (nothing written)")
    chosen = set(random.Random(seed).sample(patients, cases))
    labeled = [n for n in names if patient_of(n) in chosen]
    unlabeled = [n for n in names if patient_of(n) not in chosen]
    out.mkdir(parents=True, exist_ok=True)
    header = f"# ACDC patient-wise draw: {cases} case(s) {sorted(chosen)}, seed {seed}\n"
    atomic_write_text(header + "\n".join(labeled) + "\n", out / "labeled.txt")
    atomic_write_text("\n".join(unlabeled) + "\n", out / "unlabeled.txt")
    return {"labeled": len(labeled), "unlabeled": len(unlabeled)}
