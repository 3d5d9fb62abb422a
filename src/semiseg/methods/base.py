"""What a training method is, and the batch it receives.

A method is an ``nn.Module`` that owns the segmenter (``self.model``, possibly DDP-wrapped as
``self.net``) plus whatever else it needs (an EMA teacher, plug-ins). The trainer calls
:meth:`Method.training_step` once per iteration and gets a dict of named losses; ``"total"`` is
back-propagated into the segmenter. A method or plug-in that owns another optimizer (SUFD's
discriminator) returns its loss under ``"total/<optimizer name>"`` and lists the optimizer in
:meth:`Method.extra_optimizers`; the trainer zeroes, back-propagates and steps it after the
segmenter's step. :meth:`after_step` runs after all optimizer steps (EMA updates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..models.base import Segmenter
from ..registry import METHODS
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

    def training_step(self, batch: Batch, info: StepInfo) -> dict[str, Tensor]:
        raise NotImplementedError

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def extra_optimizers_on_total(self) -> set[str]:
        """Extra optimizers whose parameters get their whole gradient from ``total`` (the trainer
        zeroes them with the segmenter's and steps them after ``total``'s backward, without a
        backward of their own ``total/<name>``, which is then only logged)."""
        return set()

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


__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "StepInfo", "register_method"]
