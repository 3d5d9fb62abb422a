"""The custom folder format users start with (docs/own-data.md).

Layout under ``data.root``::

    images/<stem>.<png|jpg|...>     every image here must have a mask
    masks/<stem>.png                class index per pixel, 255 = ignore
    unlabeled/<any>.<png|jpg|...>   optional: images without masks
    classes.yaml                    optional: [names...] or {names: [...], palette: [[r, g, b], ...]}

Record names are the image paths relative to the data root, in POSIX form (``images/abc.png``,
``unlabeled/xyz.jpg``): unambiguous across the two image folders, and exactly what the split files
list, one per line. Split files (``labeled.txt``, ``unlabeled.txt``, ``val.txt``, ``test.txt``) are
written by :func:`write_split` (default ``<root>/splits/``) and are used only when ``data.split_dir``
names their folder (relative paths are taken from ``data.root``): a ``splits/`` folder is never
picked up implicitly, so a run's split is always visible in its config.

Without split files the training pool is every masked image, ``val`` and ``test`` are empty, and
:func:`~semiseg.data.base.make_splits` draws the labeled subset (``data.labeled``, seeded).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from ..config import DataConfig
from ..errors import DataError, OutputExistsError
from .base import DatasetSource, Record, labeled_count, register_dataset, require_root
from .io import list_images, read_mask_file, require_utf8_name

IMAGES_DIR, MASKS_DIR, UNLABELED_DIR = "images", "masks", "unlabeled"
CLASSES_FILE = "classes.yaml"
MASK_SUFFIX = ".png"
SPLIT_NAMES = ("labeled", "unlabeled", "val", "test")
DEFAULT_SPLIT_DIR = "splits"
_MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "P": 3, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1}


def _channels(path: Path) -> int:
    """Channel count a reader will produce for ``path`` (header only), or DataError naming it."""
    try:
        with warnings.catch_warnings(), Image.open(path) as img:  # damage is reported by the data check
            warnings.simplefilter("ignore")
            mode = img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    return _MODE_CHANNELS.get(mode, 3)


def _record_name(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _scan(root: Path) -> tuple[list[Record], list[Record]]:
    """Masked records of ``images/`` and mask-less records of ``unlabeled/`` (sorted by name)."""
    images_dir, masks_dir = root / IMAGES_DIR, root / MASKS_DIR
    if not images_dir.is_dir():
        raise DataError(
            f"{images_dir}: folder not found (the folder format needs {IMAGES_DIR}/ and {MASKS_DIR}/)"
        )
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: folder not found (masks/<stem>.png for every image in {IMAGES_DIR}/)")
    images = list_images(images_dir)
    by_stem: dict[str, Path] = {}
    for path in images:
        require_utf8_name(path)
        if path.stem in by_stem:
            raise DataError(
                f"{path}: two images share the stem {path.stem!r} (also {by_stem[path.stem].name}); "
                "a mask could not tell them apart: rename one"
            )
        by_stem[path.stem] = path
    masks: dict[str, Path] = {}
    others: dict[str, Path] = {}
    for p in sorted(masks_dir.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        require_utf8_name(p)
        if p.suffix.lower() != MASK_SUFFIX:
            others.setdefault(p.stem, p)
        elif p.stem in masks:
            raise DataError(f"{p}: two masks share the stem {p.stem!r} (also {masks[p.stem].name})")
        else:
            masks[p.stem] = p
    for stem, mask in sorted(masks.items()):
        if stem not in by_stem:
            raise DataError(f"{mask}: mask without an image ({IMAGES_DIR}/{stem}.* not found)")
    labeled = []
    for path in images:
        mask = masks.get(path.stem)
        if mask is None:
            found = (
                f"; found {others[path.stem].name}, but masks must be PNG (lossless)"
                if path.stem in others
                else ""
            )
            raise DataError(
                f"{path}: image has no mask ({MASKS_DIR}/{path.stem}{MASK_SUFFIX} not found{found})"
            )
        labeled.append(Record(name=_record_name(root, path), image=str(path), mask=str(mask)))
    if not labeled:
        raise DataError(f"{images_dir}: no images found (need at least one image with a mask)")
    unlabeled_dir = root / UNLABELED_DIR
    extra = []
    if unlabeled_dir.is_dir():
        for p in list_images(unlabeled_dir):
            require_utf8_name(p)
            extra.append(Record(name=_record_name(root, p), image=str(p)))
    return labeled, extra


def _read_classes(root: Path) -> tuple[list[str] | None, list[tuple[int, int, int]] | None]:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None, None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise DataError(f"{path}: invalid YAML ({first})") from None
    palette = None
    if isinstance(raw, dict):
        unknown = set(raw) - {"names", "palette"}
        if unknown:
            raise DataError(f"{path}: unknown key(s) {sorted(unknown)} (expected names, palette)")
        names, pal = raw.get("names"), raw.get("palette")
        if pal is not None:
            ok = isinstance(pal, list) and all(
                isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in pal
            )
            if not ok:
                raise DataError(f"{path}: palette must be a list of [r, g, b] integers in 0..255")
            palette = [tuple(c) for c in pal]
    else:
        names = raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a list of class names, or a mapping with names: [...]")
    if palette is not None and len(palette) != len(names):
        raise DataError(f"{path}: palette has {len(palette)} colours for {len(names)} classes")
    return list(names), palette


@register_dataset("folder")
def build_folder(cfg: DataConfig) -> DatasetSource:
    """Records of a custom folder dataset under ``cfg.root`` (see the module docstring).

    Classes come from ``classes.yaml``, else ``data.class_names``, else ``data.num_classes``
    (names ``class_0..``); with none of them a DataError asks for one. ``in_channels`` is read from
    the first image; every image header is checked (unreadable files and a differing channel count
    fail here, naming the file). ``val`` and ``test`` are empty unless ``data.split_dir`` lists them.
    """
    root = require_root(cfg, f"{IMAGES_DIR}/, {MASKS_DIR}/ and optionally {UNLABELED_DIR}/, {CLASSES_FILE}")
    labeled, extra = _scan(root)
    names, palette = _read_classes(root)
    if names is not None:
        if cfg.num_classes is not None and cfg.num_classes != len(names):
            raise DataError(
                f"{root / CLASSES_FILE}: lists {len(names)} classes but data.num_classes={cfg.num_classes}"
            )
    elif cfg.class_names:
        names = list(cfg.class_names)
    elif cfg.num_classes:
        names = [f"class_{i}" for i in range(cfg.num_classes)]
    else:
        raise DataError(
            f"{root}: number of classes unknown: add {CLASSES_FILE} (a list of class names) "
            "or set data.num_classes"
        )
    in_channels = _channels(Path(labeled[0].image))
    for record in labeled + extra:
        c = _channels(Path(record.image))
        if c != in_channels:
            raise DataError(
                f"{record.image}: image has {c} channel(s) but {labeled[0].image} has {in_channels}"
            )
    return DatasetSource(
        train_pool=labeled,
        test=[],
        val=[],
        extra_unlabeled=extra,
        class_names=names,
        in_channels=in_channels,
        palette=palette,
    )


def _count(n: int, amount: float | int, key: str) -> int:
    """Images for a fraction (float in [0, 1]) or a count (int >= 0) of ``n``; 0 allowed."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise DataError(f"{key}={amount!r}: expected a fraction (float) or a count (int)")
    if isinstance(amount, float):
        if not 0.0 <= amount <= 1.0:
            raise DataError(f"{key}={amount}: a fraction must be in [0, 1]")
        count = int(round(n * amount))
    else:
        count = amount
    if not 0 <= count <= n:
        raise DataError(f"{key}={amount}: asks for {count} images but only {n} are available")
    return count


