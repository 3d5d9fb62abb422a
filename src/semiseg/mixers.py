"""Strong-view mixing as pure tensor functions: CutMix (UniMatch), ClassMix and SupMix (SupMix paper §3.1).

A mix pastes, under a binary mask ``M`` (N×H×W), a *source* onto a *target*. Both are
:class:`MixSample` tuples ``(image, label, confidence, ignore[, weight])``, so the image, its
pseudo-label, the confidence that is thresholded, the ignore map (255 = ignored) and an optional
per-pixel loss weight (a plug-in's, e.g. MPMC's λ_s) all travel together::

    x_mix = M·x_src + (1 − M)·x_tgt,   y_mix = M·y_src + (1 − M)·y_tgt     (SupMix paper eq. 5–6, 10–11)

:func:`paste` is the only place where pixels are combined; the mask builders decide ``M``:

* :func:`cutmix_mask` — the CutMix boxes drawn by the data pipeline (UniMatch);
* :func:`classmix_mask` — half of the classes present in the partner's pseudo-label (ClassMix,
  Olsson et al. 2021; SupMix paper eq. 1–4);
* :func:`supmix_mask` — ``k = max(1, ⌊n/2⌋)`` of the ``n`` ground-truth classes of a labeled image
  that are not excluded (background) or ignored (SupMix paper eq. 8–9).

A *mixer* (:class:`Mixer`: :class:`CutMix`, :class:`ClassMix`, :class:`SupMix`, :class:`NoMix`) is
registered by name under ``method.mix`` (:data:`semiseg.registry.MIXERS`, so a package can add its
own). :class:`StrongMixer` applies the configured mixer to a strong view for the consistency methods
(FixMatch, UniMatch) and keeps the running per-class statistics that the non-uniform SupMix
class-selection strategies read (saved in ``state_dict`` as buffers). Randomness comes from torch's
global RNG, which the trainer seeds and restores on resume.

The tensor functions (:class:`MixSample`, :func:`paste`, the mask builders, :func:`labeled_source`)
live in :mod:`semiseg.mix_ops` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from .config import HASH_NEUTRAL, registered_name
from .errors import ConfigError
from .mix_ops import (
    MixSample,
    choose_classes,
    class_mask,
    classmix_count,
    classmix_mask,
    cutmix_mask,
    labeled_source,
    match_size,
    paste,
    present_classes,
    supmix_count,
    supmix_mask,
)
from .registry import MIXERS
from .types import IGNORE_INDEX

__all__ = [
    "ClassMix",
    "ClassStatistics",
    "CutMix",
    "MixConfig",
    "MixName",
    "MixSample",
    "Mixer",
    "NoMix",
    "Strategy",
    "StrongMixer",
    "SupMix",
    "choose_classes",
    "class_mask",
    "classmix_count",
    "classmix_mask",
    "cutmix_mask",
    "labeled_source",
    "match_size",
    "paste",
    "present_classes",
    "supmix_count",
    "supmix_mask",
]

MixName = str  # a mixer registered in semiseg.registry.MIXERS (cutmix, classmix, supmix, none, ...)
Strategy = Literal["paper", "inverse_frequency", "difficulty"]


# ----------------------------------------------------------------------------------------------
# Configuration shared by the consistency methods (FixMatch, UniMatch)
# ----------------------------------------------------------------------------------------------


@dataclass
class MixConfig:
    """Strong-view mixing options of a method config (``method.mix`` and friends).

    ``mix``: ``cutmix`` (the data pipeline's boxes, probability ``data.strong.cutmix_p``),
    ``classmix`` (ClassMix with probability ``classmix_p`` per sample and strong view, instead of
    CutMix), ``supmix`` (SupMix with probability ``supmix_p``, else ``supmix_fallback``) or ``none``.
    """

    mix: MixName = registered_name(MIXERS, "cutmix")  # type: ignore[assignment]
    classmix_p: float = 0.5  # same rate as UniMatch's CutMix box (data.strong.cutmix_p)
    classmix_rounding: Literal["ceil", "floor"] = "ceil"  # ⌈n/2⌉ official ClassMix code; ⌊n/2⌋ SupMix eq. 3
    supmix_p: float = 0.5  # probability per sample and strong view (the SupMix paper leaves it open)
    supmix_fallback: Literal["cutmix", "none"] = "cutmix"  # a sample SupMix does not paste into
    supmix_exclude: list[int] = field(default_factory=lambda: [0])  # never pasted (background)
    supmix_strategy: Strategy = "paper"  # class selection: uniform | ∝ 1/frequency | ∝ 1 − statistic
    supmix_difficulty: Literal["iou", "confidence"] = "iou"  # statistic of the `difficulty` strategy
    supmix_stat_momentum: float = 0.99  # EMA momentum of the running class statistics
    supmix_min_weight: float = 0.05  # floor of the `difficulty` weight, so no class is never chosen
    # Labeled view SupMix pastes from: `weak` (eq. 7–11) or `strong` (an independently jittered
    # strong view of the same crop, so pasted regions look like their strongly augmented
    # surroundings; an option to test whether un-jittered pastes teach a shortcut).
    supmix_source: Literal["weak", "strong"] = field(default="weak", metadata={HASH_NEUTRAL: True})

    def validate_mix(self, prefix: str) -> None:
        for name in ("classmix_p", "supmix_p", "supmix_stat_momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{prefix}.{name}: must be in [0, 1], got {value}")
        if self.supmix_min_weight < 0:
            raise ConfigError(f"{prefix}.supmix_min_weight: must be >= 0, got {self.supmix_min_weight}")


# ----------------------------------------------------------------------------------------------
# Running class statistics and the strong-view mixer
# ----------------------------------------------------------------------------------------------


class ClassStatistics(nn.Module):
    """Running (EMA) per-class statistics for SupMix's class-selection strategies.

    * ``frequency[c]``: fraction of labeled ground-truth pixels of class ``c`` (``inverse_frequency``);
    * ``iou[c]``: IoU of the labeled prediction for class ``c`` (``difficulty`` with ``iou``);
    * ``confidence[c]``: mean weak-view confidence of unlabeled pixels predicted as ``c``
      (``difficulty`` with ``confidence``).

    A class's first observation replaces the initial value; later ones are averaged with momentum
    ``m``: ``s ← m·s + (1 − m)·obs``. Classes absent from a batch keep their value (the frequency is
    observed for every class whenever the batch has a labeled pixel). Initial values give uniform
    selection weights. Buffers, so they are saved with the method and moved with it. Under DDP each
    rank keeps its own statistics (they only bias a random choice; the checkpoint holds rank 0's).
    """

    frequency: Tensor
    iou: Tensor
    confidence: Tensor
    seen: Tensor

    def __init__(self, num_classes: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("frequency", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("iou", torch.zeros(num_classes))
        self.register_buffer("confidence", torch.zeros(num_classes))
        self.register_buffer("seen", torch.zeros(3, num_classes, dtype=torch.bool))  # freq, iou, conf

    def _ema(self, row: int, stat: Tensor, obs: Tensor, observed: Tensor) -> None:
        first = observed & ~self.seen[row]
        again = observed & self.seen[row]
        m = self.momentum
        stat[first] = obs[first].to(stat.dtype)
        stat[again] = m * stat[again] + (1 - m) * obs[again].to(stat.dtype)
        self.seen[row] |= observed

    @torch.no_grad()
    def update(
        self,
        logits_l: Tensor,
        y_l: Tensor,
        pseudo_w: Tensor | None = None,
        conf_w: Tensor | None = None,
        ignore: Tensor | None = None,
    ) -> None:
        """Observe one batch: labeled logits and ground truth; optionally unlabeled pseudo-labels."""
        c = self.frequency.numel()
        valid = y_l != IGNORE_INDEX
        if bool(valid.any()):
            gt = y_l[valid].long()
            counts = torch.bincount(gt, minlength=c)[:c].float()
            self._ema(0, self.frequency, counts / counts.sum(), torch.ones_like(self.seen[0]))
            pred = logits_l.detach().argmax(1)[valid]
            inter = torch.bincount(gt[pred == gt], minlength=c)[:c].float()
            union = counts + torch.bincount(pred, minlength=c)[:c].float() - inter
            self._ema(1, self.iou, inter / union.clamp_min(1), union > 0)
        if pseudo_w is not None and conf_w is not None:
            used = torch.ones_like(conf_w, dtype=torch.bool) if ignore is None else ignore != IGNORE_INDEX
            cls = pseudo_w[used].long()
            n = torch.bincount(cls, minlength=c)[:c].float()
            total = torch.bincount(cls, weights=conf_w[used].float(), minlength=c)[:c]
            self._ema(2, self.confidence, total / n.clamp_min(1), n > 0)

    def weights(self, strategy: Strategy, difficulty: str, min_weight: float) -> Tensor | None:
        """Class-selection weights (indexed by class id) of a strategy; ``None`` = uniform (paper)."""
        if strategy == "paper":
            return None
        if strategy == "inverse_frequency":
            return 1.0 / self.frequency.clamp_min(1e-6)
        stat = self.iou if difficulty == "iou" else self.confidence
        return (1.0 - stat).clamp_min(min_weight)


class Mixer:
    """How one strong view is mixed: registered by name under ``method.mix``
    (:data:`semiseg.registry.MIXERS`); :class:`StrongMixer` builds one from the method config.

    ``__call__(own, partner, labeled, box_mask, stats)`` returns the mixed sample: ``own`` is the
    strong view with its weak pseudo-label target, ``partner`` the flipped batch (when
    :meth:`uses_partner`), ``labeled`` the labeled source (when ``needs_labeled``), ``box_mask``
    the pipeline's CutMix boxes (N×H×W bool, all False when none was drawn), ``stats`` the running
    :class:`ClassStatistics` (updated when :meth:`tracks_statistics`).
    """

    needs_labeled: bool = False  # the labeled source is built and passed (SupMix)

    def __init__(self, cfg: MixConfig) -> None:
        self.cfg = cfg

    @property
    def labeled_strong(self) -> bool:
        """Whether the labeled source is a strong view of the labeled crop (``batch.x_ls``)."""
        return False

    def tracks_statistics(self) -> bool:
        """Whether the running class statistics are read (else not updated: they cost syncs)."""
        return False

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        """Whether this step needs the partner's prediction (the eval-mode mix-source pass)."""
        return False

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        raise NotImplementedError


def _any_box(boxes: list[Tensor | None]) -> bool:
    return any(b is not None and bool((b == 1).any()) for b in boxes)


class NoMix(Mixer):
    """``none``: the strong view as it is."""

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        return own


class CutMix(Mixer):
    """``cutmix``: inside the pipeline's box, image/label/confidence/ignore come from the partner
    (sample ``N−1−i``, the flipped batch) — UniMatch's ``mask_u_w_cutmixed``."""

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        return _any_box(boxes)

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        return own if not bool(box_mask.any()) else paste(own, _need(partner, "partner"), box_mask)


class ClassMix(Mixer):
    """``classmix``: with probability ``classmix_p``, the partner's pixels of half its predicted
    classes (:func:`classmix_mask`); otherwise no mix."""

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        return self.cfg.classmix_p > 0

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        applied = torch.rand(own.label.shape[0], device=own.label.device) < self.cfg.classmix_p
        if not bool(applied.any()):
            return own
        partner = _need(partner, "partner")
        mask = classmix_mask(partner.label, partner.ignore, self.cfg.classmix_rounding)
        return paste(own, partner, mask & applied[:, None, None])


class SupMix(Mixer):
    """``supmix``: with probability ``supmix_p``, the chosen ground-truth classes of labeled sample
    ``i mod n_l`` (eq. 8–11; confidence 1 and not ignored under the mask); otherwise — and when the
    labeled image has no candidate class — ``supmix_fallback`` (CutMix by default)."""

    needs_labeled = True

    @property
    def labeled_strong(self) -> bool:
        return self.cfg.supmix_source == "strong"

    def tracks_statistics(self) -> bool:
        return self.cfg.supmix_strategy != "paper"

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        return self.cfg.supmix_fallback == "cutmix" and _any_box(boxes)

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        cfg = self.cfg
        applied = torch.rand(own.label.shape[0], device=own.label.device) < cfg.supmix_p
        # SupMix (eq. 8–11): ground-truth classes of the labeled weak view pasted onto the strong view.
        labeled = match_size(_need(labeled, "labeled"), tuple(own.label.shape[-2:]))
        weights = stats.weights(cfg.supmix_strategy, cfg.supmix_difficulty, cfg.supmix_min_weight)
        mask, _ = supmix_mask(labeled.label, tuple(cfg.supmix_exclude), weights)
        mask = mask & applied[:, None, None]
        out = paste(own, labeled, mask)
        if cfg.supmix_fallback == "cutmix":
            not_pasted = ~mask.flatten(1).any(1)
            fallback = box_mask & not_pasted[:, None, None]
            if bool(fallback.any()):
                out = paste(out, _need(partner, "partner"), fallback)
        return out


class StrongMixer(nn.Module):
    """Builds one mixed strong view and its pseudo-label target for FixMatch / UniMatch, with the
    mixer registered under ``cfg.mix`` (:class:`CutMix`, :class:`ClassMix`, :class:`SupMix`,
    :class:`NoMix`, or one a package registered), and keeps the running class statistics."""

    def __init__(self, cfg: MixConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.kind: Mixer = MIXERS[cfg.mix](cfg)
        self.stats = ClassStatistics(num_classes, cfg.supmix_stat_momentum)

    @property
    def needs_labeled(self) -> bool:
        """Whether :meth:`forward` needs the labeled source (SupMix)."""
        return self.kind.needs_labeled

    @property
    def labeled_strong(self) -> bool:
        """Whether that source is a strong view of the labeled crop (``batch.x_ls``)."""
        return self.kind.needs_labeled and self.kind.labeled_strong

    def observe(
        self, logits_l: Tensor, y_l: Tensor, pseudo_w: Tensor, conf_w: Tensor, ignore: Tensor | None
    ) -> None:
        """Update the running class statistics from a step's batch, when the mixer reads them
        (skipped otherwise: the per-class counts cost device syncs for nothing)."""
        if self.kind.tracks_statistics():
            self.stats.update(logits_l, y_l, pseudo_w, conf_w, ignore)

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        """Whether this step needs the partner's prediction (the eval-mode mix-source pass)."""
        return self.kind.uses_partner(boxes)

    def forward(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box: Tensor | None,
    ) -> MixSample:
        """Mix strong view ``own.image`` (with its weak pseudo-label target) per the config.

        ``partner``: the flipped batch (strong image, eval-mode pseudo-label/confidence, ignore);
        ``labeled``: ``(x_l, y_l, 1, ignore_l)`` already indexed ``i mod n_l`` (SupMix's source)."""
        box_mask = cutmix_mask(box) if box is not None else torch.zeros_like(own.label, dtype=torch.bool)
        return self.kind(own, partner, labeled, box_mask, self.stats)


def _need(sample: MixSample | None, what: str) -> MixSample:
    if sample is None:
        raise ValueError(f"StrongMixer: this mix needs the {what} sample")
    return sample
