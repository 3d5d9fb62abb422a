"""Tensor functions of the MPMC plug-in (:mod:`semiseg.plugins.mpmc`, which re-exports them): the
patch each head location sees and its multi-label targets (eq. 3), λ_s at pixels (eq. 5), the patch
losses (eq. 3–4 and 6), and the probe that measures a tap's stride and receptive field. None of them
refers to the plug-in class; the definitions are in docs/methods/mpmc.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.base import Segmenter
from ..modes import eval_mode
from ..types import IGNORE_INDEX

#: Probe sizes (pixels) tried in turn until the tap's receptive field fits inside the probe.
PROBE_SIZES: tuple[int, ...] = (64, 128, 256, 512)


# ----------------------------------------------------------------------------------------------
# Patch geometry and targets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchGeometry:
    """Per axis, tap location ``i`` sees input pixels ``[stride·i + offset, stride·i + offset + size)``."""

    size: int
    stride: int
    offset: int

    @property
    def center(self) -> float:
        """Centre (in pixels) of location 0's patch; location ``i``'s is ``center + stride·i``."""
        return self.offset + (self.size - 1) / 2


def pool_patches(x: Tensor, geom: PatchGeometry, out_size: tuple[int, int]) -> Tensor:
    """Max of ``x`` (N×C×H×W) over every location's patch → N×C×h×w (``out_size``); pixels outside
    the image count as 0 (the padding / cropping of F.pad makes window ``i`` start at ``s·i``)."""
    k, s, o = geom.size, geom.stride, geom.offset
    (h, w), (H, W) = out_size, x.shape[-2:]
    pad = (-o, s * (w - 1) + o + k - W, -o, s * (h - 1) + o + k - H)  # negative = crop
    return F.max_pool2d(F.pad(x, pad), kernel_size=k, stride=s)


def patch_targets(
    labels: Tensor, num_classes: int, geom: PatchGeometry, out_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Multi-label patch targets of eq. 3: ``(y N×C×h×w in {0,1}, valid N×h×w bool)``.

    ``y[n, c, i, j] = 1`` when class ``c`` occurs in location ``(i, j)``'s patch of ``labels[n]``
    (N×H×W, 255 = ignore: no class); ``valid`` is False where the patch holds only ignore pixels."""
    ignored = labels == IGNORE_INDEX
    index = labels.long().masked_fill(ignored, num_classes).clamp(0, num_classes).unsqueeze(1)
    n, h, w = labels.shape
    one_hot = torch.zeros(n, num_classes + 2, h, w, device=labels.device).scatter_(1, index, 1.0)
    one_hot[:, num_classes + 1] = (~ignored).float()  # channel C: ignore (dropped); C + 1: "present"
    pooled = pool_patches(one_hot, geom, out_size)
    return pooled[:, :num_classes], pooled[:, num_classes + 1] > 0


def nearest_location(length: int, geom: PatchGeometry, n_locations: int, device: torch.device) -> Tensor:
    """For each pixel ``0..length−1`` along one axis, the location whose patch is centred nearest."""
    pixels = torch.arange(length, device=device, dtype=torch.float32)
    return torch.floor((pixels - geom.center) / geom.stride + 0.5).long().clamp(0, n_locations - 1)


def pixel_confidence(gamma: Tensor, pseudo: Tensor, geom: PatchGeometry) -> Tensor:
    """λ_s of eq. 5: ``gamma`` N×C×h×w, ``pseudo`` N×H×W class indices → N×H×W, the confidence of the
    pixel's pseudo-label class at the location covering it (the nearest patch centre)."""
    (h, w), (H, W) = gamma.shape[-2:], pseudo.shape[-2:]
    rows = nearest_location(H, geom, h, gamma.device)
    cols = nearest_location(W, geom, w, gamma.device)
    images = torch.arange(gamma.shape[0], device=gamma.device)[:, None, None]
    classes = pseudo.long().clamp(0, gamma.shape[1] - 1)
    return gamma[images, classes, rows[None, :, None], cols[None, None, :]]  # N×H×W, no N×C×H×W copy


def location_sources(sources: Tensor, geom: PatchGeometry, out_size: tuple[int, int]) -> Tensor:
    """Provenance (``SOURCE_*``) of each location's centre pixel: ``sources`` N×H×W → N×h×w."""
    (h, w), (H, W) = out_size, sources.shape[-2:]

    def centres(n: int, size: int) -> Tensor:  # rounded half up, as nearest_location
        positions = geom.center + geom.stride * torch.arange(n, device=sources.device, dtype=torch.float32)
        return torch.floor(positions + 0.5).long().clamp(0, size - 1)

    rows, cols = centres(h, H), centres(w, W)
    return sources[:, rows][:, :, cols]


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def asymmetric_loss(
    logits: Tensor, targets: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 1.0
) -> Tensor:
    """Element-wise asymmetric focal loss (eq. 3, Ridnik et al. 2021), as a positive loss:
    ``−(1 − q)^γ+·log q`` where the target is 1, ``−q^γ−·log(1 − q)`` where it is 0, ``q = σ(logits)``.

    Powers are computed as ``exp(γ·log σ(·))``, finite with finite gradients for saturated logits."""
    logits = logits.float()
    log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = torch.exp(gamma_pos * log_not_q) * log_q
    neg = torch.exp(gamma_neg * log_q) * log_not_q
    return -(targets * pos + (1.0 - targets) * neg)