def write_split(
    root: str | Path,
    labeled: float | int,
    seed: int,
    val: float | int = 0,
    test: float | int = 0,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Write ``labeled.txt`` / ``unlabeled.txt`` / ``val.txt`` / ``test.txt`` for a folder dataset.

    Fractions (float) are of the masked images (``images/``), counts (int) are numbers of images.
    ``val`` and ``test`` are carved first from the masked images (seeded shuffle of the sorted names),
    then ``labeled`` from the rest (a fraction of what is left, at least one image); ``unlabeled`` is
    the remaining masked images (their masks are hidden in training) plus everything in
    ``unlabeled/``. Files go to ``out_dir`` (default ``<root>/splits``; a relative ``out_dir`` is taken
    from ``root``) and list record names (paths relative to ``root``), one per line; point
    ``data.split_dir`` at that folder to use them. ``val.txt`` / ``test.txt`` are written only when
    they list images (training refuses an empty ``test.txt`` it would be evaluated on); with
    ``overwrite=True`` an earlier one is then removed. Existing split files are not overwritten
    unless ``overwrite=True``. Returns the four name lists.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: data root folder not found")
    masked, extra = _scan(root)
    out = Path(out_dir) if out_dir is not None else Path(DEFAULT_SPLIT_DIR)
    if not out.is_absolute():
        out = root / out
    files = {part: out / f"{part}.txt" for part in SPLIT_NAMES}
    if not overwrite:
        for path in files.values():
            if path.exists():
                raise OutputExistsError(path, "split file exists")

    names = sorted(r.name for r in masked)
    n_val = _count(len(names), val, "val")
    n_test = _count(len(names), test, "test")
    if n_val + n_test >= len(names):
        raise DataError(
            f"{root / IMAGES_DIR}: val ({n_val}) + test ({n_test}) leave no images to train on "
            f"out of {len(names)}"
        )
    rng = random.Random(seed)
    order = list(names)
    rng.shuffle(order)
    val_names, test_names = sorted(order[:n_val]), sorted(order[n_val : n_val + n_test])
    rest = order[n_val + n_test :]
    n_lab = labeled_count(len(rest), labeled, "labeled")
    labeled_names = sorted(rest[:n_lab])
    unlabeled_names = sorted(rest[n_lab:]) + [r.name for r in extra]
    splits = {"labeled": labeled_names, "unlabeled": unlabeled_names, "val": val_names, "test": test_names}
    out.mkdir(parents=True, exist_ok=True)
    for part, path in files.items():
        if part in ("val", "test") and not splits[part]:
            path.unlink(missing_ok=True)  # there only with overwrite=True: no stale held-out list
            continue
        path.write_text("".join(f"{name}\n" for name in splits[part]))
    return splits


def write_example(
    root: str | Path,
    images: int = 40,
    unlabeled: int = 8,
    num_classes: int = 3,
    size: int = 96,
    seed: int = 0,
) -> dict[str, int]:
    """Write a small dataset in the folder format to ``root`` (a new or empty folder): ``images``
    masked RGB images of the built-in synthetic generator (vessels, lesions) in ``images/`` +
    ``masks/``, ``unlabeled`` more in ``unlabeled/`` and ``classes.yaml`` (names and palette), to try
    the format and the commands before using your own data. All files appear at once or none.
    Returns the counts written."""
    from .synthetic import CLASS_NAMES, PALETTE, generate_sample

    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root}: exists and is not an empty folder; choose a new folder")
    if images < 1 or unlabeled < 0:
        raise DataError(f"{root}: need at least 1 masked image and >= 0 unlabeled ones")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for folder in (IMAGES_DIR, MASKS_DIR, UNLABELED_DIR):
            (tmp / folder).mkdir()
        for i in range(images + unlabeled):
            image, mask = generate_sample(seed * 1_000_000 + i, size, num_classes, 3)
            rgb = Image.fromarray((image * 255 + 0.5).astype(np.uint8), "RGB")
            if i < images:
                rgb.save(tmp / IMAGES_DIR / f"case{i:03d}.png")
                Image.fromarray(mask, "L").save(tmp / MASKS_DIR / f"case{i:03d}.png")
            else:
                rgb.save(tmp / UNLABELED_DIR / f"extra{i - images:03d}.png")
        classes = {"names": CLASS_NAMES[:num_classes], "palette": [list(c) for c in PALETTE[:num_classes]]}
        (tmp / CLASSES_FILE).write_text(yaml.safe_dump(classes, default_flow_style=None, sort_keys=False))
        if root.exists():
            root.rmdir()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"images": images, "unlabeled": unlabeled, "classes": num_classes}


