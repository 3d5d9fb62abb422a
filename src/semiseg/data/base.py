"""The data contract every dataset follows.

A dataset *builder* (one small module per format, registered by name in :data:`DATASETS`,
:data:`semiseg.registry.DATASETS`: built-in builders are imported on first use) turns a
:class:`~semiseg.config.DataConfig` into a :class:`DatasetSource`: lists of :class:`Record` (cheap,
picklable references to an image and an optional mask) for the training pool, extra unlabeled
images, validation and test, plus class names and the channel count. :func:`make_splits` then picks
the labeled subset (fraction or count, seeded) or reads split files, so no builder repeats that.

Pixels are read lazily by :func:`semiseg.data.io.read_record` through the reader named by
``Record.reader``; images come back as float32 ``H×W×C`` in [0, 1], masks as uint8 ``H×W`` with
255 = ignore.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..config import DataConfig
from ..errors import DataError
from ..registry import DATASETS
from ..types import IGNORE_INDEX  # noqa: F401  (re-exported: its home before semiseg.types)


@dataclass(frozen=True)
class Record:
    """Reference to one image (and its mask, if labeled).

    ``reader`` names a function in :data:`semiseg.data.io.READERS` (``"file"`` for ordinary image
    files, ``"nifti"`` / ``"h5"`` for slices of volumes, ``"synthetic"`` for generated images);
    ``index`` is the slice index or generator seed where the reader needs one.
    """

    name: str
    image: str
    mask: str | None = None
    reader: str = "file"
    index: int | None = None
    label_map: str | None = None  # name of a mask value mapping (e.g. "cityscapes_trainid")

    def unlabeled(self) -> Record:
        return replace(self, mask=None)


@dataclass
class DatasetSource:
    """What a builder returns: the records of each part and the dataset's metadata."""

    train_pool: list[Record]  # labeled candidates (must have masks); split into labeled/unlabeled
    test: list[Record]
    class_names: list[str]
    in_channels: int
    val: list[Record] = field(default_factory=list)
    extra_unlabeled: list[Record] = field(default_factory=list)  # images that never had masks
    palette: list[tuple[int, int, int]] | None = None
    # The paper-style labeled subset for a fraction, when the dataset defines one (else None).
    fixed_labeled: Callable[[float | int], list[str]] | None = None
    # How a fraction becomes a count when make_splits draws the subset: "round" (default) or
    # "floor" (at least 1), whichever reproduces the dataset's papers (CHASE_DB1: 23/8 -> 2).
    labeled_rounding: Literal["round", "floor"] = "round"
    # What one evaluation case is (``eval.unit: auto``): "image", or "volume" when val/test records
    # are the slices of volume files that the field scores per volume in 3-D (ACDC).
    eval_unit: Literal["image", "volume"] = "image"


@dataclass
class DataSplits:
    """The four parts a run uses, after the labeled subset has been chosen."""

    labeled: list[Record]
    unlabeled: list[Record]
    val: list[Record]
    test: list[Record]
    class_names: list[str]
    in_channels: int
    palette: list[tuple[int, int, int]]
    # The masked records of unlabeled images whose masks are hidden (their masks are checked for
    # size and completeness, never read for training), and notes for the user (split overlaps).
    hidden: list[Record] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    eval_unit: Literal["image", "volume"] = "image"  # the dataset's own evaluation unit

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DatasetBuilder = Callable[[DataConfig], DatasetSource]


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    """Register a dataset builder under ``data.name: <name>`` (a name registered twice is an error)."""
    return DATASETS.register(name)


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """PASCAL-VOC style colour map (background black), extended to any number of classes."""
    palette = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append((r, g, b))
    return palette


def require_root(cfg: DataConfig, layout: str) -> Path:
    """``cfg.root`` as a Path, or a one-line DataError naming ``data.root`` / the missing folder.

    ``layout`` is a short hint of what the folder should hold (shown when ``data.root`` is unset).
    """
    if not cfg.root:
        raise DataError(f"data.root: required for dataset {cfg.name!r} (a folder with {layout})")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data.root folder not found (dataset {cfg.name!r})")
    return root


def labeled_count(
    pool_size: int,
    labeled: float | int,
    key: str = "data.labeled",
    rounding: Literal["round", "floor"] = "round",
) -> int:
    """Number of labeled images for a fraction (float) or count (int) of a pool.

    ``rounding="floor"`` truncates with a minimum of 1 (the CHASE_DB1 papers: 23 × 1/8 -> 2,
    23 × 1/4 -> 5); ``"round"`` rounds to nearest (MedSeg: 70 × 1/8 -> 9, 70 × 1/4 -> 18).
    """
    if isinstance(labeled, float):
        if labeled >= 1.0:
            count = pool_size
        elif rounding == "floor":
            count = max(1, math.floor(pool_size * labeled + 1e-9))
        else:
            count = int(round(pool_size * labeled))
    else:
        count = int(labeled)
    if count < 1:
        raise DataError(f"{key}={labeled}: gives zero labeled images out of {pool_size}")
    if count > pool_size:
        raise DataError(f"{key}={labeled}: asks for {count} labeled images but the pool has {pool_size}")
    return count


