"""The training-step contract: what a method's step returns, and the one update that applies it.

A method's :meth:`~semiseg.methods.Method.training_step` returns a :class:`StepResult`:

- ``loss``: the scalar back-propagated into the segmenter (and into the modules that
  ``steps_with_loss`` names);
- ``optimizer_losses``: ``{extra optimizer name: loss}`` for modules trained by an optimizer of
  their own on a loss of their own (SUFD's discriminator): after the segmenter's step, each is
  zeroed, back-propagated and stepped, in the order the method registers its optimizers;
- ``steps_with_loss``: extra optimizers whose modules get their whole gradient from ``loss``'s
  backward (MPMC's head): zeroed with the segmenter's optimizer and stepped after it, this step;
- ``logs``: values to log (tensors or floats; never back-propagated).

:func:`apply_update` is the single place that turns a result into optimizer steps; the trainer and
the tests call it, so there is one update order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class StepResult:
    """What one training step hands the trainer (see the module docstring)."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    optimizer_losses: dict[str, Tensor] = field(default_factory=dict)
    steps_with_loss: set[str] = field(default_factory=set)

    def named(self) -> dict[str, Tensor | float]:
        """Every value under its logged name: ``logs``, ``total`` (the segmenter's loss) and
        ``total/<optimizer>`` for each optimizer loss (tensors keep their graphs)."""
        values: dict[str, Tensor | float] = {**self.logs, "total": self.loss}
        values.update({f"total/{name}": value for name, value in self.optimizer_losses.items()})
        return values

    def logged(self) -> dict[str, float]:
        """:meth:`named`'s values as floats: what the trainer logs."""
        return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in self.named().items()}


def apply_update(
    result: StepResult,
    optimizer: torch.optim.Optimizer,
    extra_optimizers: Mapping[str, torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
    sync: Callable[[torch.optim.Optimizer], None] | None = None,
) -> None:
    """Back-propagate and step: the segmenter's ``optimizer`` (with ``steps_with_loss``) on
    ``result.loss``, then every extra optimizer named by the result, in ``extra_optimizers``'
    order; ``sync`` (DDP: average an extra optimizer's gradients over ranks) runs before each
    extra step. ``scaler.update()`` once, at the end."""
    unknown = (set(result.optimizer_losses) | result.steps_with_loss) - set(extra_optimizers)
    if unknown:
        raise KeyError(f"step result names optimizers {sorted(unknown)} the method does not register")
    optimizer.zero_grad(set_to_none=True)
    for name in result.steps_with_loss:
        extra_optimizers[name].zero_grad(set_to_none=True)
    scaler.scale(result.loss).backward()
    scaler.step(optimizer)
    for name, extra in extra_optimizers.items():
        if name in result.optimizer_losses:
            extra.zero_grad(set_to_none=True)
            scaler.scale(result.optimizer_losses[name]).backward()
        elif name not in result.steps_with_loss:
            continue  # nothing trains it this step (e.g. a labeled-only warm-up step)
        if sync is not None:
            sync(extra)
        scaler.step(extra)
    scaler.update()


__all__ = ["StepResult", "apply_update"]
