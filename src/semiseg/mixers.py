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
own) and owns its options, ``method.mixer`` (its ``Config``: :class:`ClassMixConfig`,
:class:`SupMixConfig`; a package's mixer declares its own). :class:`StrongMixer` applies the
configured mixer to a strong view for the consistency methods (FixMatch, UniMatch) and keeps the
running per-class statistics that the non-uniform SupMix class-selection strategies read (saved in
``state_dict`` as buffers). Randomness comes from torch's global RNG, which the trainer seeds and
restores on resume.

The tensor functions (:class:`MixSample`, :func:`paste`, the mask builders, :func:`labeled_source`)
live in :mod:`semiseg.mix_ops` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .config import registered_name, registered_section
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
    "ClassMixConfig",
    "ClassStatistics",
    "CutMix",
    "MixConfig",
    "MixName",
    "MixSample",
    "Mixer",
    "MixerConfig",
    "NoMix",
    "Strategy",
    "StrongMixer",
    "SupMix",
    "SupMixConfig",
    "choose_classes",
    "class_mask",
    "classmix_count",
    "classmix_mask",
    "cutmix_mask",
    "labeled_source",
    "match_size",
    "mixer_config_class",
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
class MixerConfig:
    """Options of a registered mixer (``method.mixer``); a mixer without options (``cutmix``, whose
    box probability is ``data.strong.cutmix_p``, and ``none``) has this empty one."""

    def validate(self, prefix: str) -> None:
        """Check the values (``prefix``: the dotted key of this section, for messages)."""


@dataclass
class ClassMixConfig(MixerConfig):
    """``method.mixer`` of ``mix: classmix``."""

    p: float = 0.5  # probability per sample and strong view; UniMatch's CutMix rate (data.strong.cutmix_p)
    rounding: Literal["ceil", "floor"] = "ceil"  # ⌈n/2⌉ official ClassMix code; ⌊n/2⌋ SupMix eq. 3

    def validate(self, prefix: str) -> None:
        _check_unit(prefix, "p", self.p)


@dataclass
class SupMixConfig(MixerConfig):
    """``method.mixer`` of ``mix: supmix`` (SupMix paper eq. 7–11)."""

    p: float = 0.5  # probability per sample and strong view (the SupMix paper leaves it open)
    fallback: Literal["cutmix", "none"] = "cutmix"  # a sample SupMix does not paste into
    exclude: list[int] = field(default_factory=lambda: [0])  # never pasted (background)
    strategy: Strategy = "paper"  # class selection: uniform | ∝ 1/frequency | ∝ 1 − statistic
    difficulty: Literal["iou", "confidence"] = "iou"  # statistic of the `difficulty` strategy
    stat_momentum: float = 0.99  # EMA momentum of the running class statistics
    min_weight: float = 0.05  # floor of the `difficulty` weight, so no class is never chosen
    # Labeled view pasted from: `weak` (eq. 7–11) or `strong` (an independently jittered strong view
    # of the same crop, so pasted regions look like their strongly augmented surroundings).
    source: Literal["weak", "strong"] = "weak"

    def validate(self, prefix: str) -> None:
        _check_unit(prefix, "p", self.p)
        _check_unit(prefix, "stat_momentum", self.stat_momentum)
        if self.min_weight < 0:
            raise ConfigError(f"{prefix}.min_weight: must be >= 0, got {self.min_weight}")


def _check_unit(prefix: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{prefix}.{name}: must be in [0, 1], got {value}")


# Before the mixers owned their sections, their options were method fields named with these
# prefixes (``method.supmix_p``); :meth:`MixConfig.upgrade` reads such configs.
FLAT_PREFIXES = {"classmix": "classmix_", "supmix": "supmix_"}


@dataclass
class MixConfig:
    """Strong-view mixing of a method config: ``mix`` names the mixer registered in
    :data:`semiseg.registry.MIXERS` (``cutmix``: the data pipeline's boxes, probability
    ``data.strong.cutmix_p``; ``classmix``; ``supmix``; ``none``) and ``mixer`` holds its options,
    validated against that mixer's ``Config`` (:class:`ClassMixConfig`, :class:`SupMixConfig`, or
    one a package registered), as ``method`` is against the method's."""

    mix: MixName = registered_name(MIXERS, "cutmix")  # type: ignore[assignment]
    mixer: Any = registered_section("mix", MIXERS)

    def __post_init__(self) -> None:
        if self.mixer is None:  # built in code rather than loaded: the mixer's defaults
            self.mixer = mixer_config_class(self.mix)()

    @classmethod
    def upgrade(cls, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
        """A method mapping with the old flat mixer options (``supmix_p: 0.7``) moved into
        ``mixer`` (``mixer: {p: 0.7}``). Those of a mixer other than ``mix`` are dropped when they
        hold their default (every saved run config lists them all) and refused otherwise."""
        flat = [key for key in raw if any(key.startswith(p) for p in FLAT_PREFIXES.values())]
        if not flat:
            return raw
        raw = dict(raw)
        chosen = raw.get("mix", next(f.default for f in fields(cls) if f.name == "mix"))
        section = dict(raw.get("mixer") or {})
        for key in flat:
            value = raw.pop(key)
            mixer, option = next((m, key[len(p) :]) for m, p in FLAT_PREFIXES.items() if key.startswith(p))
            if mixer == chosen:
                if option in section and section[option] != value:
                    raise ConfigError(
                        f"{prefix}.{key} and {prefix}.mixer.{option} disagree: set only the latter"
                    )
                section[option] = value
            elif value != getattr(mixer_config_class(mixer)(), option, object()):
                raise ConfigError(
                    f"{prefix}.{key}: an option of mixer {mixer!r}, but {prefix}.mix is {chosen!r}"
                )
        if section:
            raw["mixer"] = section
        return raw


def mixer_config_class(name: str) -> type:
    """The ``Config`` class of the mixer registered as ``name`` (:class:`MixerConfig` if it has none)."""
    return getattr(MIXERS[name], "Config", MixerConfig)


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
    Config: type = MixerConfig  # its options, ``method.mixer``

    def __init__(self, cfg: Any) -> None:
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
    """``classmix``: with probability ``p``, the partner's pixels of half its predicted classes
    (:func:`classmix_mask`); otherwise no mix."""

    Config = ClassMixConfig
    cfg: ClassMixConfig

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        return self.cfg.p > 0

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        applied = torch.rand(own.label.shape[0], device=own.label.device) < self.cfg.p
        if not bool(applied.any()):
            return own
        partner = _need(partner, "partner")
        mask = classmix_mask(partner.label, partner.ignore, self.cfg.rounding)
        return paste(own, partner, mask & applied[:, None, None])


class SupMix(Mixer):
    """``supmix``: with probability ``p``, the chosen ground-truth classes of labeled sample
    ``i mod n_l`` (eq. 8–11; confidence 1 and not ignored under the mask); otherwise — and when the
    labeled image has no candidate class — ``fallback`` (CutMix by default)."""

    needs_labeled = True
    Config = SupMixConfig
    cfg: SupMixConfig

    @property
    def labeled_strong(self) -> bool:
        return self.cfg.source == "strong"

    def tracks_statistics(self) -> bool:
        return self.cfg.strategy != "paper"

    def uses_partner(self, boxes: list[Tensor | None]) -> bool:
        return self.cfg.fallback == "cutmix" and _any_box(boxes)

    def __call__(
        self,
        own: MixSample,
        partner: MixSample | None,
        labeled: MixSample | None,
        box_mask: Tensor,
        stats: ClassStatistics,
    ) -> MixSample:
        cfg = self.cfg
        applied = torch.rand(own.label.shape[0], device=own.label.device) < cfg.p
        # SupMix (eq. 8–11): ground-truth classes of the labeled weak view pasted onto the strong view.
        labeled = match_size(_need(labeled, "labeled"), tuple(own.label.shape[-2:]))
        weights = stats.weights(cfg.strategy, cfg.difficulty, cfg.min_weight)
        mask, _ = supmix_mask(labeled.label, tuple(cfg.exclude), weights)
        mask = mask & applied[:, None, None]
        out = paste(own, labeled, mask)
        if cfg.fallback == "cutmix":
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
        self.kind: Mixer = MIXERS[cfg.mix](cfg.mixer)
        # the statistics the non-uniform SupMix strategies read (kept, unused, for the other mixers)
        momentum = getattr(cfg.mixer, "stat_momentum", SupMixConfig.stat_momentum)
        self.stats = ClassStatistics(num_classes, momentum)

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
