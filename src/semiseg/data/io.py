"""Reading records into arrays, with the checks that give bad input a clear one-line error.

Readers are registered by name (``Record.reader``); format modules add their own (NIfTI, h5).
A reader returns the *raw* image (float32 H×W×C in [0, 1]) and raw mask (integer H×W or None);
:func:`read_record` then applies the record's label map, the configured resize, and validates.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..registry import LABEL_MAPS, READERS
from .base import IGNORE_INDEX, Record

Reader = Callable[[Record, DataConfig], tuple[np.ndarray, np.ndarray | None]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Register a reader under ``Record.reader == name`` (:data:`semiseg.registry.READERS`)."""
    return READERS.register(name)


def register_label_map(name: str) -> Callable[[Callable[[np.ndarray], np.ndarray]], Callable]:
    """Register a mask value mapping under ``Record.label_map == name``."""
    return LABEL_MAPS.register(name)


def open_image(path: str | Path) -> Image.Image:
    """Open an image file fully (decoding now), or raise DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:  # PIL warns (not raises) on some damage
            warnings.simplefilter("always")
            img = Image.open(path)
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    _raise_if_truncated(caught, path)
    return img


def _raise_if_truncated(caught: list, path: Path) -> None:
    """PIL reads a truncated TIFF (and some others) with only a warning: make it an error; other
    PIL warnings (odd EXIF data, ...) are dropped, the pixels being readable."""
    cut = [w for w in caught if "runcated" in str(w.message)]
    if cut:
        raise DataError(f"{path}: cannot read image (file is truncated: {str(cut[0].message).strip()})")


# Channel count :func:`pil_to_float` produces for each PIL mode (every other mode becomes RGB).
MODE_CHANNELS = {"1": 1, "L": 1, "LA": 1, "I": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "F": 1}
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "RGB", "RGBA")
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


def display_path(path: str | Path) -> str:
    """``path`` as printable text: bytes that are not UTF-8 are shown as ``\\xNN`` escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def require_utf8_name(path: str | Path) -> None:
    """DataError when a file name is not valid UTF-8 (it could not be written to split files, configs
    or logs); the message shows the raw bytes as ``\\xNN``."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{display_path(path)}: file name is not valid UTF-8; rename the file (e.g. with convmv)"
        ) from None


def _ends_complete(path: Path, fmt: str | None) -> bool:
    """Cheap truncation test from the file's last bytes: PNG ends with its IEND chunk, JPEG with
    the EOI marker. False means "not known to be complete" (the caller then decodes fully)."""
    if fmt not in ("PNG", "JPEG", "MPO"):
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 1024))
            tail = fh.read()
    except OSError:
        return False
    if fmt == "PNG":
        return tail.endswith(_PNG_END) or _PNG_END in tail
    return _JPEG_END in tail[-64:]


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`inspect_image` learns about an image file."""

    width: int
    height: int
    mode: str
    channels: int  # as read by :func:`pil_to_float`
    decoded: bool  # True when the pixels were fully decoded (not only the header and the file end)