def masked_location_mean(per_location: Tensor, valid: Tensor) -> Tensor:
    """Mean of an N×h×w map over the valid locations (0 when there is none)."""
    v = valid.to(per_location.dtype)
    return (per_location * v).sum() / v.sum().clamp_min(1.0)


def labeled_patch_loss(
    logits: Tensor, targets: Tensor, valid: Tensor, gamma_pos: float, gamma_neg: float
) -> Tensor:
    """``L_l^M`` (eq. 3–4): eq. 3's class mean per location, averaged over valid locations and images
    (eq. 4 sums over locations; the mean keeps the weight independent of the crop size)."""
    return masked_location_mean(asymmetric_loss(logits, targets, gamma_pos, gamma_neg).mean(1), valid)


def unlabeled_patch_loss(
    student_logits: Tensor, teacher_logits: Tensor, gamma: Tensor, valid: Tensor, hard: bool = False
) -> Tensor:
    """``L_u^M`` (eq. 6): ``1/C Σ_c λ_m·BCE(q̂, q)`` per location, averaged over valid locations and
    images; ``λ_m = gamma`` (N×C×h×w), target ``q = σ(teacher)`` or ``[q ≥ ½]`` when ``hard``."""
    teacher = teacher_logits.detach().float()
    target = (teacher >= 0).float() if hard else torch.sigmoid(teacher)
    bce = F.binary_cross_entropy_with_logits(student_logits.float(), target, reduction="none")
    return masked_location_mean((gamma.detach() * bce).mean(1), valid)


# ----------------------------------------------------------------------------------------------
# Probing the tap
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapProbe:
    """What one encoder feature is: its ``index``, ``channels``, ``stride`` and receptive ``field``
    ``(first, last)`` pixel of location 0 (relative offsets; None if larger than every probe)."""

    index: int
    channels: int
    stride: int
    field: tuple[int, int] | None


def probe_tap(model: Segmenter, tap: int | None, sizes: tuple[int, ...] = PROBE_SIZES) -> TapProbe:
    """Find the tap's index, width, stride and receptive field: encode random ``size²`` inputs (eval
    mode, a private generator) and back-propagate from the central location to the input; the
    non-zero rows of the input gradient are the location's receptive field (rows and columns are
    assumed alike). Sizes grow until the field no longer touches the probe's border."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    probe: TapProbe | None = None
    smallest = int(getattr(model, "min_size", 1))  # e.g. a deep U-Net's 2^levels
    usable = tuple(size for size in sizes if size >= smallest) or (smallest, 2 * smallest)
    with eval_mode(model), torch.enable_grad():
        for size in usable:
            x = torch.randn(2, model.in_channels, size, size, generator=gen).to(param).requires_grad_(True)
            feats = model.encode(x)
            index = _resolve_tap(tap, feats, size)
            f = feats[index]
            h, w = f.shape[-2:]
            stride = max(1, round(size / h))
            (grad,) = torch.autograd.grad(f[:, :, h // 2, w // 2].sum(), x)
            rows = (grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero().flatten()
            if rows.numel() == 0:
                raise ConfigError(f"plugins.mpmc.tap: encoder feature {index} does not depend on the input")
            first, last = int(rows.min()), int(rows.max())
            inside = first > 0 and last < size - 1
            field = (first - stride * (h // 2), last - stride * (h // 2)) if inside else None
            probe = TapProbe(index, int(f.shape[1]), stride, field)
            if inside:
                break
    assert probe is not None
    return probe


def _resolve_tap(tap: int | None, feats: list[Tensor], size: int) -> int:
    """``tap`` as a non-negative index; ``None``: the first feature with stride > 1 (else 0)."""
    if tap is None:
        strides = [size / f.shape[-2] for f in feats]
        return next((i for i, s in enumerate(strides) if s > 1), 0)
    if not -len(feats) <= tap < len(feats):
        raise ConfigError(f"plugins.mpmc.tap: {tap} is out of range (the model has {len(feats)} features)")
    return tap % len(feats)


def patch_geometry(probe: TapProbe, patch_size: int | None) -> PatchGeometry:
    """Patch of each tap location: the measured receptive field, or ``patch_size`` centred on the
    field's centre (the stride cell's centre when the field is larger than every probe); the stride
    is the tap's (location ``i`` of the feature map is at ``stride·i``)."""
    stride = probe.stride
    if probe.field is None:
        if patch_size is None:
            raise ConfigError(
                f"plugins.mpmc.patch_size: the receptive field of encoder feature {probe.index} exceeds "
                f"{PROBE_SIZES[-1]} pixels; set patch_size"
            )
        center = (probe.stride - 1) / 2
    else:
        center = (probe.field[0] + probe.field[1]) / 2
    size = patch_size or probe.field[1] - probe.field[0] + 1  # type: ignore[index]
    return PatchGeometry(size, stride, math.floor(center - (size - 1) / 2))
