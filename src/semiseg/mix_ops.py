"""Strong-view mixing as pure tensor functions, used by the mixers of :mod:`semiseg.mixers` (which
re-exports everything here).

A mix pastes, under a binary mask ``M`` (N×H×W), a *source* onto a *target*. Both are
:class:`MixSample` tuples ``(image, label, confidence, ignore[, weight])``::

    x_mix = M·x_src + (1 − M)·x_tgt,   y_mix = M·y_src + (1 − M)·y_tgt     (SupMix paper eq. 5–6, 10–11)

:func:`paste` is the only place where pixels are combined; the mask builders (:func:`cutmix_mask`,
:func:`classmix_mask`, :func:`supmix_mask`) decide ``M``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .types import IGNORE_INDEX


class MixSample(NamedTuple):
    """One side of a mix. ``image`` N×C×H×W; ``label`` N×H×W class indices; ``confidence`` N×H×W in
    [0, 1]; ``ignore`` N×H×W (255 = ignored pixel, anything else = used); ``weight`` an optional N×H×W
    per-pixel loss weight (``None`` = all ones); ``source`` an optional N×H×W uint8 provenance map
    (:data:`~semiseg.types.SOURCE_OWN` / ``SOURCE_PARTNER`` / ``SOURCE_LABELED``) that the mix
    carries like the label, so plug-ins can tell which image each pixel of a mixed view came from."""

    image: Tensor
    label: Tensor
    confidence: Tensor
    ignore: Tensor
    weight: Tensor | None = None
    source: Tensor | None = None

    def flip(self) -> MixSample:
        """The mix partner of every sample: the same batch in reverse order (``flip(0)``, as UniMatch-V2;
        UniMatch's official code draws a second, independent unlabeled batch instead)."""
        return MixSample(*(t.flip(0) if t is not None else None for t in self))

    def select(self, index: Tensor) -> MixSample:
        """Samples ``index`` (a LongTensor of batch indices) of every field."""
        return MixSample(*(t[index] if t is not None else None for t in self))


def paste(target: MixSample, source: MixSample, mask: Tensor) -> MixSample:
    """Where ``mask`` (N×H×W, bool or {0,1}) is set every field comes from ``source``, elsewhere from
    ``target`` (SupMix paper eq. 5–6 / 10–11, applied to image, label, confidence, ignore and weight).

    Dtypes follow ``target``. A missing ``weight`` counts as ones on the side where it is missing;
    the result has a weight when either side has one. ``source`` is mixed when both sides have one
    (a provenance map on one side only is an error: the other side's origin would be unknown).
    """
    m = mask.bool()
    if m.shape != target.label.shape or m.shape != source.label.shape:
        raise ValueError(
            f"paste: mask {tuple(m.shape)}, target {tuple(target.label.shape)} and source "
            f"{tuple(source.label.shape)} must have the same N×H×W shape"
        )
    image = torch.where(m.unsqueeze(1), source.image.to(target.image.dtype), target.image)
    label = torch.where(m, source.label.to(target.label.dtype), target.label)
    confidence = torch.where(m, source.confidence.to(target.confidence.dtype), target.confidence)
    ignore = torch.where(m, source.ignore.to(target.ignore.dtype), target.ignore)
    weight = None
    if target.weight is not None or source.weight is not None:
        t_w = target.weight if target.weight is not None else torch.ones_like(target.confidence)
        s_w = source.weight if source.weight is not None else torch.ones_like(t_w)
        weight = torch.where(m, s_w.to(t_w.dtype), t_w)
    if (target.source is None) != (source.source is None):
        raise ValueError("paste: a provenance map (source) on one side only")
    origin = None if target.source is None else torch.where(m, source.source, target.source)
    return MixSample(image, label, confidence, ignore, weight, origin)


# ----------------------------------------------------------------------------------------------
# Mask builders
# ----------------------------------------------------------------------------------------------


def cutmix_mask(box: Tensor) -> Tensor:
    """CutMix: the data pipeline's box (N×H×W, 1 inside, all zero when no box was drawn)."""
    return box == 1


def present_classes(label: Tensor, ignore: Tensor | None = None, exclude: tuple[int, ...] = ()) -> Tensor:
    """Sorted classes occurring in one H×W ``label`` at non-ignored pixels, minus ``exclude``.

    ``IGNORE_INDEX`` is never a class. ``ignore`` (H×W, 255 = ignored) masks pixels out."""
    values = label if ignore is None else label[ignore != IGNORE_INDEX]
    classes = torch.unique(values)
    drop = torch.tensor([IGNORE_INDEX, *exclude], dtype=classes.dtype, device=classes.device)
    return classes[~torch.isin(classes, drop)]


def choose_classes(candidates: Tensor, k: int, weights: Tensor | None = None) -> Tensor:
    """``k`` distinct classes out of ``candidates``: uniformly (``weights`` None) or with probability
    proportional to ``weights[c]`` (``weights`` indexed by class id, sampled without replacement)."""
    n = candidates.numel()
    k = min(k, n)
    if k <= 0:
        return candidates[:0]
    if weights is None:
        return candidates[torch.randperm(n, device=candidates.device)[:k]]
    w = weights.to(candidates.device)[candidates.long()].float().clamp_min(0)
    if not bool((w > 0).any()):
        w = torch.ones_like(w)
    return candidates[torch.multinomial(w, k, replacement=False)]


def classmix_count(n: int, rounding: Literal["ceil", "floor"] = "ceil") -> int:
    """How many of ``n`` present classes ClassMix pastes: half of them, rounded up (the official
    ClassMix code, ``(n + n % 2) / 2``) or down (the SupMix paper's eq. 3 description of ClassMix)."""
    return math.ceil(n / 2) if rounding == "ceil" else n // 2


def supmix_count(n: int) -> int:
    """SupMix's ``k = max(1, ⌊n/2⌋)`` of ``n`` candidate classes (SupMix paper eq. 8); 0 when n = 0."""
    return max(1, n // 2) if n > 0 else 0


def class_mask(label: Tensor, chosen: list[Tensor]) -> Tensor:
    """``M[i] = label[i] ∈ chosen[i]`` (SupMix eq. 9 / ClassMix eq. 4), N×H×W bool."""
    return torch.stack([torch.isin(label[i], c.to(label.dtype)) for i, c in enumerate(chosen)])


def classmix_mask(
    label: Tensor, ignore: Tensor | None = None, rounding: Literal["ceil", "floor"] = "ceil"
) -> Tensor:
    """ClassMix mask from the partner's pseudo-labels ``label`` (N×H×W): per sample, a uniformly random
    half (:func:`classmix_count`) of the classes present at its non-ignored pixels; ``M = label ∈ chosen``."""
    chosen = []
    for i in range(label.shape[0]):
        cands = present_classes(label[i], None if ignore is None else ignore[i])
        chosen.append(choose_classes(cands, classmix_count(cands.numel(), rounding)))
    return class_mask(label, chosen)


def supmix_mask(
    label: Tensor, exclude: tuple[int, ...] = (0,), class_weights: Tensor | None = None
) -> tuple[Tensor, list[Tensor]]:
    """SupMix mask from ground truth ``label`` (N×H×W, 255 = ignore) of labeled weak views (eq. 8–9).

    Per sample: candidates ``C_selected`` = classes present minus ``exclude`` (default background 0)
    minus ignore; choose ``k = max(1, ⌊n/2⌋)`` of them — uniformly (the paper) or proportionally to
    ``class_weights`` (indexed by class id); ``M = label ∈ chosen``. A sample with no candidate class
    gets an all-zero mask. Returns ``(mask, chosen classes per sample)``."""
    chosen = []
    for i in range(label.shape[0]):
        cands = present_classes(label[i], exclude=exclude)
        chosen.append(choose_classes(cands, supmix_count(cands.numel()), class_weights))
    return class_mask(label, chosen), chosen


def match_size(sample: MixSample, size: tuple[int, int]) -> MixSample:
    """Resize a labeled source to the target's H×W (image bilinear, the rest nearest) when the two crops
    differ; a no-op in the usual case where labeled and unlabeled crops have the same size."""
    if tuple(sample.label.shape[-2:]) == tuple(size):
        return sample

    def nearest(t: Tensor) -> Tensor:
        return F.interpolate(t.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1).to(t.dtype)

    image = F.interpolate(sample.image, size=size, mode="bilinear", align_corners=False)
    weight = None if sample.weight is None else nearest(sample.weight)
    source = None if sample.source is None else nearest(sample.source)
    return MixSample(
        image, nearest(sample.label), nearest(sample.confidence), nearest(sample.ignore), weight, source
    )


def labeled_source(x_l: Tensor, y_l: Tensor, n_u: int, with_weight: bool) -> MixSample:
    """SupMix's source for unlabeled sample ``i``: labeled sample ``i mod n_l`` with its ground truth,
    confidence 1 (SupMix paper eq. 11: pasted pixels are ground truth) and weight 1; 255 pixels
    marked ignored."""
    index = torch.arange(n_u, device=x_l.device) % x_l.shape[0]
    y = y_l[index]
    ones = torch.ones(y.shape, device=x_l.device)
    ignore = torch.where(y == IGNORE_INDEX, IGNORE_INDEX, 0).to(torch.uint8)
    return MixSample(x_l[index], y, ones, ignore, ones if with_weight else None)


# ----------------------------------------------------------------------------------------------
# BCP's box copy-paste (semiseg.methods.bcp): one box, M = 0 inside it, a ⊕ b = a·M + b·(1 − M)
# ----------------------------------------------------------------------------------------------


class Box(NamedTuple):
    """A box of ``height × width`` pixels whose top-left pixel is ``(top, left)``."""

    top: int
    left: int
    height: int
    width: int


def box_side(size: int, ratio: float) -> int:
    """``⌊ratio·size⌋`` (the released ``int(size*2/3)``; a 1e-6 tolerance so ``ratio = 2/3`` and
    ``size = 3k`` give ``2k``, not ``2k − 1``)."""
    return int(math.floor(size * ratio + 1e-6))


def draw_box(height: int, width: int, ratio: float, generator: torch.Generator | None = None) -> Box:
    """One box of ``⌊ratio·H⌋ × ⌊ratio·W⌋`` pixels, its top-left corner uniform in
    ``[0, H − h) × [0, W − w)`` (numpy's ``randint(0, H − h)``: never against the last row or
    column), drawn from torch's (CPU) RNG."""
    h, w = box_side(height, ratio), box_side(width, ratio)
    top = int(torch.randint(0, max(1, height - h), (), generator=generator))
    left = int(torch.randint(0, max(1, width - w), (), generator=generator))
    return Box(top, left, h, w)


def box_mask(height: int, width: int, box: Box, device: torch.device | str | None = None) -> Tensor:
    """The zero-one mask ``M`` (H×W, bool): False (0) inside ``box``, True (1) outside."""
    mask = torch.ones(height, width, dtype=torch.bool, device=device)
    mask[box.top : box.top + box.height, box.left : box.left + box.width] = False
    return mask


def copy_paste(background: Tensor, foreground: Tensor, mask: Tensor) -> Tensor:
    """``background ⊙ M + foreground ⊙ (1 − M)``: ``background`` where ``mask`` (H×W or N×H×W, 1
    outside the box) is set, ``foreground`` elsewhere; images (N×C×H×W) or maps (N×H×W), dtype kept."""
    m = mask.bool()
    if background.dim() == 4:
        m = m.unsqueeze(-3) if m.dim() == 3 else m
    return torch.where(m, background, foreground.to(background.dtype))


class CopyPaste(NamedTuple):
    """One mixed half batch: ``image`` N×C×H×W, ``target`` N×H×W class indices (255 where ignored),
    ``teach`` N×H×W per-pixel weight ``q`` (0 where ignored), ``valid`` N×H×W (not ignored), and the
    region weights ``weight_out`` (M = 1) / ``weight_in`` (the box)."""

    image: Tensor
    target: Tensor
    teach: Tensor
    valid: Tensor
    weight_out: float
    weight_in: float


def _paste_sample(
    bg: list[Tensor], fg: list[Tensor], mask: Tensor, weights: tuple[float, float]
) -> CopyPaste:
    """``bg ⊕ fg`` of ``(image, target, teach)`` triples; validity is ``target ≠ 255``."""
    image = copy_paste(bg[0], fg[0], mask)
    target = copy_paste(bg[1], fg[1], mask)
    valid = target != IGNORE_INDEX
    teach = copy_paste(bg[2], fg[2], mask) * valid
    return CopyPaste(image, target, teach, valid, weights[0], weights[1])


def bidirectional_copy_paste(
    x_l: Tensor,
    y_l: Tensor,
    x_u: Tensor,
    pseudo_u: Tensor,
    teach_u: Tensor,
    mask: Tensor,
    u_weight: float,
) -> tuple[CopyPaste, CopyPaste]:
    """Stage 2's two mixed half batches ``(X_ul, X_lu)`` (:mod:`semiseg.methods.bcp`): halves ``a = [:k]``,
    ``b = [k:2k]``, ``k = n/2``; ``X_ul = x_u^a ⊕ x_l^a`` (pseudo-labels outside the box, weight
    ``u_weight``; ground truth inside, 1) and ``X_lu = x_l^b ⊕ x_u^b`` (ground truth outside, 1;
    pseudo-labels inside, ``u_weight``). ``pseudo_u`` carries 255 at ignored unlabeled pixels and
    ``teach_u`` the pseudo-labels' per-pixel weights ``q``; ground truth teaches with weight 1."""
    k = x_l.shape[0] // 2
    ones = torch.ones(y_l.shape, dtype=teach_u.dtype, device=teach_u.device)
    a = [t[:k] for t in (x_u, pseudo_u, teach_u)], [t[:k] for t in (x_l, y_l, ones)]
    b = [t[k : 2 * k] for t in (x_l, y_l, ones)], [t[k : 2 * k] for t in (x_u, pseudo_u, teach_u)]
    ul = _paste_sample(*a, mask, (u_weight, 1.0))  # unlabeled background, labeled crop
    lu = _paste_sample(*b, mask, (1.0, u_weight))  # labeled background, unlabeled crop
    return ul, lu


def labeled_copy_paste(x_l: Tensor, y_l: Tensor, mask: Tensor) -> CopyPaste:
    """Stage 1's mixed half batch ``X_ll = x_l^a ⊕ x_l^b`` with its mixed ground truth, both
    regions weighing 1."""
    k = x_l.shape[0] // 2
    ones = torch.ones(y_l.shape, dtype=torch.float32, device=y_l.device)
    return _paste_sample(
        (x_l[:k], y_l[:k], ones[:k]), (x_l[k : 2 * k], y_l[k : 2 * k], ones[k : 2 * k]), mask, (1.0, 1.0)
    )
