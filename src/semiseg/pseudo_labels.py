"""Which unlabeled pixels teach, and with which class: pseudo-label policies.

A method turns its weak prediction into pseudo-labels through a :class:`PseudoLabeler`, configured
under ``method.pseudo``. It has two hooks, in the spirit of USB's distribution-alignment and masking
hooks (microsoft/Semi-supervised-learning):

1. **alignment** of the weak class probabilities before the argmax (``align``):

   * ``none`` — the model's softmax ``p``;
   * ``labeled_prior`` — ReMixMatch / DARS distribution alignment:
     ``p̃ = normalise(p · π / p̄)``, with ``π`` the running class frequency of the labeled ground
     truth and ``p̄`` the running mean of the (unaligned) weak prediction over unlabeled pixels.

2. **masking** (``mask``): pixel ``i`` with label ``ŷ_i = argmax p̃_i`` and confidence
   ``c_i = max p̃_i`` teaches iff ``c_i ≥ τ(ŷ_i)``:

   * ``fixed`` — ``τ(c) = τ`` (``method.threshold``; FixMatch / UniMatch, today's default);
   * ``freematch`` — self-adaptive thresholds (Wang et al., ICLR 2023, eq. 6–10):
     ``τ_t = EMA(mean_i c_i)``, ``p̃_t(c) = EMA(mean_i p̃_i(c))``,
     ``τ_t(c) = p̃_t(c) / max_k p̃_t(k) · τ_t``, both EMAs starting at ``1/C``;
   * ``flexmatch`` — curriculum thresholds (Zhang et al., NeurIPS 2021, eq. 6–11):
     ``σ(c)`` = EMA share of unlabeled pixels confidently (``c ≥ τ``) labeled ``c``, divided by
     the labeled prior ``π(c)`` (pixels are not class-balanced the way FlexMatch's images are, so a
     rare class is not mistaken for a badly learnt one); ``β(c) = σ(c) / max(max_k σ(k), u)``
     with ``u`` the share of unconfident pixels (threshold warm-up, ``flexmatch_warmup``);
     ``τ(c) = M(β(c))·τ`` with ``M(x) = x / (2 − x)`` (convex) or ``x`` (linear).

Each mask and each alignment is a small rule class registered by name, so a package can add its own
(``MASK_POLICIES``: :class:`FixedMask`, :class:`FreeMatchMask`, :class:`FlexMatchMask`;
``ALIGN_POLICIES``: :class:`NoAlign`, :class:`LabeledPriorAlign`; :mod:`semiseg.registry`); the
running statistics are the labeler's buffers, which the rules read and update.

Statistics are exponential moving averages (``momentum``) of per-batch means computed from the
training stream only (labeled ground truth, weak unlabeled predictions), kept in buffers (saved
in checkpoints, resumed exactly) and averaged over ranks under DDP before the update.

A policy returns :class:`PseudoLabels` ``(label, score, threshold)``: pixel used iff
``score ≥ threshold``. For ``fixed`` the score is the confidence and the threshold ``τ``, so
mixers and losses see exactly what they saw before (bit-identical results at the defaults); the
adaptive masks return the pass/fail map as the score and 0.5 as the threshold, so SupMix's pasted
ground truth (confidence 1) always passes and CutMix/ClassMix partners carry their own mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import registered_name
from .errors import ConfigError
from .registry import ALIGN_POLICIES, MASK_POLICIES
from .types import IGNORE_INDEX

MaskPolicy = str  # a mask registered in semiseg.registry.MASK_POLICIES (fixed, freematch, flexmatch, ...)
AlignPolicy = str  # an alignment registered in semiseg.registry.ALIGN_POLICIES (none, labeled_prior, ...)

ADAPTIVE_THRESHOLD = 0.5  # the adaptive masks' scores are 0/1: anything in (0, 1] separates them


@dataclass
class PseudoLabelConfig:
    """``method.pseudo``: how weak predictions become pseudo-labels (module docstring)."""

    mask: MaskPolicy = registered_name(MASK_POLICIES, "fixed")  # type: ignore[assignment]
    align: AlignPolicy = registered_name(ALIGN_POLICIES, "none")  # type: ignore[assignment]
    # EMA momentum of the running statistics. FreeMatch uses 0.999 over 2^20 iterations; our
    # schedules are 2000–6000 steps, so the default time constant is 100 steps.
    momentum: float = 0.99
    flexmatch_warmup: bool = True  # β's denominator includes the share of unconfident pixels
    flexmatch_mapping: Literal["convex", "linear"] = "convex"  # M(x) = x/(2−x) or x
    min_prior: float = 1e-4  # floor of π and p̄ in the alignment ratio (no division by zero)

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{prefix}.momentum: must be in [0, 1), got {self.momentum}")
        if not 0.0 < self.min_prior < 1.0:
            raise ConfigError(f"{prefix}.min_prior: must be in (0, 1), got {self.min_prior}")


class PseudoLabels(NamedTuple):
    """``label`` N×H×W class indices; ``score`` N×H×W; a pixel teaches iff ``score ≥ threshold``.
    ``probs`` N×C×H×W: the (aligned) class probabilities the label was taken from."""

    label: Tensor
    score: Tensor
    threshold: float
    probs: Tensor

    @property
    def mask(self) -> Tensor:
        return self.score >= self.threshold


def _global_mean(values: Tensor) -> Tensor:
    """Mean of a statistic over DDP ranks (identity without a process group)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def convex_map(x: Tensor) -> Tensor:
    """FlexMatch's non-linear mapping ``M(x) = x / (2 − x)`` (eq. 11)."""
    return x / (2.0 - x)


