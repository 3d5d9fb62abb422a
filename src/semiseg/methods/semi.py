"""What every semi-supervised method shares: the unlabeled-loss recipe.

:class:`SemiSupervisedConfig` holds the options that FixMatch, UniMatch and Mean Teacher read
alike, and :class:`UnlabeledRecipe` turns them into a step's numbers:

* ``pseudo`` — the pseudo-label policy (:mod:`semiseg.pseudo_labels`: fixed / FreeMatch /
  FlexMatch masks, distribution alignment toward the labeled prior);
* ``warmup_iters`` — the first steps are labeled-only (exactly the supervised step: the unlabeled
  passes are skipped, and so are plug-ins, except the labeled terms of those that ``train_in_warmup``:
  MPMC's patch loss);
* ``rampup_iters`` — after the warm-up the unlabeled weight follows SSL4MIS's sigmoid ramp-up
  ``w(t) = exp(−5(1 − t/L)²)`` over ``L`` steps (0: no ramp);
* ``labeled_weight`` — ``null`` keeps each method's own formula (UniMatch's
  ``(loss_x + Σ λ_j·loss_j)/2``); a number ``a`` decouples the labeled term:
  ``a·loss_x + scale·w(t)·Σ λ_j·loss_j``;
* ``unlabeled_loss`` — ``ce`` (UniMatch's masked CE), ``dice`` (the official medical UniMatch:
  class-averaged Dice over confident pixels, squared-sum denominators, background included) or
  ``balanced_ce`` (CE weighted by ``1/(C·π_c)``, ``π`` the running labeled class prior);
* ``diagnostics`` — per-class pseudo-label shares logged every step
  (:func:`~semiseg.pseudo_labels.pseudo_label_diagnostics`).

Every option's default reproduces the runs made before the option existed, and the config hash
leaves it out at that default (:data:`semiseg.config_hashing.MIGRATIONS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..losses import class_balance_weights, masked_pseudo_ce, masked_pseudo_dice
from ..pseudo_labels import PseudoLabelConfig, PseudoLabeler, PseudoLabels, pseudo_label_diagnostics
from ..step import StepResult
from .supervised import SupervisedConfig

UnlabeledLoss = Literal["ce", "dice", "balanced_ce"]


@dataclass
class SemiSupervisedConfig(SupervisedConfig):
    """Options shared by every method that learns from unlabeled images (module docstring)."""

    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    warmup_iters: int = 0
    rampup_iters: int = 0
    labeled_weight: float | None = None
    unlabeled_loss: UnlabeledLoss = "ce"
    diagnostics: bool = True

    def validate_semi(self, prefix: str) -> None:
        if self.warmup_iters < 0:
            raise ConfigError(f"{prefix}.warmup_iters: must be >= 0, got {self.warmup_iters}")
        if self.rampup_iters < 0:
            raise ConfigError(f"{prefix}.rampup_iters: must be >= 0, got {self.rampup_iters}")
        if self.labeled_weight is not None and self.labeled_weight < 0:
            raise ConfigError(f"{prefix}.labeled_weight: must be >= 0, got {self.labeled_weight}")
        if self.dice_weight < 0:
            raise ConfigError(f"{prefix}.dice_weight: must be >= 0, got {self.dice_weight}")
        self.pseudo.validate(f"{prefix}.pseudo")


def sigmoid_rampup(step: float, length: float) -> float:
    """Laine & Aila's ramp-up ``exp(−5(1 − t)²)``, ``t = clip(step / length, 0, 1)``; 1 if length ≤ 0."""
    if length <= 0:
        return 1.0
    t = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class UnlabeledRecipe(nn.Module):
    """The pseudo-labeler plus the schedule and loss choices of a :class:`SemiSupervisedConfig`.

    A submodule of the method, so the policy's running statistics are saved with it."""

    def __init__(self, cfg: SemiSupervisedConfig, num_classes: int, threshold: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.labeler = PseudoLabeler(cfg.pseudo, num_classes, threshold)

    def in_warmup(self, step: int) -> bool:
        return step < self.cfg.warmup_iters

    def ramp(self, step: int) -> float:
        """Unlabeled weight multiplier ``w(t)`` (1.0 exactly without a ramp)."""
        return sigmoid_rampup(step - self.cfg.warmup_iters, self.cfg.rampup_iters)

    def scales(self, step: int, scale: float) -> tuple[float, float]:
        """The ``(labeled, unlabeled)`` multipliers :meth:`total` applies at ``step`` outside a
        warm-up: ``scale`` (or ``labeled_weight``) and ``scale·w(t)`` (plug-ins follow them)."""
        labeled = scale if self.cfg.labeled_weight is None else self.cfg.labeled_weight
        return labeled, scale * self.ramp(step)

    def total(self, loss_x: Tensor, terms: list[Tensor], scale: float, step: int) -> Tensor:
        """``scale·(loss_x + w·Σ terms)`` (the methods' own formula; summed left to right exactly as
        before these options existed when ``w = 1``) or ``a·loss_x + scale·w·Σ terms``."""
        w = self.ramp(step)
        if self.cfg.labeled_weight is None and w == 1.0:
            acc = loss_x
            for term in terms:
                acc = acc + term
            return scale * acc
        unlabeled = torch.stack(terms).sum() if terms else loss_x.new_zeros(())
        labeled = scale * loss_x if self.cfg.labeled_weight is None else self.cfg.labeled_weight * loss_x
        return labeled + scale * w * unlabeled

    def warmup_result(self, loss_x: Tensor, names: list[str]) -> StepResult:
        """A labeled-only step: the loss is ``loss_x``; the unlabeled terms are logged as 0."""
        zero = loss_x.detach() * 0.0
        return StepResult(loss=loss_x, logs={"loss_x": loss_x, **{name: zero for name in names}})

    def loss(
        self,
        logits: Tensor,
        label: Tensor,
        score: Tensor,
        ignore: Tensor,
        threshold: float,
        weight: Tensor | None,
    ) -> Tensor:
        """One unlabeled term with the configured loss (pixels used iff ``score ≥ threshold``)."""
        kind = self.cfg.unlabeled_loss
        if kind == "dice":
            return masked_pseudo_dice(logits, label, score, ignore, threshold, weight)
        class_weight = class_balance_weights(self.labeler.prior) if kind == "balanced_ce" else None
        return masked_pseudo_ce(logits, label, score, ignore, threshold, weight, class_weight)

    def observe_labeled(self, y_l: Tensor) -> None:
        """Update the labeled class prior, when something reads it (an adaptive policy, balanced
        CE): at the defaults the step pays no bincount, device sync or DDP collective for it."""
        if not self.labeler.is_fixed or self.cfg.unlabeled_loss == "balanced_ce":
            self.labeler.observe_labeled(y_l)

    def diagnostics(
        self, pseudo_u: PseudoLabels, ignore_u: Tensor, logits_l: Tensor, y_l: Tensor
    ) -> dict[str, Tensor]:
        if not self.cfg.diagnostics:
            return {}
        with torch.no_grad():
            pseudo_l = self.labeler(logits_l.detach())
        return pseudo_label_diagnostics(pseudo_u, ignore_u, pseudo_l, y_l, self.num_classes)
