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
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..config import METHOD_CONFIGS
from ..models.base import Segmenter


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

    def extra_schedulers(self) -> dict[str, Callable[[int], None]]:
        """Per-step lr updates of extra optimizers: name -> fn(step)."""
        return {}

    def after_step(self, info: StepInfo) -> None:
        """Hook run after every optimizer step (EMA teachers, running statistics)."""

    def eval_model(self) -> nn.Module:
        """The network evaluated and saved as the run's result (a teacher, for some methods)."""
        return self.model


METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        METHOD_CONFIGS[name] = cls.Config
        return cls

    return wrap
