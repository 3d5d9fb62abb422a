"""What a training method is, and the batch it receives.

A method is an ``nn.Module`` that owns the segmenter (``self.model``, possibly DDP-wrapped as
``self.net``) plus whatever else it needs (an EMA teacher, plug-ins). The trainer calls
:meth:`Method.training_step` once per iteration and gets a :class:`~semiseg.step.StepResult`:
the loss back-propagated into the segmenter, the losses of extra optimizers the method lists in
:meth:`Method.extra_optimizers` (SUFD's discriminator), and values to log;
:func:`semiseg.step.apply_update` applies it. :meth:`after_step` runs after all optimizer steps
(EMA updates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models.base import Segmenter
from ..registry import METHODS
from ..step import StepResult
from ..types import Batch, StepInfo

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class MethodConfig:
    """Options every method understands; methods subclass this with their own fields."""

    name: str = "supervised"


class Method(nn.Module):
    """Base class of training methods. Subclasses set ``Config`` and implement ``training_step``."""

    Config: type[MethodConfig] = MethodConfig
    uses_unlabeled: bool = False

    @property
    def needs_labeled_strong(self) -> bool:
        """Whether batches must carry ``x_ls`` (a strong view of the labeled crop)."""
        return False

    @classmethod
    def check_run(cls, cfg: RunConfig) -> None:
        """Reject run settings (``cfg``: the whole :class:`~semiseg.config.RunConfig`) the method
        cannot train with, by :class:`~semiseg.errors.ConfigError` naming the key; called by
        :func:`semiseg.methods.build_method` before anything is built. Default: nothing to check."""

    def __init__(self, model: Segmenter, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.use_net(model)
        self.cfg = cfg
        self.num_classes = num_classes

    @property
    def net(self) -> nn.Module:
        """The module to call in training steps: ``self.model`` or its DDP wrapper."""
        return self.__dict__["_net"]

    def use_net(self, module: nn.Module) -> None:
        """Set the module training steps call (the trainer passes the DDP wrapper under torchrun).

        Kept out of ``_modules`` so ``state_dict()`` holds the weights once, under ``model.``.
        """
        self.__dict__["_net"] = module

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        """One training step on ``batch``: the loss, extra optimizers' losses and logged values."""
        raise NotImplementedError

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def extra_schedulers(self) -> dict[str, Callable[[int], None]]:
        """Per-step lr updates of extra optimizers: name -> fn(step)."""
        return {}

    def after_step(self, info: StepInfo) -> None:
        """Hook run after every optimizer step (EMA teachers, running statistics)."""

    def eval_model(self) -> nn.Module:
        """The network evaluated and saved as the run's result (a teacher, for some methods)."""
        return self.model


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Register a method class under ``method.name: <name>`` (its ``Config`` is the schema of the
    ``method`` section); a name registered twice is an error (:data:`semiseg.registry.METHODS`)."""
    return METHODS.register(name)


__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "StepInfo", "StepResult", "register_method"]
