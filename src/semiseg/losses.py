"""Shared losses. Unlabeled losses follow UniMatch: sum over confident, non-ignored pixels of the
per-pixel cross-entropy, divided by the number of non-ignored pixels (UniMatch's official loss)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import IGNORE_INDEX

if TYPE_CHECKING:
    from .mix_ops import CopyPaste


def supervised_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over labeled pixels (255 = ignore). Zero (with grad) if none is labeled."""
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1e-5, squared: bool = False) -> Tensor:
    """Soft multi-class Dice loss (1 − mean Dice over classes) on labeled pixels.

    Denominator ``Σp + Σt`` per class, or ``Σp² + Σt²`` with ``squared`` (SSL4MIS's ``DiceLoss``,
    used by the official medical UniMatch); sums run over the whole batch."""
    valid = (target != IGNORE_INDEX).float()
    return weighted_dice_loss(logits, target, valid, eps, squared)


def weighted_dice_loss(
    logits: Tensor, target: Tensor, pixel_weight: Tensor, eps: float = 1e-5, squared: bool = False
) -> Tensor:
    """``1 − mean_c (2 Σ w·p_c·t_c + ε) / (Σ w·p_c^k + Σ w·t_c^k + ε)``, k = 2 if ``squared`` else 1.

    ``target`` N×H×W class indices (out-of-range values only where ``pixel_weight`` is 0),
    ``pixel_weight`` N×H×W (0 = pixel left out). Every class counts, background included, also one
    with no pixel (its Dice is then ``ε / (Σ w·p_c^k + ε)``: low when the class is predicted)."""
    num_classes = logits.shape[1]
    w = pixel_weight.unsqueeze(1).to(logits.dtype)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long().clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2)
    onehot = onehot.to(probs.dtype)
    dims = (0, 2, 3)
    inter = (w * probs * onehot).sum(dims)
    p_term = probs * probs if squared else probs
    denom = (w * p_term).sum(dims) + (w * onehot).sum(dims)  # one-hot: t² = t
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def confident_weights(
    confidence: Tensor, ignore: Tensor, threshold: float, pixel_weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-pixel weights of an unlabeled term, ``[conf ≥ τ]·[not ignored]·w``, and the
    not-ignored map ``[not ignored]`` (its sum is the terms' normaliser)."""
    not_ignored = (ignore != IGNORE_INDEX).float()
    weight = (confidence >= threshold).float() * not_ignored
    if pixel_weight is not None:
        weight = weight * pixel_weight
    return weight, not_ignored


def masked_pseudo_dice(
    logits: Tensor,
    pseudo: Tensor,
    confidence: Tensor,
    ignore: Tensor,
    threshold: float,
    pixel_weight: Tensor | None = None,
    squared: bool = True,
) -> Tensor:
    """The official medical UniMatch's unlabeled term: class-averaged soft Dice between
    ``softmax(logits)`` and the one-hot pseudo-label over confident, non-ignored pixels
    (``ignore = conf < τ``), squared-sum denominators, background included."""
    weight, _ = confident_weights(confidence, ignore, threshold, pixel_weight)
    return weighted_dice_loss(logits, pseudo, weight, squared=squared)


def class_balance_weights(prior: Tensor, floor: float = 1e-4) -> Tensor:
    """Per-class CE weights ``w_c = 1 / (C·π_c)`` (``Σ_c π_c·w_c = 1``: the mean weight of a pixel
    drawn from the prior is 1), ``π`` floored at ``floor``."""
    return 1.0 / (prior.numel() * prior.clamp_min(floor))


def masked_pseudo_ce(
    logits: Tensor,
    pseudo: Tensor,
    confidence: Tensor,
    ignore: Tensor,
    threshold: float,
    pixel_weight: Tensor | None = None,
    class_weight: Tensor | None = None,
) -> Tensor:
    """UniMatch's unlabeled loss: ``Σ CE·[conf ≥ τ]·[not ignored]·w / #not-ignored``.

    ``pseudo`` N×H×W class indices, ``confidence`` N×H×W, ``ignore`` N×H×W (255 = ignored pixel),
    ``pixel_weight`` an optional N×H×W multiplier (MPMC's λ_s), ``class_weight`` optional per-class
    CE weights (class-balanced CE; the normalisation stays ``#not-ignored``).
    """
    ce = F.cross_entropy(logits, pseudo.long().clamp_min(0), reduction="none")
    if class_weight is not None:
        ce = ce * class_weight.to(ce.dtype)[pseudo.long().clamp(0, class_weight.numel() - 1)]
    weight, not_ignored = confident_weights(confidence, ignore, threshold, pixel_weight)
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
    weight, not_ignored = confident_weights(confidence, ignore, threshold, pixel_weight)
    return (mse * weight).sum() / not_ignored.sum().clamp_min(1.0)


DICE_EPS = 1e-10  # the released DiceLoss's smoothing


def mix_loss(
    logits: Tensor, mix: CopyPaste, mask: Tensor, dice_weight: float = 1.0, squared: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L_mix, Σ_R w_R·CE_R, Σ_R w_R·Dice_R)`` of ``logits`` (N×C×H×W) against a mixed half batch,
    the two regions of ``mask`` (H×W, 1 outside the box) scored apart (:mod:`semiseg.methods.bcp`; the
    released ``mix_loss``): ``L_mix = (CE + w·Dice)/(1 + w)``, ``w = dice_weight``."""
    logits = logits.float()
    num_classes = logits.shape[1]
    target = mix.target.long().masked_fill(~mix.valid, 0).clamp_max(num_classes - 1)
    ce_map = F.cross_entropy(logits, target, reduction="none")
    outside = mask.bool().expand_as(mix.valid)
    ce = dice = logits.new_zeros(())
    for region, weight in ((outside, mix.weight_out), (~outside, mix.weight_in)):
        used = region & mix.valid
        q = mix.teach.float() * used
        ce = ce + weight * (ce_map * q).sum() / used.sum().clamp_min(1)
        dice = dice + weight * weighted_dice_loss(logits, target, q, eps=DICE_EPS, squared=squared)
    return (ce + dice_weight * dice) / (1.0 + dice_weight), ce, dice
