"""Colour masks, overlays on images, PNG writing and legend patches for figures.

Conventions: a palette is a list of ``(r, g, b)`` uint8 triples indexed by class; ignore pixels
(255) are drawn in :data:`IGNORE_COLOR` (white) by :func:`colorize` and left untinted by
:func:`overlay`, as is the background class 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .types import IGNORE_INDEX

Color = tuple[int, int, int]
IGNORE_COLOR: Color = (255, 255, 255)


def _lut(palette: Sequence[Sequence[int]], ignore_color: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """256-entry colour lookup table and a mask of the defined entries."""
    if len(palette) > IGNORE_INDEX:
        raise ValueError(f"palette has {len(palette)} colours; at most {IGNORE_INDEX} classes are supported")
    lut = np.zeros((256, 3), dtype=np.uint8)
    defined = np.zeros(256, dtype=bool)
    if len(palette):
        lut[: len(palette)] = np.asarray(palette, dtype=np.int64).reshape(-1, 3).clip(0, 255)
    defined[: len(palette)] = True
    lut[IGNORE_INDEX] = ignore_color
    defined[IGNORE_INDEX] = True
    return lut, defined


def _as_index_mask(mask: Any) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be H×W, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"mask values must be in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def colorize(
    mask: np.ndarray, palette: Sequence[Sequence[int]], ignore_color: Sequence[int] = IGNORE_COLOR
) -> np.ndarray:
    """Index mask ``H×W`` -> colour image ``H×W×3`` uint8; 255 (ignore) -> ``ignore_color`` (white).

    A value that is neither a palette index nor 255 raises ``ValueError``.
    """
    m = _as_index_mask(mask)
    lut, defined = _lut(palette, ignore_color)
    if m.size and not defined[m].all():
        bad = int(m[~defined[m]].max())
        raise ValueError(f"mask value {bad} has no colour (palette has {len(palette)} classes)")
    return lut[m]


def _to_rgb_float(image: np.ndarray) -> np.ndarray:
    """``H×W`` or ``H×W×C`` float in [0, 1] -> ``H×W×3``: 3 channels kept, otherwise channel 0 as grey."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"image must be H×W or H×W×C, got shape {img.shape}")
    if img.shape[2] != 3:
        img = np.repeat(img[..., :1], 3, axis=2)
    return img.clip(0.0, 1.0)


def overlay(
    image: np.ndarray, mask: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> np.ndarray:
    """Blend class colours over an image: ``H×W×3`` uint8.

    ``image`` is ``H×W×C`` (or ``H×W``) float in [0, 1]; one channel (or any count other than 3) is
    shown as grey from channel 0. Pixels of class ``c ≥ 1`` become ``(1−alpha)·image + alpha·colour_c``;
    background (0) and ignore (255) pixels keep the image.
    """
    rgb = _to_rgb_float(image)
    m = _as_index_mask(mask)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask size {m.shape} differs from image size {rgb.shape[:2]}")
    colours = colorize(m, palette).astype(np.float32) / 255.0
    tint = ((m != 0) & (m != IGNORE_INDEX))[..., None]
    out = np.where(tint, (1.0 - alpha) * rgb + alpha * colours, rgb)
    return (out * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``H×W`` (mode L, e.g. an index mask) or ``H×W×3`` (RGB) array as PNG.

    Parent folders are created. Returns the path.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"save_png expects H×W or H×W×3, got shape {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr))  # uint8 H×W -> mode L, H×W×3 -> RGB
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def montage(tiles: Sequence[np.ndarray], columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Equal-sized ``H×W×3`` uint8 tiles in a grid, row by row (``columns``: default
    ``ceil(sqrt(n))``), separated by ``gap`` black pixels; empty cells of the last row stay black."""
    if not tiles:
        raise ValueError("montage needs at least one tile")
    h, w = tiles[0].shape[:2]
    if any(t.shape != tiles[0].shape for t in tiles):
        raise ValueError(f"montage tiles differ in shape: {sorted({t.shape for t in tiles})}")
    cols = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    out = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), dtype=np.uint8)
    for k, tile in enumerate(tiles):
        top, left = (k // cols) * (h + gap), (k % cols) * (w + gap)
        out[top : top + h, left : left + w] = tile
    return out


def legend_patches(class_names: Sequence[str], palette: Sequence[Sequence[int]]) -> list[Any]:
    """``matplotlib.patches.Patch`` handles (one per class) for ``ax.legend(handles=...)``."""
    from matplotlib.patches import Patch

    if len(palette) < len(class_names):
        raise ValueError(f"palette has {len(palette)} colours for {len(class_names)} classes")
    return [
        Patch(facecolor=tuple(v / 255.0 for v in colour), edgecolor="black", label=str(name))
        for name, colour in zip(class_names, palette)
    ]
