"""Weak and strong views and CutMix boxes, as UniMatch's ``dataset/transform.py`` makes them.

Every random draw comes from the ``torch.Generator`` passed in, so a view is a pure function of
(image, config, seed): reproducible, exact on resume and identical for any number of loader
workers. Images are float tensors in [0, 1] here; normalisation happens afterwards
(:func:`semiseg.data.io.normalize`), so padding is 0 *before* normalisation, as in UniMatch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor

from ..config import StrongAugConfig
from .base import IGNORE_INDEX

# Gaussian blur kernel: odd, covering ±BLUR_TRUNCATE·σ (PIL's GaussianBlur(radius=σ), used by UniMatch,
# reaches about 3σ as well).
BLUR_TRUNCATE = 3.0
# CutMix box: UniMatch resamples (aspect, position) until the box fits; for extreme image shapes where
# no draw can fit, give up after this many tries and clip the box to the image instead of looping forever.
CUTMIX_MAX_TRIES = 1000


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Integer in ``[low, high)``."""
    return int(torch.randint(low, high, (), generator=gen))


def _coin(gen: torch.Generator, p: float) -> bool:
    """True with probability ``p`` (always draws one number, so the stream does not depend on ``p``)."""
    return float(torch.rand((), generator=gen)) < p


# --------------------------------------------------------------------------------------------
# Weak view
# --------------------------------------------------------------------------------------------


def _aa_bilinear_rows(in_size: int, out_size: int, start: int, stop: int) -> tuple[int, Tensor]:
    """Rows ``[start, stop)`` of the ``out_size × in_size`` antialiased bilinear resampling matrix.

    The weights of ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` (PIL's
    triangle filter): with ``scale = in/out``, output ``i`` centres at ``scale·(i + ½)``, the filter
    reaches ``max(scale, 1)`` input pixels either side, is stretched by ``max(scale, 1)`` and each
    row is normalised to sum 1. Returns ``(first input index, weights (stop−start) × k)`` where the
    ``k`` columns are the contiguous input indices the rows touch.
    """
    # float32 arithmetic in the order of ATen's ``_compute_indices_min_size_weights_aa``, so the weights
    # match PyTorch's to the last bit or two (float64 would differ from them by up to 3e-5).
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    stretch = max(scale, f32(1.0))
    inv = f32(1.0 / float(scale)) if scale >= 1.0 else f32(1.0)
    centre = (float(scale) * (np.arange(start, stop) + 0.5)).astype(f32)
    first = np.maximum(((centre - stretch).astype(np.float64) + 0.5).astype(np.int64), 0)
    last = np.minimum(((centre + stretch).astype(np.float64) + 0.5).astype(np.int64), in_size)  # exclusive
    lo, hi = int(first.min()), int(last.max())
    j = np.arange(lo, hi)
    x = (((j.astype(f32)[None, :] - centre[:, None]).astype(np.float64) + 0.5) * float(inv)).astype(f32)
    weights = np.where(np.abs(x) < 1.0, f32(1.0) - np.abs(x), f32(0.0))
    weights[(j[None, :] < first[:, None]) | (j[None, :] >= last[:, None])] = 0.0
    weights /= weights.sum(axis=1, keepdims=True, dtype=f32)
    return lo, torch.from_numpy(weights)


def _nearest_exact_rows(in_size: int, out_size: int, start: int, stop: int) -> Tensor:
    """Source indices of outputs ``[start, stop)`` of ``F.interpolate(mode="nearest-exact")``.

    Computed by PyTorch itself on an index ramp, so a windowed label crop equals the full resize's.
    """
    ramp = torch.arange(in_size, dtype=torch.float32)[None, None]
    return F.interpolate(ramp, size=out_size, mode="nearest-exact")[0, 0, start:stop].long()


def _chw(image: np.ndarray) -> Tensor:
    """A float32 C×H×W tensor copy of an H×W×C array (the cached arrays are read-only)."""
    return torch.from_numpy(np.array(image, dtype=np.float32, copy=True)).permute(2, 0, 1)


def _as_uint8(mask: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.uint8, copy=True))