def inspect_image(path: str | Path, decode: bool = False, utf8_name: bool = True) -> ImageInfo:
    """Size, mode and channel count of an image file, or a one-line DataError naming it.

    Reads the header and checks the file is complete from its last bytes (PNG IEND chunk, JPEG EOI
    marker), which finds truncated files without decoding them; other formats, ``decode=True`` and
    files whose end does not look complete are decoded fully. Float images must be finite. With
    ``utf8_name`` (datasets: names go into split files and configs) the name must be UTF-8.
    """
    path = Path(path)
    if utf8_name:
        require_utf8_name(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings(record=True) as caught, Image.open(path) as img:
            warnings.simplefilter("always")
            mode, (width, height), fmt = img.mode, img.size, img.format
            full = decode or mode == "F" or not _ends_complete(path, fmt)
            if full:
                img.load()
                _raise_if_truncated(caught, path)
                if mode == "F" and not np.isfinite(np.asarray(img)).all():
                    raise DataError(f"{path}: image holds NaN or Inf values")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise DataError(f"{path}: image has no pixels ({width}x{height})")
    return ImageInfo(width, height, mode, MODE_CHANNELS.get(mode, 3), full)


def pil_to_float(img: Image.Image) -> np.ndarray:
    """PIL image -> float32 H×W×C in [0, 1]; greyscale stays 1 channel, alpha is dropped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return (arr / peak)[..., None].clip(0, 1)
    if img.mode in ("1", "L", "LA", "F"):
        img = img.convert("L")
    elif img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def read_mask_file(path: str | Path) -> np.ndarray:
    """Index mask (PNG palette/L/1-bit) -> uint8 H×W of class indices (255 = ignore)."""
    img = open_image(path)
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(f"{path}: colour mask; masks must hold class indices (mode L or P)")
        return arr[..., 0].astype(np.uint8)
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise DataError(f"{path}: mask must be single-channel, got shape {arr.shape}")
    if arr.max(initial=0) > 255:
        raise DataError(f"{path}: mask value {int(arr.max())} does not fit the 0..255 index range")
    return arr.astype(np.uint8)


def mask_value_table(cfg: DataConfig) -> np.ndarray | None:
    """``data.mask_values`` as a 256-entry lookup table (``None`` when unset); a key or value that is
    not a mask value in 0..255 is a one-line ConfigError naming ``data.mask_values``."""
    if not cfg.mask_values:
        return None
    table = np.arange(256, dtype=np.uint8)
    for key, value in cfg.mask_values.items():
        try:
            old = int(str(key).strip())
        except ValueError:
            old = -1
        if not 0 <= old <= 255:
            raise ConfigError(f"data.mask_values: key {key!r} is not a mask value (0..255)")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ConfigError(f"data.mask_values: {key} -> {value!r}: the class index must be in 0..255")
        table[old] = value
    return table


def map_mask_values(mask: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """``mask`` with ``data.mask_values`` applied (unchanged when unset, or when it holds values
    outside 0..255, which the mask checks then report)."""
    table = mask_value_table(cfg)
    if table is None:
        return mask
    arr = np.asarray(mask)
    if arr.dtype.kind not in "uib" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        return mask
    return table[arr.astype(np.int64)]


@register_reader("file")
def read_file_record(record: Record, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    img = open_image(record.image)
    if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
        raise DataError(f"{record.image}: image holds NaN or Inf values")
    image = pil_to_float(img)
    mask = read_mask_file(record.mask) if record.mask else None
    return image, mask


def target_size(height: int, width: int, cfg: DataConfig) -> tuple[int, int]:
    """Size after ``data.size`` (fixed ``[H, W]``) or ``data.long_side`` / ``data.resize``."""
    if cfg.size:
        return int(cfg.size[0]), int(cfg.size[1])
    if cfg.long_side:
        scale = cfg.long_side / max(height, width)
    else:
        scale = cfg.resize
    if scale == 1.0:
        return height, width
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int]):
    """Resize image (bilinear) and mask (nearest) to ``size`` = (H, W)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, mask
    channels = [
        np.asarray(Image.fromarray(image[..., c]).resize((w, h), Image.BILINEAR), dtype=np.float32)
        for c in range(image.shape[2])
    ]
    image = np.stack(channels, axis=-1)
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return image, mask


def read_record(
    record: Record, cfg: DataConfig, num_classes: int, in_channels: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read, map, resize and validate one record. Results are cached per process (read-only arrays)."""
    size = tuple(cfg.size) if cfg.size else None
    mapped = tuple(sorted(cfg.mask_values.items())) if cfg.mask_values else None
    key = (record, cfg.resize, cfg.long_side, size, tuple(cfg.hu_window), mapped, num_classes, in_channels)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _read_uncached(record, cfg, num_classes, in_channels)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = hit
    return hit


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = {}
_CACHE_SIZE = 256


def _read_uncached(record: Record, cfg: DataConfig, num_classes: int, in_channels: int | None):
    if record.reader not in READERS:
        raise DataError(f"{record.image}: no reader named {record.reader!r}")
    image, mask = READERS[record.reader](record, cfg)
    where = record.image if record.index is None else f"{record.image}[{record.index}]"
    if in_channels is not None and image.shape[2] != in_channels:
        raise DataError(f"{where}: image has {image.shape[2]} channel(s) but the model expects {in_channels}")
    if not np.isfinite(image).all():
        raise DataError(f"{where}: image holds NaN or Inf values")
    if mask is not None:
        mask = map_mask_values(mask, cfg)
        if record.label_map:
            mask = LABEL_MAPS[record.label_map](mask)
        if mask.shape[:2] != image.shape[:2]:
            raise DataError(
                f"{record.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{where} size {image.shape[1]}x{image.shape[0]}"
            )
        bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise DataError(
                f"{record.mask}: mask value {int(mask[bad].max())} is not a class index "
                f"(dataset has {num_classes} classes; 255 = ignore)"
            )
        mask = mask.astype(np.uint8)
    size = target_size(image.shape[0], image.shape[1], cfg)
    image, mask = resize_pair(image.astype(np.float32), mask, size)
    image.setflags(write=False)
    if mask is not None:
        mask.setflags(write=False)
    return image, mask


def normalization(cfg: DataConfig, channels: int) -> tuple[list[float], list[float]]:
    """Mean/std per channel: the configured ones, else ImageNet (RGB) or 0.5/0.5 (greyscale)."""
    if cfg.mean is not None and cfg.std is not None:
        if len(cfg.mean) != channels or len(cfg.std) != channels:
            raise DataError(f"data.mean/data.std: need {channels} values, got {len(cfg.mean)}/{len(cfg.std)}")
        return list(cfg.mean), list(cfg.std)
    if channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * channels, [0.5] * channels


def normalize(image: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """C×H×W (or N×C×H×W) tensor in [0, 1] -> normalised."""
    shape = (-1, 1, 1)
    m = torch.tensor(mean, dtype=image.dtype, device=image.device).view(shape)
    s = torch.tensor(std, dtype=image.dtype, device=image.device).view(shape)
    return (image - m) / s


def image_to_tensor(image: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """H×W×C float array in [0, 1] -> normalised C×H×W tensor."""
    t = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)  # copies the read-only cached array
    mean, std = normalization(cfg, t.shape[0])
    return normalize(t, mean, std)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
