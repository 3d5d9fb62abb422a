"""Shared losses. Unlabeled losses follow UniMatch: sum over confident, non-ignored pixels of the
per-pixel cross-entropy, divided by the number of non-ignored pixels (DESIGN §3.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .data.base import IGNORE_INDEX


def supervised_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over labeled pixels (255 = ignore). Zero (with grad) if none is labeled."""
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Soft multi-class Dice loss (1 − mean Dice over classes) on labeled pixels."""
    num_classes = logits.shape[1]
    valid = (target != IGNORE_INDEX).unsqueeze(1).float()
    probs = logits.softmax(dim=1) * valid
    onehot = F.one_hot(target.long().clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    onehot = onehot * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def masked_pseudo_ce(
    logits: Tensor,
    pseudo: Tensor,
    confidence: Tensor,
    ignore: Tensor,
    threshold: float,
    pixel_weight: Tensor | None = None,
) -> Tensor:
    """UniMatch's unlabeled loss: ``Σ CE·[conf ≥ τ]·[not ignored]·w / #not-ignored``.

    ``pseudo`` N×H×W class indices, ``confidence`` N×H×W, ``ignore`` N×H×W (255 = ignored pixel),
    ``pixel_weight`` an optional N×H×W multiplier (MPMC's λ_s).
    """
    ce = F.cross_entropy(logits, pseudo.long().clamp_min(0), reduction="none")
    not_ignored = (ignore != IGNORE_INDEX).float()
    weight = (confidence >= threshold).float() * not_ignored
    if pixel_weight is not None:
        weight = weight * pixel_weight
    return (ce * weight).sum() / not_ignored.sum().clamp_min(1.0)


def pseudo_label(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Detached (class, confidence) of a prediction."""
    with torch.no_grad():
        probs = logits.detach().softmax(dim=1)
        confidence, label = probs.max(dim=1)
    return label, confidence


def masked_softmax_mse(
    logits: Tensor,
    target_probs: Tensor,
    confidence: Tensor,
    ignore: Tensor,
    threshold: float = 0.0,
    pixel_weight: Tensor | None = None,
) -> Tensor:
    """Mean Teacher's consistency: per-pixel ``mean_c (softmax(logits) − p_teacher)²``, summed over
    pixels with ``conf ≥ τ`` that are not ignored (times ``pixel_weight``), divided by the number of
    non-ignored pixels — the normalisation of :func:`masked_pseudo_ce`."""
    mse = (logits.softmax(dim=1) - target_probs.detach()).pow(2).mean(dim=1)
    not_ignored = (ignore != IGNORE_INDEX).float()
    weight = (confidence >= threshold).float() * not_ignored
    if pixel_weight is not None:
        weight = weight * pixel_weight
    return (mse * weight).sum() / not_ignored.sum().clamp_min(1.0)