def remap_masks(
    root: str | Path, mapping: list[str] | dict[int, int], out_dir: str | Path | None = None
) -> tuple[Path, int]:
    """Write a copy of ``root/masks`` with mask values changed (``["255=1"]`` or ``{255: 1}``): the
    conversion for masks encoded 0/255 when 255 marks the foreground (semiseg reads 255 as ignore).
    Never writes into ``masks/`` itself nor into an existing folder (all masks or none). Returns
    ``(output folder, number of masks written)``."""
    root = Path(root).expanduser()
    masks_dir = root / MASKS_DIR
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: folder not found")
    table = {}
    items = mapping.items() if isinstance(mapping, dict) else [m.split("=", 1) for m in mapping]
    for item in items:
        try:
            old, new = (int(v) for v in item)
        except (TypeError, ValueError):
            raise DataError(
                f"--map {'='.join(map(str, item))}: expected OLD=NEW with integers 0..255"
            ) from None
        if not (0 <= old <= 255 and 0 <= new <= 255):
            raise DataError(f"--map {old}={new}: values must be in 0..255")
        table[old] = new
    out = Path(out_dir) if out_dir is not None else root / "masks_remapped"
    if out.resolve() == masks_dir.resolve():
        raise DataError(f"{out}: refusing to write into {MASKS_DIR}/ itself; choose another --out")
    if out.exists():
        raise DataError(f"{out}: output folder exists (remove it or choose another --out)")
    paths = sorted(p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() == MASK_SUFFIX)
    lut = np.arange(256, dtype=np.uint8)
    for old, new in table.items():
        lut[old] = new
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:  # all or nothing: the folder appears only once every mask is written
        for p in paths:
            Image.fromarray(lut[read_mask_file(p)], "L").save(tmp / p.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, len(paths)
