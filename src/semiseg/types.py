"""Types every layer shares: the ignore label, a training batch, where training is, and what a
plug-in sees of a training step.

Imports only torch and the standard library, so data pipelines, losses, mixers, methods and
plug-ins can all use these without importing each other. The old homes re-export them
(:mod:`semiseg.methods.base`: ``Batch``, ``StepInfo``; :mod:`semiseg.plugins.base`:
``StepContext``; :mod:`semiseg.data.base`: ``IGNORE_INDEX``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

#: Mask value of pixels that are not scored and not trained on (padding, unlabeled, "void").
IGNORE_INDEX = 255

#: Where a pixel of a mixed strong view came from (``StepContext.sources_s``, ``MixSample.source``):
#: the sample's own strong view, its mix partner (the flipped batch), a labeled image (SupMix).
SOURCE_OWN, SOURCE_PARTNER, SOURCE_LABELED = 0, 1, 2


@dataclass
class Batch:
    """One iteration's data. Unlabeled fields are None for methods that use no unlabeled data.

    ``x_l, y_l``: labeled weak view (N×C×H×W, N×H×W with 255 = ignore);
    ``x_w, x_s1, x_s2``: unlabeled weak view and two independent strong views (same geometry);
    ``ignore``: N×H×W, 255 where the unlabeled crop is padding;
    ``box1, box2``: N×H×W {0,1} CutMix boxes drawn for each strong view (all zero when not drawn);
    ``x_ls``: a strong view of the labeled crop, only when the method sets ``needs_labeled_strong``.
    """

    x_l: Tensor
    y_l: Tensor
    x_w: Tensor | None = None
    x_s1: Tensor | None = None
    x_s2: Tensor | None = None
    ignore: Tensor | None = None
    box1: Tensor | None = None
    box2: Tensor | None = None
    x_ls: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        return Batch(**moved)


@dataclass
class StepInfo:
    """Where training is: ``step`` in ``[0, total_steps)``."""

    step: int
    total_steps: int

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


@dataclass
class StepContext:
    """What a plug-in sees of one training step: the whole input of the plug-in interface.

    The host method builds it after its weak forward pass; plug-ins read its fields and write only
    ``extras``. A method keeps its own state (its pseudo-label policy's output, the mix partner,
    mixed views, thresholds) in its training step, not here.

    Always set:

    - ``batch``, ``info``: the step's batch and where training is;
    - ``logits_l`` N_l×C×H×W: the labeled prediction (with gradient);
    - ``logits_w`` N_u×C×H×W: the trained model's prediction on the unlabeled batch (with gradient:
      FixMatch / UniMatch's weak view, Mean Teacher's student view);
    - ``pseudo_w`` / ``conf_w`` N_u×H×W: detached pseudo-labels and their confidence (the host's
      pseudo-label policy, on the weak forward or on the EMA teacher's prediction);
    - ``ignore`` N_u×H×W: 255 where the unlabeled crop is padding;
    - ``labeled_scale`` / ``unlabeled_scale``: what the host multiplies its own labeled loss and its
      (α-weighted) unlabeled losses by at this step (UniMatch: ``scale`` and ``scale``·ramp-up; 1
      and 0 in a labeled-only warm-up step), so a plug-in can keep eq.-7-style ratios to them;
    - ``warmup``: a labeled-only step (only ``x_l``, ``logits_l`` and ``features_l`` are real; the
      unlabeled fields are empty tensors).

    When a plug-in has ``needs_features`` (else ``None``): ``features_l`` / ``features_w``, encoder
    features (shallow to deep, with gradient) of the labeled and unlabeled pass, and
    ``teacher_features_w``, those of the network that made the pseudo-labels (detached).

    When a plug-in has ``needs_strong_features`` and the host mixes strong views (FixMatch,
    UniMatch), ``has_strong_views`` is True and, once the host's strong forward has run (before
    :meth:`~semiseg.plugins.base.Plugin.losses`; not yet in ``pixel_weights``, which the mix needs
    first), ``features_s`` holds per mixed strong view its encoder features (with gradient) and
    ``sources_s`` per strong view an N_u×H×W map of which image each pixel came from —
    :data:`SOURCE_OWN`, :data:`SOURCE_PARTNER` (the flipped batch), :data:`SOURCE_LABELED`
    (SupMix's ground truth). Until then, and on hosts without strong views, both are ``None``.

    ``extras``: per-step scratch space of the plug-ins, each under its own name (MPMC caches its
    step state there); hosts put nothing in it.
    """

    batch: Batch
    info: StepInfo
    logits_l: Tensor
    logits_w: Tensor
    pseudo_w: Tensor
    conf_w: Tensor
    ignore: Tensor
    features_l: list[Tensor] | None = None
    features_w: list[Tensor] | None = None
    teacher_features_w: list[Tensor] | None = None
    has_strong_views: bool = False
    features_s: list[list[Tensor]] | None = None
    sources_s: list[Tensor] | None = None
    labeled_scale: float = 1.0
    unlabeled_scale: float = 1.0
    warmup: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def labeled_only(
        cls, batch: Batch, info: StepInfo, logits_l: Tensor, features_l: list[Tensor] | None
    ) -> StepContext:
        """Context of a labeled-only warm-up step (``warmup=True``, ``unlabeled_scale=0``): the
        unlabeled fields are empty tensors and their features ``None``."""
        empty = logits_l.detach()[:0]
        return cls(
            batch, info, logits_l, empty, empty[:, 0].long(), empty[:, 0], empty[:, 0].to(torch.uint8),
            features_l=features_l, unlabeled_scale=0.0, warmup=True,
        )  # fmt: skip

    @classmethod
    def from_joint_pass(
        cls,
        batch: Batch,
        info: StepInfo,
        logits: Tensor,
        features: list[Tensor] | None,
        n_l: int,
        ignore: Tensor,
        pseudo: tuple[Tensor, Tensor] | None = None,
    ) -> StepContext:
        """Context of a joint forward of ``cat(x_l, x_w)``: split it and take detached pseudo-labels
        (``pseudo = (label, score)`` from the method's pseudo-label policy, else argmax / max of the
        softmax, as :func:`semiseg.losses.pseudo_label`)."""
        logits_l, logits_w = logits[:n_l], logits[n_l:]
        if pseudo is None:
            with torch.no_grad():
                conf_w, pseudo_w = logits_w.detach().softmax(dim=1).max(dim=1)
        else:
            pseudo_w, conf_w = pseudo
        return cls(
            batch, info, logits_l, logits_w, pseudo_w, conf_w, ignore,
            features_l=None if features is None else [f[:n_l] for f in features],
            features_w=None if features is None else [f[n_l:] for f in features],
            teacher_features_w=None if features is None else [f[n_l:].detach() for f in features],
        )  # fmt: skip


__all__ = [
    "IGNORE_INDEX",
    "SOURCE_LABELED",
    "SOURCE_OWN",
    "SOURCE_PARTNER",
    "Batch",
    "StepContext",
    "StepInfo",
]