def resize_window(
    image: np.ndarray,
    mask: np.ndarray | None,
    size: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> tuple[Tensor, Tensor | None]:
    """The window ``[rows) × [cols)`` of ``image`` / ``mask`` resized to ``size``, nothing else resized.

    ``image`` (H×W×C float) is resampled as ``F.interpolate(..., "bilinear", antialias=True)`` would
    (separable weights, equal up to float rounding) into C×h×w, ``mask`` (H×W) as
    ``"nearest-exact"`` (exactly) into h×w uint8. The cost follows the window, not the resized
    image: a 128² crop of a ×2 up-scaled 500² image reads ≈ 65² input pixels instead of producing
    1000² output pixels, and only they are copied.
    """
    (h, w), (oh, ow) = image.shape[:2], size
    y0, wy = _aa_bilinear_rows(h, oh, *rows)
    x0, wx = _aa_bilinear_rows(w, ow, *cols)
    patch = _chw(image[y0 : y0 + wy.shape[1], x0 : x0 + wx.shape[1]])
    out = (wy @ patch @ wx.T).clamp_(0.0, 1.0)
    if mask is None:
        return out, None
    src_rows, src_cols = _nearest_exact_rows(h, oh, *rows), _nearest_exact_rows(w, ow, *cols)
    return out, _as_uint8(mask[np.ix_(src_rows.numpy(), src_cols.numpy())])


def weak_view(
    image: np.ndarray,
    mask: np.ndarray | None,
    crop_size: int,
    scale_range: tuple[float, float] | list[float],
    hflip: bool,
    gen: torch.Generator,
    resize_crop_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """UniMatch's weak view: random rescale, pad, random crop, horizontal flip.

    ``image`` is float H×W×C in [0, 1], ``mask`` uint8 H×W (255 = ignore) or None (unlabeled).
    The long side is rescaled by ``s ~ U(scale_range)`` (image bilinear with antialiasing like PIL,
    mask nearest), then padded on the right/bottom to at least ``crop_size`` (image 0, label 255,
    ignore map 255), cropped at a uniform position and flipped with probability 0.5 when ``hflip``.

    ``resize_crop_only`` (``data.resize_crop_only``) draws the same numbers but resamples only the
    crop's window (:func:`resize_window`): labels, ignore map and crop position are identical, image
    values equal up to float rounding, and the view costs a fraction of resizing the whole image.

    Returns ``(img C×S×S float [0, 1], label S×S long, ignore S×S uint8)``; ``ignore`` is 255 on
    padding and 0 elsewhere. Without a mask, ``label`` is all zero (only ``ignore`` is meaningful).
    """
    h, w = image.shape[:2]

    # Random rescale of the long side (UniMatch ``resize(img, mask, ratio_range)``).
    scale = _uniform(gen, float(scale_range[0]), float(scale_range[1]))
    long_side = max(1, int(round(max(h, w) * scale)))
    if h >= w:
        oh, ow = long_side, max(1, int(round(w * long_side / h)))
    else:
        ow, oh = long_side, max(1, int(round(h * long_side / w)))
    if resize_crop_only:
        img, lab, ignore = _resized_crop(image, mask, (oh, ow), crop_size, gen)
    else:
        lab = None if mask is None else _as_uint8(mask)
        img, lab, ignore = _resize_then_crop(_chw(image), lab, (oh, ow), crop_size, gen)
    label = torch.zeros((crop_size, crop_size), dtype=torch.long) if lab is None else lab.long()

    if _coin(gen, 0.5) and hflip:
        img, label, ignore = img.flip(-1), label.flip(-1), ignore.flip(-1)
    return img.contiguous(), label.contiguous(), ignore.contiguous()


def _crop_origin(oh: int, ow: int, crop_size: int, gen: torch.Generator) -> tuple[int, int]:
    """Uniform crop corner in the image padded (right / bottom) to at least ``crop_size``."""
    y = _randint(gen, 0, max(oh, crop_size) - crop_size + 1)
    x = _randint(gen, 0, max(ow, crop_size) - crop_size + 1)
    return y, x


def _resize_then_crop(
    img: Tensor, lab: Tensor | None, size: tuple[int, int], crop_size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Resize the whole image, pad (like UniMatch's ImageOps.expand), crop: the reference path."""
    oh, ow = size
    if (oh, ow) != tuple(img.shape[-2:]):
        img = F.interpolate(img[None], size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)[0]
        img = img.clamp_(0.0, 1.0)
        if lab is not None:
            lab = F.interpolate(lab[None, None].float(), size=(oh, ow), mode="nearest-exact")[0, 0].to(
                torch.uint8
            )
    pad_h, pad_w = max(crop_size - oh, 0), max(crop_size - ow, 0)
    ignore = torch.zeros((oh, ow), dtype=torch.uint8)
    if pad_h or pad_w:
        img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
        ignore = F.pad(ignore, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        if lab is not None:
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    y, x = _crop_origin(oh, ow, crop_size, gen)
    window = (slice(y, y + crop_size), slice(x, x + crop_size))
    return img[(slice(None), *window)], None if lab is None else lab[window], ignore[window]


def _resized_crop(
    image: np.ndarray, mask: np.ndarray | None, size: tuple[int, int], crop_size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The same crop as :func:`_resize_then_crop`, resampling (and copying) only the pixels inside it."""
    oh, ow = size
    y, x = _crop_origin(oh, ow, crop_size, gen)
    rows, cols = (y, min(y + crop_size, oh)), (x, min(x + crop_size, ow))
    ny, nx = rows[1] - rows[0], cols[1] - cols[0]
    if (oh, ow) == tuple(image.shape[:2]):
        inside = _chw(image[rows[0] : rows[1], cols[0] : cols[1]])
        inside_lab = None if mask is None else _as_uint8(mask[rows[0] : rows[1], cols[0] : cols[1]])
    else:
        inside, inside_lab = resize_window(image, mask, (oh, ow), rows, cols)
    out = inside.new_zeros((inside.shape[0], crop_size, crop_size))
    out[:, :ny, :nx] = inside
    ignore = torch.full((crop_size, crop_size), IGNORE_INDEX, dtype=torch.uint8)
    ignore[:ny, :nx] = 0
    out_lab = None
    if inside_lab is not None:
        out_lab = torch.full((crop_size, crop_size), IGNORE_INDEX, dtype=torch.uint8)
        out_lab[:ny, :nx] = inside_lab
    return out, out_lab, ignore


# --------------------------------------------------------------------------------------------
# Strong view
# --------------------------------------------------------------------------------------------


def _blend(img: Tensor, other: Tensor | float, factor: float) -> Tensor:
    return (factor * img + (1.0 - factor) * other).clamp(0.0, 1.0)


def _color_jitter(img: Tensor, jitter: list[float], gen: torch.Generator) -> Tensor:
    """torchvision's ColorJitter (random op order, factors as in ``ColorJitter.get_params``).

    Saturation and hue only exist for 3-channel images; other channel counts get brightness and
    contrast (contrast blends towards the image mean, as torchvision does for greyscale).
    """
    b, c, s, hue = (float(v) for v in jitter)
    order = torch.randperm(4, generator=gen).tolist()
    fb = _uniform(gen, max(0.0, 1 - b), 1 + b) if b > 0 else None
    fc = _uniform(gen, max(0.0, 1 - c), 1 + c) if c > 0 else None
    fs = _uniform(gen, max(0.0, 1 - s), 1 + s) if s > 0 else None
    fh = _uniform(gen, -hue, hue) if hue > 0 else None
    rgb = img.shape[0] == 3
    for op in order:
        if op == 0 and fb is not None:
            img = TF.adjust_brightness(img, fb) if rgb else _blend(img, 0.0, fb)
        elif op == 1 and fc is not None:
            img = TF.adjust_contrast(img, fc) if rgb else _blend(img, img.mean(), fc)
        elif op == 2 and fs is not None and rgb:
            img = TF.adjust_saturation(img, fs)
        elif op == 3 and fh is not None and rgb:
            img = TF.adjust_hue(img, fh)
    return img


def blur_kernel_size(sigma: float, height: int, width: int) -> int:
    """Odd kernel size covering ±``BLUR_TRUNCATE``·σ, kept below the image size (reflect padding)."""
    k = 2 * math.ceil(BLUR_TRUNCATE * sigma) + 1
    limit = min(height, width)
    if k > limit:
        k = limit if limit % 2 else limit - 1
    return max(k, 1)


def strong_view(img: Tensor, cfg: StrongAugConfig, gen: torch.Generator) -> Tensor:
    """UniMatch's strong photometric view of a weak crop (C×H×W float in [0, 1]).

    ColorJitter(``cfg.color_jitter``) with probability ``color_jitter_p``; RandomGrayscale with
    ``grayscale_p`` (3-channel images only); Gaussian blur with σ ~ U(``blur_sigma``) and probability
    ``blur_p`` (kernel ``2⌈3σ⌉+1``, see :func:`blur_kernel_size`). Geometry is unchanged.
    """
    out = img
    if _coin(gen, cfg.color_jitter_p):
        out = _color_jitter(out, cfg.color_jitter, gen)
    if _coin(gen, cfg.grayscale_p) and out.shape[0] == 3:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if _coin(gen, cfg.blur_p):
        sigma = _uniform(gen, float(cfg.blur_sigma[0]), float(cfg.blur_sigma[1]))
        k = blur_kernel_size(sigma, out.shape[-2], out.shape[-1])
        if k > 1:
            out = TF.gaussian_blur(out, [k, k], [sigma, sigma])
    return out.clamp(0.0, 1.0).contiguous()


# --------------------------------------------------------------------------------------------
# CutMix box
# --------------------------------------------------------------------------------------------


def cutmix_box(h: int, w: int, cfg: StrongAugConfig, gen: torch.Generator) -> Tensor:
    """UniMatch's ``obtain_cutmix_box`` for an H×W crop: uint8 {0, 1} box, all zero with prob 1 − p.

    Area ``U(cutmix_area)·H·W``; aspect ``r ~ U(a, 1/a)`` with box width ``√(area/r)`` and height
    ``√(area·r)``; top-left corner uniform over the image; (aspect, corner) are resampled until the box
    lies inside the image (after ``CUTMIX_MAX_TRIES`` the last box is clipped to fit).
    """
    box = torch.zeros((h, w), dtype=torch.uint8)
    if not _coin(gen, cfg.cutmix_p):
        return box
    area = _uniform(gen, float(cfg.cutmix_area[0]), float(cfg.cutmix_area[1])) * h * w
    a = float(cfg.cutmix_aspect)
    lo, hi = min(a, 1.0 / a), max(a, 1.0 / a)
    for _ in range(CUTMIX_MAX_TRIES):
        ratio = _uniform(gen, lo, hi)
        bw, bh = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
        x, y = _randint(gen, 0, w), _randint(gen, 0, h)
        if x + bw <= w and y + bh <= h:
            break
    else:
        bw, bh = min(bw, w), min(bh, h)
        x, y = min(x, w - bw), min(y, h - bh)
    box[y : y + bh, x : x + bw] = 1
    return box