# ----------------------------------------------------------------------------------------------
# Policies: masks (which pixels teach) and alignments (the probabilities the label comes from)
# ----------------------------------------------------------------------------------------------


class MaskRule:
    """A mask policy (``method.pseudo.mask``), registered in :data:`semiseg.registry.MASK_POLICIES`.

    ``adaptive = False``: a pixel teaches iff its confidence ``≥ τ`` (score = confidence, threshold
    ``τ``: mixers and losses see the confidence). Otherwise the score is the pass/fail map of
    ``confidence ≥ thresholds(labeler)[label]`` and the threshold is :data:`ADAPTIVE_THRESHOLD`.
    """

    adaptive: bool = True

    def thresholds(self, labeler: PseudoLabeler) -> Tensor:
        """Per-class thresholds ``τ(c)`` from the labeler's current state (C values)."""
        return torch.full_like(labeler.prior, labeler.tau)

    def update(
        self, labeler: PseudoLabeler, probs: Tensor, label: Tensor, confidence: Tensor, used: Tensor | None
    ) -> None:
        """Update the labeler's statistics from a step's (aligned) weak prediction."""


class FixedMask(MaskRule):
    """``fixed``: ``τ(c) = τ`` (``method.threshold``; FixMatch / UniMatch)."""

    adaptive = False


class FreeMatchMask(MaskRule):
    """``freematch``: ``τ_t(c) = p̃_t(c) / max_k p̃_t(k) · τ_t`` (FreeMatch eq. 6–10)."""

    def thresholds(self, labeler: PseudoLabeler) -> Tensor:
        return labeler.class_prob / labeler.class_prob.max().clamp_min(1e-12) * labeler.global_conf

    def update(
        self, labeler: PseudoLabeler, probs: Tensor, label: Tensor, confidence: Tensor, used: Tensor | None
    ) -> None:
        stats = labeler._pixel_mean(torch.cat((confidence.unsqueeze(1), probs), dim=1), used)
        if bool(torch.isfinite(stats).all()):
            labeler._ema(labeler.global_conf, stats[0])
            labeler._ema(labeler.class_prob, stats[1:])


class FlexMatchMask(MaskRule):
    """``flexmatch``: ``τ(c) = M(β(c))·τ`` from the learning effect ``σ(c)`` (FlexMatch eq. 6–11)."""

    def thresholds(self, labeler: PseudoLabeler) -> Tensor:
        cfg = labeler.cfg
        sigma, unused = labeler.learned[:-1], labeler.learned[-1]
        denom = sigma.max()
        if cfg.flexmatch_warmup:
            denom = torch.maximum(denom, unused)
        beta = (sigma / denom.clamp_min(1e-12)).clamp(0.0, 1.0)
        mapped = convex_map(beta) if cfg.flexmatch_mapping == "convex" else beta
        return mapped * labeler.tau

    def update(
        self, labeler: PseudoLabeler, probs: Tensor, label: Tensor, confidence: Tensor, used: Tensor | None
    ) -> None:
        onehot = nn.functional.one_hot(label, labeler.num_classes).permute(0, 3, 1, 2).float()
        confident = (confidence >= labeler.tau).float().unsqueeze(1)
        shares = labeler._pixel_mean(torch.cat((onehot * confident, 1.0 - confident), dim=1), used)
        if bool(torch.isfinite(shares).all()):
            shares[:-1] = shares[:-1] / labeler.prior.clamp_min(labeler.cfg.min_prior)
            labeler._ema(labeler.learned, shares)


class AlignRule:
    """An alignment (``method.pseudo.align``), registered in :data:`semiseg.registry.ALIGN_POLICIES`:
    the class probabilities the pseudo-label is taken from. ``identity``: the softmax unchanged."""

    identity: bool = False

    def __call__(self, labeler: PseudoLabeler, probs: Tensor) -> Tensor:
        return probs


class NoAlign(AlignRule):
    """``none``: the model's softmax ``p``."""

    identity = True