def read_split_names(path: Path) -> dict[str, int]:
    """The names a split file lists, each with its line number, in file order: one name per line
    (``#`` comments, blank lines and a leading ``./`` ignored). A line that is not UTF-8 or a name
    listed twice is a one-line DataError naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read split file ({exc.strerror or exc})") from None
    seen: dict[str, int] = {}
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number}: line is not valid UTF-8 text") from None
        if not text or text.startswith("#"):
            continue
        while text.startswith("./"):
            text = text[2:]
        if "\x00" in text:
            raise DataError(f"{path}:{number}: line holds a NUL character")
        if text in seen:
            raise DataError(f"{path}:{number}: {text!r} is listed twice (also on line {seen[text]})")
        seen[text] = number
    return seen


def read_split_file(path: Path, by_name: dict[str, Record], key: str) -> list[Record]:
    """Records named by a split file (read as :func:`read_split_names` does); a name that is not in
    the dataset is a one-line DataError naming the file and line."""
    lines = read_split_names(path)
    missing = [n for n in lines if n not in by_name]
    if missing:
        raise DataError(
            f"{path}:{lines[missing[0]]}: {len(missing)} name(s) not in the dataset, first: {missing[0]!r}"
        )
    return [by_name[n] for n in lines]


def _split_overlaps(parts: dict[str, list[Record]], split_dir: Path) -> list[str]:
    """Error for an image both trained on with its label and evaluated (labeled ∩ val/test); the
    other overlaps are returned as warnings."""
    names = {part: {r.name for r in records} for part, records in parts.items()}
    for held in ("val", "test"):
        both = sorted(names["labeled"] & names[held])
        if both:
            raise DataError(
                f"{split_dir / 'labeled.txt'}: {len(both)} labeled image(s) also in {held}.txt, "
                f"first: {both[0]!r} (evaluation would see training labels)"
            )
    notes = []
    for a, b in (("labeled", "unlabeled"), ("unlabeled", "val"), ("unlabeled", "test"), ("val", "test")):
        both = sorted(names[a] & names[b])
        if both:
            notes.append(f"{split_dir}: {len(both)} image(s) in both {a}.txt and {b}.txt, first: {both[0]!r}")
    return notes


def make_splits(source: DatasetSource, cfg: DataConfig, seed: int) -> DataSplits:
    """Choose the labeled subset (or read ``cfg.split_dir``) and return the run's four parts."""
    num_classes = cfg.num_classes or len(source.class_names)
    class_names = cfg.class_names or source.class_names
    if len(class_names) != num_classes:
        class_names = [*class_names, *(f"class_{i}" for i in range(len(class_names), num_classes))][
            :num_classes
        ]
    palette = source.palette or default_palette(num_classes)
    if len(palette) < num_classes:
        palette = default_palette(num_classes)

    pool = list(source.train_pool)
    if cfg.split_dir:
        split_dir = Path(cfg.split_dir)
        if not split_dir.is_absolute() and cfg.root:
            split_dir = Path(cfg.root) / split_dir
        everything = pool + source.extra_unlabeled + source.val + source.test
        by_name = {r.name: r for r in everything}
        labeled = read_split_file(split_dir / "labeled.txt", by_name, "data.split_dir")
        unl_file = split_dir / "unlabeled.txt"
        unlabeled = read_split_file(unl_file, by_name, "data.split_dir") if unl_file.is_file() else []
        val_file, test_file = split_dir / "val.txt", split_dir / "test.txt"
        val = read_split_file(val_file, by_name, "data.split_dir") if val_file.is_file() else source.val
        test = read_split_file(test_file, by_name, "data.split_dir") if test_file.is_file() else source.test
        parts = {"labeled": labeled, "unlabeled": unlabeled, "val": val, "test": test}
        notes = _split_overlaps(parts, split_dir)
        hidden = [r for r in unlabeled if r.mask is not None]
        unlabeled = [r.unlabeled() for r in unlabeled]
    else:
        if not pool:
            raise DataError(f"data.name={cfg.name}: the training pool is empty (no labeled images found)")
        chosen_names = source.fixed_labeled(cfg.labeled) if source.fixed_labeled else None
        if chosen_names is None:
            count = labeled_count(len(pool), cfg.labeled, rounding=source.labeled_rounding)
            rng = random.Random(seed)
            order = sorted(pool, key=lambda r: r.name)
            rng.shuffle(order)
            chosen_names = [r.name for r in order[:count]]
        chosen = set(chosen_names)
        labeled = [r for r in pool if r.name in chosen]
        hidden = [r for r in pool if r.name not in chosen and r.mask is not None]
        unlabeled = [r.unlabeled() for r in pool if r.name not in chosen] + [
            r.unlabeled() for r in source.extra_unlabeled
        ]
        val, test = source.val, source.test
        notes = []
    if not labeled:
        if cfg.split_dir:
            raise DataError(f"{split_dir / 'labeled.txt'}: lists no images: nothing to train on")
        raise DataError("labeled split is empty: nothing to train on (check data.labeled / data.split_dir)")
    for part, records in (("labeled", labeled), ("val", val), ("test", test)):
        missing_mask = [r for r in records if r.mask is None]
        if missing_mask:
            where = f"{Path(split_dir) / f'{part}.txt'}: " if cfg.split_dir else ""
            raise DataError(
                f"{where}{missing_mask[0].image}: {part} image has no mask (labeled, val and test need masks)"
            )
    return DataSplits(
        labeled=labeled,
        unlabeled=unlabeled,
        val=val,
        test=test,
        class_names=list(class_names),
        in_channels=source.in_channels,
        palette=[tuple(c) for c in palette],
        hidden=hidden,
        warnings=notes,
        eval_unit=source.eval_unit,
    )


def build_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Build the dataset named by ``cfg.name`` and choose its splits."""
    if cfg.name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"data.name: unknown dataset {cfg.name!r} (known: {known})")
    source = DATASETS[cfg.name](cfg)
    split_seed = cfg.split_seed if cfg.split_seed is not None else seed
    return make_splits(source, cfg, split_seed)
