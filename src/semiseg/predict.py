"""Predict masks for a folder of images.

Every image is read exactly as at training/evaluation time (``data.resize`` / ``data.long_side``
through :func:`~semiseg.data.io.read_record`, the same normalisation), predicted with the
configured inference mode (:func:`~semiseg.evaluate.predict_logits`), and the prediction is resized
back (nearest neighbour) to the **original** image size, so the written masks line up with the
input files. For ``<stem>.<ext>`` two files are written to the output folder:

* ``<stem>_mask.png`` — the predicted classes, in one of :data:`MASK_FORMATS` (``mask_format``):
  ``index`` (the default): greyscale PNG whose pixel value is the class index (0, 1, ...: it looks
  black in an image viewer, and it is what training reads as a mask); ``visible``: greyscale with the
  classes spread over 0..255 (class ``c`` → ``c · ⌊255 / (K − 1)⌋``; for viewing only, not a training
  mask); ``color``: palette PNG in the dataset's colours whose pixel values are still the class
  indices (``numpy.asarray(Image.open(path))``);
* ``<stem>_overlay.png`` — the class colours blended over the original image (background untinted).

**Volumes.** A ``<stem>.h5`` file in the SSL4MIS layout (dataset ``'image'``, ``D×H×W`` or one
``H×W`` slice; what ``datasets/acdc.yaml`` reads) is predicted slice by slice exactly as per-volume
evaluation scores it: each slice read as the ``"h5"`` reader reads it (as stored when in [0, 1],
else min-max scaled), resized to the model's input size, predicted, and zoomed back to its original
size by nearest neighbour. It gives ``<stem>_mask.h5`` (dataset ``'label'``, uint8 class indices, the
input's shape: the ``"h5"`` reader reads it back as a mask) and ``<stem>_overlay.png``, the slices'
overlays tiled row by row. A volume needs a 1-channel model.

Existing files are never overwritten unless ``overwrite=True``; the check happens before anything
is written, and the error names the first conflicting file. Every input image is checked (readable,
complete, channel count) before the first prediction, outputs are renamed into place only when all
images succeeded (a failure writes nothing), and files that are not images are named, not silently
skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import check_writable, staged_writes
from .config import DataConfig, EvalConfig
from .data.acdc import h5_depth, read_h5_slices
from .data.base import Record
from .data.io import (
    IMAGE_SUFFIXES,
    display_path,
    inspect_image,
    list_images,
    open_image,
    pil_to_float,
    read_record,
)
from .errors import DataError, OutputExistsError, SemisegError
from .evaluate import SlicePredictor, unwrap_model
from .modes import eval_mode
from .visualize import montage, overlay, save_png

MaskFormat = Literal["index", "visible", "color"]
MASK_FORMATS: tuple[str, ...] = ("index", "visible", "color")
VOLUME_SUFFIXES: tuple[str, ...] = (".h5",)


def mask_image(
    pred: np.ndarray, num_classes: int, palette: Sequence[Sequence[int]], mask_format: str = "index"
) -> Image.Image:
    """A predicted ``H×W`` class mask as the PNG image ``mask_format`` names (module docstring)."""
    arr = np.asarray(pred, dtype=np.uint8)
    if mask_format == "index":
        return Image.fromarray(arr, "L")
    if mask_format == "visible":
        return Image.fromarray((arr * (255 // max(1, num_classes - 1))).astype(np.uint8), "L")
    if mask_format == "color":
        img = Image.fromarray(arr, "P")
        colours = [int(v) for colour in palette[:num_classes] for v in colour]
        img.putpalette(colours + [0] * (768 - len(colours)))
        return img
    raise SemisegError(f"mask_format: expected one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")


def is_volume(path: Path) -> bool:
    """Whether ``path`` is predicted as a volume (module docstring), not as an image."""
    return path.suffix.lower() in VOLUME_SUFFIXES


def output_paths(image: Path, out_dir: Path) -> tuple[Path, Path]:
    """``(<stem>_mask.png, <stem>_overlay.png)`` in ``out_dir`` for one input image; the mask of a
    volume is ``<stem>_mask.h5``."""
    mask_suffix = ".h5" if is_volume(image) else ".png"
    return out_dir / f"{image.stem}_mask{mask_suffix}", out_dir / f"{image.stem}_overlay.png"


def _plan(images: list[Path], out_dir: Path, overwrite: bool) -> list[tuple[Path, Path, Path]]:
    seen: dict[str, Path] = {}
    plan = []
    for img in images:
        if img.stem in seen:
            raise DataError(
                f"{img}: same name stem as {seen[img.stem]}; their outputs would collide "
                f"({img.stem}_overlay.png)"
            )
        seen[img.stem] = img
        mask_path, overlay_path = output_paths(img, out_dir)
        if not overwrite:
            for p in (mask_path, overlay_path):
                if p.exists():
                    raise OutputExistsError(p, "output file exists")
        plan.append((img, mask_path, overlay_path))
    return plan


def _non_images(folder: Path, images: list[Path]) -> list[Path]:
    """Plain files of ``folder`` that are not listed as images (skipped, and said so)."""
    listed = set(images)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p not in listed and not p.name.startswith(".")
    )


def predict_folder(
    model: nn.Module,
    input_dir: str | Path,
    out_dir: str | Path,
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    in_channels: int,
    device: torch.device | str,
    overwrite: bool = False,
    amp: bool = False,
    log: Callable[[str], None] | None = None,
    mask_format: MaskFormat = "index",
) -> list[Path]:
    """Predict every image in ``input_dir`` and write masks and overlays to ``out_dir``.

    Returns the written paths, ``[mask, overlay]`` per image in sorted input order. Raises
    :class:`~semiseg.errors.DataError` when the folder has no images, when an image cannot be read
    or its channel count differs from ``in_channels`` (every image is checked before anything is
    written), when the output folder cannot be written, or when an output exists and ``overwrite``
    is false. All or nothing: outputs are written to temp files and renamed into place only once
    every image has been predicted, so a failure leaves ``out_dir`` as it was. Files of
    ``input_dir`` that are not images are skipped and named through ``log``. The model's
    train/eval state is restored afterwards. ``mask_format``: ``index`` (class indices, the default),
    ``visible`` or ``color`` (module docstring).
    """
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if mask_format not in MASK_FORMATS:
        raise SemisegError(f"mask_format: expected one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    device = torch.device(device)
    images = list_images(input_dir)
    volumes = [p for p in sorted(input_dir.iterdir()) if p.is_file() and is_volume(p)]
    skipped = _non_images(input_dir, images + volumes)
    inputs = sorted(images + volumes)
    if not inputs:
        also = f"; it holds {len(skipped)} other file(s), e.g. {skipped[0].name}" if skipped else ""
        looked = "/".join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)
        raise DataError(f"{input_dir}: no images found (looked for {looked}){also}")
    plan = _plan(inputs, out_dir, overwrite)
    num_classes = len(class_names)
    if len(palette) < num_classes:
        raise ValueError(f"palette has {len(palette)} colours for {num_classes} classes")
    # every input readable, with the model's channel count, before anything is written
    for path in inputs:
        if is_volume(path):
            h5_depth(path)  # checks the file and the shape of its 'image'
            channels, what = 1, "volume has 1 channel"
        else:
            info = inspect_image(path, utf8_name=False)  # any name: outputs keep its bytes
            channels, what = info.channels, f"image has {info.channels} channel(s) (mode {info.mode})"
        if channels != in_channels:
            raise DataError(f"{path}: {what} but the model expects {in_channels}")
    check_writable(out_dir, "output folder")
    if skipped and log is not None:
        names = ", ".join(display_path(p.name) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        log(f"note: skipped {len(skipped)} file(s) of {input_dir} that are not images: {names}")
    net = unwrap_model(model)
    predictor = SlicePredictor(net, data_cfg, eval_cfg, in_channels, device, amp)
    created = not out_dir.exists()
    # a failure leaves no temp file, and no empty folder where there was none
    with (
        eval_mode(net),
        staged_writes(out_dir, created, "predictions", DataError) as stage,
        torch.inference_mode(),
    ):
        out_dir.mkdir(parents=True, exist_ok=True)
        for img_path, mask_path, overlay_path in plan:
            if is_volume(img_path):
                _predict_volume(predictor, img_path, (mask_path, overlay_path), palette, stage)
                continue
            record = Record(name=img_path.stem, image=str(img_path), mask=None, reader="file")
            image, _ = read_record(record, data_cfg, num_classes, in_channels)
            pred = predictor(image).to(torch.uint8).cpu().numpy()
            original = pil_to_float(open_image(img_path))
            oh, ow = original.shape[:2]
            if pred.shape != (oh, ow):
                pred = np.asarray(Image.fromarray(pred).resize((ow, oh), Image.NEAREST))
            mask_tmp = stage(mask_path.with_name(f".{mask_path.name}.partial.png"), mask_path)
            mask_image(pred, num_classes, palette, mask_format).save(mask_tmp, "PNG")
            overlay_tmp = stage(overlay_path.with_name(f".{overlay_path.name}.partial.png"), overlay_path)
            save_png(overlay(original, pred, palette), overlay_tmp)
    return [final for _, mask_path, overlay_path in plan for final in (mask_path, overlay_path)]


def _predict_volume(
    predictor: SlicePredictor,
    path: Path,
    outputs: tuple[Path, Path],
    palette: Sequence[Sequence[int]],
    stage: Callable[[Path, Path], Path],
) -> None:
    """Write ``<stem>_mask.h5`` and the overlay montage of one volume (module docstring)."""
    import h5py

    mask_path, overlay_path = outputs
    slices, one_slice = read_h5_slices(path)
    preds = [predictor.at_original_size(image) for image in slices]
    overlays = [overlay(image, pred, palette) for image, pred in zip(slices, preds)]
    labels = preds[0] if one_slice else np.stack(preds)
    with h5py.File(stage(mask_path.with_name(f".{mask_path.name}.partial.h5"), mask_path), "w") as f:
        f.create_dataset("label", data=labels, compression="gzip")
    overlay_tmp = stage(overlay_path.with_name(f".{overlay_path.name}.partial.png"), overlay_path)
    save_png(montage(overlays), overlay_tmp)