class LabeledPriorAlign(AlignRule):
    """``labeled_prior``: ``p̃ = normalise(p · π / p̄)`` (ReMixMatch / DARS distribution alignment)."""

    def __call__(self, labeler: PseudoLabeler, probs: Tensor) -> Tensor:
        floor = labeler.cfg.min_prior
        ratio = labeler.prior.clamp_min(floor) / labeler.pred_mean.clamp_min(floor)
        probs = probs * ratio.view(1, -1, 1, 1)
        return probs / probs.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# The labeler
# ----------------------------------------------------------------------------------------------


class PseudoLabeler(nn.Module):
    """A pseudo-label policy with its running statistics (see the module docstring).

    Call :meth:`observe_labeled` with each labeled batch's ground truth and :meth:`__call__` with
    the weak unlabeled logits (``update=True`` once per step, on the batch whose statistics count).
    """

    prior: Tensor
    pred_mean: Tensor
    global_conf: Tensor
    class_prob: Tensor
    learned: Tensor
    seen: Tensor

    def __init__(self, cfg: PseudoLabelConfig, num_classes: int, threshold: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.tau = threshold
        self.mask_rule: MaskRule = MASK_POLICIES[cfg.mask]()
        self.align_rule: AlignRule = ALIGN_POLICIES[cfg.align]()
        c = num_classes
        self.register_buffer("prior", torch.full((c,), 1.0 / c))  # π: labeled class frequency
        self.register_buffer("pred_mean", torch.full((c,), 1.0 / c))  # p̄: mean weak prediction
        self.register_buffer("global_conf", torch.tensor(1.0 / c))  # FreeMatch τ_t
        self.register_buffer("class_prob", torch.full((c,), 1.0 / c))  # FreeMatch p̃_t
        self.register_buffer("learned", torch.zeros(c + 1))  # FlexMatch σ(c) and the unused share
        self.register_buffer("seen", torch.zeros(2, dtype=torch.bool))  # prior, pred_mean observed

    @property
    def is_fixed(self) -> bool:
        return not self.mask_rule.adaptive and self.align_rule.identity

    def _ema(self, buffer: Tensor, value: Tensor, first: bool = False) -> None:
        if first:
            buffer.copy_(value)
        else:
            buffer.mul_(self.cfg.momentum).add_(value.to(buffer.dtype), alpha=1.0 - self.cfg.momentum)

    @torch.no_grad()
    def observe_labeled(self, y_l: Tensor) -> None:
        """Update the labeled class prior ``π`` from a batch of ground truth (255 ignored)."""
        valid = y_l[y_l != IGNORE_INDEX].long().clamp_max(self.num_classes - 1)
        counts = torch.bincount(valid, minlength=self.num_classes)[: self.num_classes].float()
        counts = _global_mean(torch.cat((counts, counts.sum().reshape(1))))
        if float(counts[-1]) <= 0:
            return
        self._ema(self.prior, counts[:-1] / counts[-1], first=not bool(self.seen[0]))
        self.seen[0] = True

    def thresholds(self) -> Tensor:
        """Per-class thresholds ``τ(c)`` of the current state (C values)."""
        return self.mask_rule.thresholds(self)

    @torch.no_grad()
    def __call__(self, logits: Tensor, ignore: Tensor | None = None, update: bool = False) -> PseudoLabels:
        """Pseudo-labels of ``logits`` (N×C×H×W, detached here); ``update`` the running statistics
        from the non-ignored pixels first (the weak unlabeled pass of a training step)."""
        probs = logits.detach().float().softmax(dim=1)
        if self.is_fixed:
            confidence, label = probs.max(dim=1)
            return PseudoLabels(label, confidence, self.tau, probs)
        used = None if ignore is None else (ignore != IGNORE_INDEX)
        if update:
            self._update_prediction_stats(probs, used)
        probs = self.align_rule(self, probs)
        confidence, label = probs.max(dim=1)
        if update and self.mask_rule.adaptive:
            self._update_mask_stats(probs, label, confidence, used)
        if not self.mask_rule.adaptive:
            return PseudoLabels(label, confidence, self.tau, probs)
        passed = confidence >= self.thresholds()[label]
        return PseudoLabels(label, passed.to(confidence.dtype), ADAPTIVE_THRESHOLD, probs)

    def _pixel_mean(self, values: Tensor, used: Tensor | None) -> Tensor:
        """Mean over the non-ignored pixels of every rank of N×K×H×W ``values`` → K (NaN when no
        rank has a pixel). Sums and counts are all-reduced on every rank, so ranks never diverge
        and a rank whose crops are all padding still takes part in the collective."""
        k = values.shape[1]
        flat = values.permute(1, 0, 2, 3).reshape(k, -1)
        if used is not None:
            flat = flat[:, used.reshape(-1)]
        totals = torch.cat((flat.sum(dim=1), flat.new_full((1,), float(flat.shape[1]))))
        totals = _global_mean(totals)  # the mean of sums and counts over ranks: their ratio is exact
        if float(totals[-1]) <= 0:
            return torch.full((k,), float("nan"), device=values.device)
        return totals[:-1] / totals[-1]

    def _update_prediction_stats(self, probs: Tensor, used: Tensor | None) -> None:
        mean = self._pixel_mean(probs, used)
        if bool(torch.isfinite(mean).all()):
            self._ema(self.pred_mean, mean, first=not bool(self.seen[1]))
            self.seen[1] = True

    def _update_mask_stats(
        self, probs: Tensor, label: Tensor, confidence: Tensor, used: Tensor | None
    ) -> None:
        self.mask_rule.update(self, probs, label, confidence, used)


@torch.no_grad()
def pseudo_label_diagnostics(
    pseudo_u: PseudoLabels,
    ignore_u: Tensor,
    pseudo_l: PseudoLabels,
    y_l: Tensor,
    num_classes: int,
) -> dict[str, Tensor]:
    """Per-class view of what the unlabeled loss teaches, logged every step (issue: a collapse
    must be visible while it happens).

    * ``pl_used/<c>`` — share of non-ignored unlabeled pixels that teach class ``c``
      (pass the mask with pseudo-label ``c``);
    * ``pl_right/<c>`` / ``pl_wrong/<c>`` — the policy applied to the labeled view, where the
      truth is known: of the pixels whose ground truth is ``c``, the share that would teach
      ``c`` / teach another class.
    """
    c = num_classes
    out: dict[str, Tensor] = {}
    used_u = ignore_u != IGNORE_INDEX
    teach = pseudo_u.mask & used_u
    n_u = used_u.sum().clamp_min(1).float()
    per_class_u = torch.bincount(pseudo_u.label[teach].long(), minlength=c)[:c].float() / n_u
    valid_l = y_l != IGNORE_INDEX
    truth = y_l[valid_l].long().clamp_max(c - 1)
    label_l = pseudo_l.label[valid_l].long()
    mask_l = pseudo_l.mask[valid_l]
    n_true = torch.bincount(truth, minlength=c)[:c].float()
    right = torch.bincount(truth[mask_l & (label_l == truth)], minlength=c)[:c].float()
    wrong = torch.bincount(truth[mask_l & (label_l != truth)], minlength=c)[:c].float()
    for k in range(c):
        out[f"pl_used/{k}"] = per_class_u[k]
        if n_true[k] > 0:  # classes absent from the labeled batch are not logged this step
            out[f"pl_right/{k}"] = right[k] / n_true[k]
            out[f"pl_wrong/{k}"] = wrong[k] / n_true[k]
    return out


#: 8-connectivity within each 2-D image of an N×H×W stack, nothing across images.
_STACKED_8 = np.zeros((3, 3, 3), dtype=bool)
_STACKED_8[1] = True


def largest_component(label: Tensor, num_classes: int, ignore: Tensor | None = None) -> Tensor:
    """Per image of ``label`` (N×H×W class indices) and per foreground class ``c ∈ 1..C−1``: pixels
    of ``c`` outside the largest 8-connected component of ``{label = c}`` become background (0).

    Ties go to the component whose first pixel comes first in raster order (the released
    ``argmax(bincount(labels)[1:])``). Pixels where ``ignore`` is 255 belong to no component (they
    become 0 when their class is filtered). ``scipy.ndimage.label`` on the CPU, all images of a class
    at once (a device round trip per call)."""
    from scipy import ndimage  # imported here: semiseg imports without scipy loaded

    labels = label.detach().cpu().numpy()
    usable = (
        np.ones_like(labels, dtype=bool)
        if ignore is None
        else (ignore.detach().cpu().numpy() != IGNORE_INDEX)
    )
    out = labels.copy()
    n = labels.shape[0]
    for c in range(1, num_classes):
        region = (labels == c) & usable
        if not region.any():
            out[labels == c] = 0
            continue
        comps, count = ndimage.label(region, structure=_STACKED_8)
        sizes = np.bincount(comps.ravel(), minlength=count + 1)
        owner = np.full(count + 1, -1, dtype=np.int64)  # the image of each component
        owner[comps.ravel()] = np.repeat(np.arange(n), comps[0].size)
        keep = np.zeros(count + 1, dtype=bool)
        for i in range(n):  # components are numbered in raster order, image after image
            ids = np.flatnonzero(owner[1:] == i) + 1
            if ids.size:
                keep[ids[np.argmax(sizes[ids])]] = True  # the first of the largest
        out[(labels == c) & ~keep[comps]] = 0
    return torch.from_numpy(out).to(label.device)
