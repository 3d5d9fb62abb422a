"""The built-in procedural dataset: no download, deterministic from a seed.

Each image looks loosely like a fundus photograph: a smooth, unevenly lit reddish background with
pixel noise and a bright, blurry optic-disc-like spot (background class, a distractor); thin
branching curvilinear structures (class 1 "vessel", 1–3 px wide random-walk trunks with
branches, darker and redder than the background, soft edges); irregular blob lesions (class 2,
brighter and yellowish, textured); and with ``num_classes=4`` a second blob kind (class 3,
dark, speckled). Foreground is about 5–10 % of the pixels, most of it vessel: a strongly
imbalanced, learnable but noisy task. One 96×96 sample takes a few milliseconds.

Records: ``Record(name="synthetic_<part>_<i>", image="synthetic(...)", reader="synthetic",
index=<generator seed>)``. The seeds of train pool, val and test come from disjoint fixed ranges
(:data:`SEED_OFFSETS`), so the test images do not change when the pool size does. ``image`` spells
the generator's parameters (size, channels, classes) so that records of differently configured
synthetic datasets never share a cache entry in :func:`semiseg.data.io.read_record`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..config import DataConfig
from ..errors import DataError
from .base import DatasetSource, Record, register_dataset
from .io import register_reader

CLASS_NAMES = ["background", "vessel", "lesion", "lesion_b"]
PALETTE = [(0, 0, 0), (255, 255, 255), (255, 200, 0), (0, 120, 255)]
SEED_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # disjoint seed ranges per part


@dataclass(frozen=True)
class SyntheticStyle:
    """Appearance knobs of the generator (the defaults define the built-in dataset)."""

    vessel_fraction: tuple[float, float] = (0.045, 0.075)  # target share of vessel pixels
    vessel_width: tuple[int, int] = (1, 3)  # trunk width range in px (branches get thinner)
    vessel_step: float = 2.0  # random-walk step (px)
    vessel_turn: float = 0.25  # std of the heading change per step (rad)
    branch_p: float = 0.06  # per-step probability of spawning a branch
    vessel_darkening: tuple[float, float] = (0.55, 0.75)  # intensity multiplier inside vessels
    lesions: tuple[int, int] = (1, 3)  # number of class-2 blobs (inclusive)
    lesions_b: tuple[int, int] = (1, 2)  # number of class-3 blobs (inclusive) when num_classes=4
    lesion_radius: tuple[float, float] = (0.035, 0.07)  # blob radius as a fraction of the side
    lesion_roughness: float = 0.25  # radial noise of the blob outline
    noise_std: float = 0.035  # additive pixel noise
    illumination: float = 0.45  # vignette strength (0 = flat)
    background_grid: int = 6  # resolution of the smooth background noise
    disc_radius: float = 0.09  # optic-disc-like distractor radius (fraction of the side)


STYLE = SyntheticStyle()

# RGB colours (0..1) of the parts; greyscale and other channel counts are derived from them.
_BACKGROUND_RGB = np.array([0.72, 0.36, 0.20], dtype=np.float32)
_VESSEL_TINT = np.array([0.95, 0.55, 0.60], dtype=np.float32)  # redder: green/blue drop more
_LESION_RGB = np.array([0.98, 0.88, 0.45], dtype=np.float32)
_LESION_B_RGB = np.array([0.30, 0.08, 0.10], dtype=np.float32)
_DISC_RGB = np.array([0.98, 0.85, 0.60], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid upsampled bicubically."""
    small = (rng.random((grid, grid)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0


def _random_walk(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    start: tuple[float, float],
    heading: float,
    width: int,
    budget: float,
    size: int,
    style: SyntheticStyle,
    depth: int = 0,
) -> float:
    """Draw one vessel (and its branches) as a polyline random walk; return the length drawn."""
    x, y = start
    drawn = 0.0
    points = [(x, y)]
    branches: list[tuple[tuple[float, float], float, int]] = []
    while drawn < budget:
        heading += rng.normal(0.0, style.vessel_turn)
        x += style.vessel_step * np.cos(heading)
        y += style.vessel_step * np.sin(heading)
        if not (-2 <= x <= size + 1 and -2 <= y <= size + 1):
            break
        points.append((x, y))
        drawn += style.vessel_step
        if depth < 3 and rng.random() < style.branch_p:
            side = 1.0 if rng.random() < 0.5 else -1.0
            branches.append(((x, y), heading + side * rng.uniform(0.4, 1.1), max(1, width - 1)))
    if len(points) > 1:
        draw.line(points, fill=1, width=width, joint="curve")
    for origin, head, w in branches:
        if drawn >= budget:
            break
        drawn += _random_walk(draw, rng, origin, head, w, (budget - drawn) * 0.5, size, style, depth + 1)
    return drawn


def _blob(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, style: SyntheticStyle, value: int):
    """An irregular ellipse (noisy radial outline) filled with ``value``."""
    r = rng.uniform(*style.lesion_radius) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    aspect = rng.uniform(0.6, 1.4)
    angle = rng.uniform(0, np.pi)
    n = 16
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = r * (1 + style.lesion_roughness * rng.uniform(-1, 1, size=n))
    px, py = radius * np.cos(t) * aspect, radius * np.sin(t) / aspect
    ca, sa = np.cos(angle), np.sin(angle)
    pts = [(cx + ca * a - sa * b, cy + sa * a + ca * b) for a, b in zip(px, py)]
    draw.polygon(pts, fill=value)


def _to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """H×W×3 -> H×W×channels: 1 = green-weighted luminance (as fundus greyscale), 3 = RGB, other
    counts cycle through R, G, B with a small per-channel gain."""
    if channels == 3:
        return rgb
    lum = rgb @ np.array([0.3, 0.59, 0.11], dtype=np.float32)
    if channels == 1:
        return lum[..., None]
    gains = 1.0 - 0.1 * (np.arange(channels) // 3)
    return np.stack([rgb[..., c % 3] * gains[c] for c in range(channels)], axis=-1)


def generate_sample(
    seed: int, size: int, num_classes: int, channels: int, style: SyntheticStyle = STYLE
) -> tuple[np.ndarray, np.ndarray]:
    """One procedural image and mask: ``(float32 size×size×channels in [0, 1], uint8 size×size)``.

    Mask values: 0 background, 1 vessel, 2 lesion (``num_classes >= 3``), 3 second lesion kind
    (``num_classes == 4``). A pure function of its arguments.
    """
    if not 2 <= num_classes <= 4:
        raise DataError(f"data.synthetic.num_classes: must be 2, 3 or 4, got {num_classes}")
    if channels < 1 or size < 16:
        raise DataError(f"data.synthetic: need channels >= 1 and size >= 16, got {channels}, {size}")
    rng = np.random.default_rng(seed)

    # Background: colour jittered per image, smooth texture, vignette illumination, optic disc.
    base = _BACKGROUND_RGB * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    texture = 0.8 + 0.4 * _smooth_noise(rng, size, style.background_grid)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.35, 0.65, size=2)
    dist2 = (xx - cx) ** 2 + (yy - cy) ** 2
    light = 1.0 - style.illumination * np.clip(dist2 / 0.5, 0, 1)
    rgb = base[None, None, :] * (texture * light)[..., None]
    dx, dy = rng.uniform(0.2, 0.8, size=2)
    disc = np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * style.disc_radius**2))
    rgb = rgb * (1 - 0.6 * disc[..., None]) + 0.6 * disc[..., None] * _DISC_RGB

    # Vessels: random-walk trunks (from near the disc, or the border) until the pixel budget is used.
    vessel_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(vessel_img)
    target = rng.uniform(*style.vessel_fraction) * size * size
    mean_width = (style.vessel_width[0] + style.vessel_width[1]) / 2
    length_budget = target / mean_width
    drawn, trunks = 0.0, 0
    while drawn < length_budget and trunks < 40:
        if rng.random() < 0.6:
            start = (dx * size + rng.normal(0, 2), dy * size + rng.normal(0, 2))
        else:
            start = tuple(rng.uniform(0, size, size=2))
        heading = rng.uniform(0, 2 * np.pi)
        width = int(rng.integers(style.vessel_width[0], style.vessel_width[1] + 1))
        drawn += _random_walk(draw, rng, start, heading, width, length_budget - drawn, size, style)
        trunks += 1
    vessels = np.asarray(vessel_img, dtype=np.uint8)
    soft = np.asarray(vessel_img.point(lambda v: 255 if v else 0).filter(ImageFilter.GaussianBlur(0.6)))
    soft = (soft.astype(np.float32) / 255.0)[..., None]
    dark = rng.uniform(*style.vessel_darkening)
    rgb = rgb * (1 - soft) + rgb * dark * _VESSEL_TINT * soft

    mask = vessels.copy()
    # Lesions: bright textured blobs (class 2), then dark speckled blobs (class 3).
    kinds = []
    if num_classes >= 3:
        kinds.append((2, style.lesions, _LESION_RGB, 0.5))
    if num_classes >= 4:
        kinds.append((3, style.lesions_b, _LESION_B_RGB, 0.15))
    for value, count, colour, grain in kinds:
        blob_img = Image.new("L", (size, size), 0)
        blob_draw = ImageDraw.Draw(blob_img)
        for _ in range(int(rng.integers(count[0], count[1] + 1))):
            _blob(blob_draw, rng, size, style, 1)
        blob = np.asarray(blob_img, dtype=bool)
        if grain > 0.3:  # lesion: smooth mottled texture
            tex = 0.75 + 0.5 * _smooth_noise(rng, size, max(4, size // 8))
        else:  # lesion_b: fine speckle
            tex = 0.6 + 0.8 * (rng.random((size, size)) < 0.5).astype(np.float32)
        alpha = 0.75
        blended = (1 - alpha) * rgb + alpha * colour[None, None, :] * tex[..., None]
        rgb = np.where(blob[..., None], blended, rgb)
        mask[blob] = value

    rgb = rgb + rng.normal(0.0, style.noise_std, size=rgb.shape).astype(np.float32)
    image = np.clip(_to_channels(rgb.astype(np.float32), channels), 0.0, 1.0).astype(np.float32)
    return image, mask


# --------------------------------------------------------------------------------------------
# Dataset builder and reader
# --------------------------------------------------------------------------------------------


def _image_key(cfg: DataConfig) -> str:
    s = cfg.synthetic
    return f"synthetic(size={s.size},channels={s.channels},classes={s.num_classes})"


@register_reader("synthetic")
def read_synthetic(record: Record, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Generate the record's image from ``record.index`` (the seed) and ``cfg.synthetic``."""
    if record.index is None:
        raise DataError(f"{record.name}: synthetic record has no seed (Record.index)")
    s = cfg.synthetic
    image, mask = generate_sample(record.index, s.size, s.num_classes, s.channels)
    return image, (mask if record.mask is not None else None)


@register_dataset("synthetic")
def build_synthetic(cfg: DataConfig) -> DatasetSource:
    """Train pool / val / test records of the procedural dataset (sizes from ``cfg.synthetic``)."""
    s = cfg.synthetic
    if s.num_classes not in (2, 3, 4):
        raise DataError(f"data.synthetic.num_classes: must be 2, 3 or 4, got {s.num_classes}")
    parts = {"train": s.num_labeled_pool, "val": s.num_val, "test": s.num_test}
    stride = min(b - a for a, b in zip(sorted(SEED_OFFSETS.values()), sorted(SEED_OFFSETS.values())[1:]))
    for part, count in parts.items():
        if not 0 <= count <= stride:
            raise DataError(f"data.synthetic: {part} size must be in [0, {stride}], got {count}")
    key = _image_key(cfg)

    def records(part: str) -> list[Record]:
        return [
            Record(
                name=f"synthetic_{part}_{i:04d}",
                image=key,
                mask=key,
                reader="synthetic",
                index=SEED_OFFSETS[part] + i,
            )
            for i in range(parts[part])
        ]

    return DatasetSource(
        train_pool=records("train"),
        val=records("val"),
        test=records("test"),
        class_names=CLASS_NAMES[: s.num_classes],
        in_channels=s.channels,
        palette=PALETTE[: s.num_classes],
    )
