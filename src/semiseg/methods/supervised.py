"""Supervised baseline: labeled loss only, with the same augmentations and schedule as the
semi-supervised methods, so that it is the bar they have to clear."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import dice_loss, supervised_ce
from .base import Batch, Method, MethodConfig, StepInfo, StepResult, register_method


@dataclass
class SupervisedConfig(MethodConfig):
    name: str = "supervised"
    dice_weight: float = 0.0  # > 0: loss_x = (CE + w·Dice) / (1 + w) (the medical UniMatch variant uses 1)
    # Dice denominators Σp² + Σt² (SSL4MIS / official medical UniMatch) instead of Σp + Σt.
    dice_squared: bool = False

    def labeled_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``loss_x`` of this config (see :func:`labeled_loss`)."""
        return labeled_loss(logits, target, self.dice_weight, self.dice_squared)


def labeled_loss(logits: Tensor, target: Tensor, dice_weight: float, squared: bool = False) -> Tensor:
    """``loss_x``: CE, or (CE + w·Dice)/(1 + w) for the medical variant."""
    ce = supervised_ce(logits, target)
    if dice_weight <= 0:
        return ce
    return (ce + dice_weight * dice_loss(logits, target, squared=squared)) / (1.0 + dice_weight)


@register_method("supervised")
class Supervised(Method):
    Config = SupervisedConfig
    uses_unlabeled = False

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        loss_x = self.cfg.labeled_loss(self.net(batch.x_l), batch.y_l)
        return StepResult(loss=loss_x, logs={"loss_x": loss_x})
