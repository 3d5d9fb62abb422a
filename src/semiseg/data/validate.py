"""Check every file a run will read before the run directory is created.

:func:`check_data` goes through the four parts of a :class:`~semiseg.data.base.DataSplits`
(labeled, unlabeled, val, test) and the hidden masks of unlabeled images, and raises one
:class:`~semiseg.errors.DataError` (naming the first bad file, and how many more there are) when
anything would fail or silently go wrong later in training:

* every image: exists, has a UTF-8 name, its header reads, the file is complete (PNG ``IEND`` /
  JPEG ``EOI`` at the end; other formats and incomplete-looking files are decoded fully), its
  channel count matches the dataset's, float images are finite;
* every mask the run reads (labeled, val, test): decodes, is single-channel (or grey RGB), has its
  image's size, holds class indices ``< num_classes`` or 255 (ignore);
* every hidden mask (an image of the labeled pool used as unlabeled): readable header, complete
  file, same size as its image (its values are never read, so they are not decoded);
* volumes and other non-file readers (NIfTI, h5) are read in full through their reader: shape,
  channels, finite values, mask values.

Images are *not* decoded where the header and the file end are enough, so a large dataset checks
fast (docs/reliability.md, measured on 1,000 generated images). Warnings (not errors) are returned
for a class that never occurs in the labeled masks (with a hint for masks encoded 0/255 instead of
0/1), labeled masks that are entirely ignore, and split-file overlaps. Two-class labeled masks that
hold only 0 and 255 are an error: with 255 = ignore the foreground could never be learned (the
message names ``semiseg data remap-masks`` and ``data.mask_values``). Masks are checked after
``data.mask_values``. The procedural ``synthetic`` reader generates its images and is not checked.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig, RunConfig
from ..errors import ConfigError, DataError, SemisegError
from ..models import build_model
from .base import IGNORE_INDEX, DataSplits, Record
from .io import (
    LABEL_MAPS,
    MASK_MODES,
    READERS,
    inspect_image,
    map_mask_values,
    mask_value_table,
    read_mask_file,
    require_utf8_name,
)

UNCHECKED_READERS = ("synthetic",)  # generated, nothing on disk to check


@dataclass
class DataCheck:
    """Outcome of :func:`check_data` (when nothing was wrong)."""

    files: int = 0  # image and mask files (or volume slices) checked
    generated: int = 0  # records of a procedural dataset (nothing on disk to check)
    decoded: int = 0  # of which fully decoded (masks that are read, non-PNG/JPEG images, volumes)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    class_pixels: list[int] = field(default_factory=list)  # per class, over the labeled masks

    def summary(self) -> str:
        if self.generated and not self.files:
            return "generated data"
        return f"{self.files} files checked in {self.seconds:.1f} s"


@dataclass
class _Outcome:
    errors: list[str] = field(default_factory=list)
    files: int = 0
    decoded: int = 0
    counts: np.ndarray | None = None  # 256-bin histogram of a labeled mask
    mask_name: str | None = None  # the labeled mask ``counts`` comes from


def _mask_checks(mask: np.ndarray, mask_name: str, image_hw: tuple[int, int], where: str, num_classes: int):
    if mask.shape[:2] != image_hw:
        return (
            f"{mask_name}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image {where} "
            f"size {image_hw[1]}x{image_hw[0]}"
        )
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        hint = ""
        if len(np.unique(mask)) > num_classes + 2:
            hint = " (a greyscale or anti-aliased mask? masks must hold class indices)"
        return (
            f"{mask_name}: mask value {shown} is not a class index "
            f"(dataset has {num_classes} classes; 255 = ignore){hint}"
        )
    return None


def _check_file_record(
    record: Record, read_mask: bool, labeled: bool, num_classes: int, in_channels: int, cfg: DataConfig
) -> _Outcome:
    out = _Outcome()
    try:
        info = inspect_image(record.image)
    except DataError as exc:
        out.errors.append(str(exc))
        return out
    out.files += 1
    out.decoded += int(info.decoded)
    if info.channels != in_channels:
        out.errors.append(
            f"{record.image}: image has {info.channels} channel(s) (mode {info.mode}) but the dataset's "
            f"images have {in_channels}"
        )
    if record.mask is None:
        return out
    hw = (info.height, info.width)
    try:
        require_utf8_name(record.mask)
        if read_mask:
            mask = map_mask_values(read_mask_file(record.mask), cfg)
            out.files += 1
            out.decoded += 1
            if record.label_map:
                mask = LABEL_MAPS[record.label_map](mask)
            problem = _mask_checks(mask, record.mask, hw, record.image, num_classes)
            if problem:
                out.errors.append(problem)
            elif labeled:
                out.counts = np.bincount(mask.ravel(), minlength=256)
                out.mask_name = str(record.mask)
        else:  # a hidden mask: completeness and size only
            minfo = inspect_image(record.mask)
            out.files += 1
            out.decoded += int(minfo.decoded)
            if minfo.mode not in MASK_MODES:
                out.errors.append(f"{record.mask}: mask must be single-channel, got mode {minfo.mode}")
            elif (minfo.height, minfo.width) != hw:
                out.errors.append(
                    f"{record.mask}: mask size {minfo.width}x{minfo.height} differs from image "
                    f"{record.image} size {info.width}x{info.height}"
                )
    except DataError as exc:
        out.errors.append(str(exc))
    return out


def _check_reader_record(
    record: Record, cfg: DataConfig, labeled: bool, num_classes: int, in_channels: int
) -> _Outcome:
    """Records of volume readers (NIfTI, h5, ...): read in full through the reader."""
    out = _Outcome()
    where = record.image if record.index is None else f"{record.image}[{record.index}]"
    if record.reader not in READERS:
        out.errors.append(f"{record.image}: no reader named {record.reader!r}")
        return out
    try:
        image, mask = READERS[record.reader](record, cfg)
    except SemisegError as exc:
        out.errors.append(str(exc))
        return out
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:  # a reader's unexpected failure
        out.errors.append(f"{where}: cannot read ({type(exc).__name__}: {exc})")
        return out
    out.files += 1 + int(mask is not None)
    out.decoded += 1 + int(mask is not None)
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        out.errors.append(f"{where}: expected an H×W image slice, got shape {image.shape}")
        return out
    if image.shape[2] != in_channels:
        out.errors.append(
            f"{where}: image has {image.shape[2]} channel(s) but the dataset's images have {in_channels}"
        )
    if not np.isfinite(image).all():
        out.errors.append(f"{where}: image holds NaN or Inf values")
    if mask is not None:
        mask = map_mask_values(mask, cfg)
        if record.label_map:
            mask = LABEL_MAPS[record.label_map](mask)
        mask_name = f"{record.mask}" + ("" if record.index is None else f"[{record.index}]")
        problem = _mask_checks(
            mask,
            mask_name,
            image.shape[:2],
            where,
            num_classes,
        )
        if problem:
            out.errors.append(problem)
        elif labeled:
            out.counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
            out.mask_name = mask_name
    return out


def _class_warnings(counts: list[np.ndarray], class_names: list[str], root: str | None = None) -> list[str]:
    """A warning per class that never occurs in the labeled masks, with a hint for 0/255 masks."""
    if not counts:
        return []
    total = np.sum(counts, axis=0)
    notes = []
    missing = [i for i in range(len(class_names)) if total[i] == 0]
    values = {int(v) for v in np.flatnonzero(total)}
    all_ignore = sum(1 for c in counts if c.sum() > 0 and c[IGNORE_INDEX] == c.sum())
    if all_ignore:
        notes.append(
            f"{all_ignore} of {len(counts)} labeled masks are entirely 255 (ignore): nothing to learn there"
        )
    if missing:
        shown = ", ".join(f"{class_names[i]!r} ({i})" for i in missing)
        hint = ""
        if values <= {0, IGNORE_INDEX} and IGNORE_INDEX in values:
            hint = (
                "; the labeled masks hold only 0 and 255, and 255 means ignore: if 255 marks the "
                f"foreground, convert the masks to class indices: semiseg data remap-masks {root or 'ROOT'} "
                "--map 255=1"
            )
        elif values <= {0}:
            hint = "; every labeled mask is all background (0)"
        many = len(missing) > 1
        notes.append(
            f"class{'es' if many else ''} {shown} never occur{'' if many else 's'} in the {len(counts)} "
            f"labeled mask(s): the model cannot learn {'them' if many else 'it'} from labels{hint}"
        )
    return notes


def _binary_255_error(outcomes: list[_Outcome], class_names: list[str], cfg: DataConfig) -> str | None:
    """Two classes and labeled masks holding only 0 and 255: with 255 = ignore the foreground class
    never occurs and could never be learned (binary masks are often saved 0/255). The error names
    the first such mask and both ways out."""
    labeled = [o for o in outcomes if o.counts is not None]
    if len(class_names) != 2 or not labeled:
        return None
    values = {int(v) for v in np.flatnonzero(np.sum([o.counts for o in labeled], axis=0))}
    if IGNORE_INDEX not in values or not values <= {0, IGNORE_INDEX}:
        return None
    first = next(o.mask_name for o in labeled if o.counts[IGNORE_INDEX])
    root = cfg.root if cfg.name == "folder" and cfg.root else "ROOT"
    return (
        f"{first}: the {len(labeled)} labeled mask(s) hold only 0 and 255, and 255 means ignore, so class "
        f"{class_names[1]!r} (1) could never be learned; if 255 marks the foreground, convert the masks: "
        f"semiseg data remap-masks {root} --map 255=1 (or set data.mask_values to {{0: 0, 255: 1}})"
    )


def check_data(splits: DataSplits, cfg: DataConfig) -> DataCheck:
    """Check every file of ``splits`` (see the module docstring); raise one DataError for the first
    problem (and say how many more were found), else return the counts and the warnings."""
    start = time.perf_counter()
    mask_value_table(cfg)  # a bad data.mask_values is a config error, before any file is read
    num_classes, in_channels = splits.num_classes, splits.in_channels
    tasks: list[tuple[Record, bool, bool]] = []  # (record, read its mask, labeled)
    seen: set[tuple] = set()
    generated = 0

    def add(records: list[Record], read_mask: bool, labeled: bool) -> None:
        nonlocal generated
        for r in records:
            if r.reader in UNCHECKED_READERS:
                generated += 1
                continue
            key = (r.image, r.mask if read_mask else None, r.reader, r.index, r.label_map, labeled)
            if key not in seen:
                seen.add(key)
                tasks.append((r, read_mask, labeled))

    add(splits.labeled, True, True)
    add(splits.val, True, False)
    add(splits.test, True, False)
    hidden = {r.name: r for r in splits.hidden if r.reader == "file"}
    add([hidden.get(r.name, r) for r in splits.unlabeled], False, False)

    file_tasks = [t for t in tasks if t[0].reader == "file"]
    other_tasks = [t for t in tasks if t[0].reader != "file"]
    outcomes: list[_Outcome] = []
    # One thread: fast enough (benchmarks/data_check_speed.py) and PIL's damage warnings are caught
    # per file, which the process-wide warnings machinery only allows single-threaded.
    outcomes += [
        _check_file_record(r, read, lab, num_classes, in_channels, cfg) for r, read, lab in file_tasks
    ]
    for record, read_mask, labeled in other_tasks:  # readers with per-process caches: one at a time
        rec = record if read_mask else record.unlabeled()
        outcomes.append(_check_reader_record(rec, cfg, labeled, num_classes, in_channels))

    errors = [e for o in outcomes for e in o.errors]
    if errors:
        more = f" (and {len(errors) - 1} more problem(s) in other files)" if len(errors) > 1 else ""
        raise DataError(errors[0] + more)
    binary = _binary_255_error(outcomes, splits.class_names, cfg)
    if binary:
        raise DataError(binary)
    counts = [o.counts for o in outcomes if o.counts is not None]
    report = DataCheck(
        files=sum(o.files for o in outcomes),
        generated=generated,
        decoded=sum(o.decoded for o in outcomes),
        warnings=list(splits.warnings)
        + _class_warnings(counts, splits.class_names, cfg.root if cfg.name == "folder" else None),
        class_pixels=[int(v) for v in np.sum(counts, axis=0)[:num_classes]] if counts else [],
    )
    report.seconds = time.perf_counter() - start
    return report


def check_eval_splits(splits: DataSplits, cfg: RunConfig) -> None:
    """A split the final evaluation uses (``eval.splits``) that the run's split files list as empty
    is a DataError naming the file, before training (not a skipped evaluation after it)."""
    d = cfg.data
    if not d.split_dir:
        return
    split_dir = Path(d.split_dir)
    if not split_dir.is_absolute() and d.root:
        split_dir = Path(d.root) / split_dir
    for part in cfg.eval.splits:
        path = split_dir / f"{part}.txt"
        if part in ("val", "test") and not getattr(splits, part) and path.is_file():
            raise DataError(
                f"{path}: lists no images, but eval.splits includes {part!r} (the final weights are "
                f"evaluated on it): list images in it (semiseg data split ... --{part} N), delete the "
                f"file, or set eval.splits without {part!r}"
            )


def check_crop_size(cfg, in_channels: int, num_classes: int) -> None:
    """One-line ConfigError when a training batch (``data.batch_size`` crops of ``data.crop_size``)
    cannot go through the model — e.g. a U-Net whose levels need a larger input — found by a
    forward pass on the ``meta`` device (shapes only: no memory, no computation, no download, and
    the global RNG is left as it was). Failures other than the model's own shape checks are not
    this check's business and are ignored."""
    state = torch.get_rng_state()
    try:
        model_cfg = dataclasses.replace(cfg.model, pretrained=False, weights=None)
        with torch.device("meta"):
            model = build_model(model_cfg, in_channels, num_classes)
        model.train()
        side = cfg.data.crop_size
        x = torch.empty(cfg.data.batch_size, in_channels, side, side, device="meta")
        try:
            model(x)
        except ValueError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "shape error"
            raise ConfigError(
                f"data.crop_size={side}: a {cfg.data.batch_size}×{side}×{side} training batch does not fit "
                f"model.name={cfg.model.name} ({detail})"
            ) from None
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - a model that cannot run on 'meta' is checked by training itself
        pass
    finally:
        torch.set_rng_state(state)
