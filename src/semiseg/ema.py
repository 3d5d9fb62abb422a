"""Exponential moving average of a network's weights: the one EMA implementation of semiseg.

Used for weight-averaged evaluation (``eval.ema``: the trainer keeps a :class:`ModelEma` of the
segmenter and evaluates it beside the final weights) and by EMA teachers (Mean Teacher's
``teacher``; a ``method.teacher: ema`` teacher holds a :class:`ModelEma` and calls
:meth:`ModelEma.update` after each step, forwarding through :attr:`ModelEma.module`).

The update, after every optimizer step (Polyak & Juditsky 1992; Tarvainen & Valpola 2017)::

    θ̄_k = d_k·θ̄_{k−1} + (1 − d_k)·θ_k          parameters and floating-point buffers
    d_k = min(d, 1 − 1/(k + 1))                  with warm-up (k = updates so far, from 0)
    d_k = d                                      without

``k = 0`` copies the weights. With the warm-up θ̄ is the plain mean of every weight seen while
``1 − 1/(k+1) < d`` (the first ``1/(1−d)`` updates), then an EMA of horizon ``1/(1−d)`` updates,
so a long decay never keeps a visible share of the random initialisation (with ``d = 0.999`` and no
warm-up, ``0.999^2000 = 13.5 %`` of the average after 2000 steps would be the initial weights).
This is Mean Teacher's schedule (its original code); timm's ``ModelEmaV3`` warm-up
(``1 − (1 + k/γ)^−p``) differs only in the shape of the ramp.

**Implementation: a ModelEmaV3-style multi-tensor update**, ``torch._foreach_mul_(θ̄, d)`` then
``torch._foreach_add_(θ̄, θ, alpha=1 − d)`` over every parameter and floating-point buffer at
once; integer buffers (BatchNorm's ``num_batches_tracked``) are copied. Multiply-then-add rather
than ``_foreach_lerp_`` because it is bit-identical to the per-tensor ``t.mul_(d).add_(s,
alpha=1 − d)`` loop Mean Teacher's committed runs used (``lerp`` rounds differently).

**BatchNorm.** The update averages the running statistics like the weights (ModelEmaV3's default
and Mean Teacher's: what a teacher forwards with during training). For *evaluation* that is not
right for a long average: the averaged statistics mix activations of weights from the whole
horizon, not those of the averaged weights. Measured on validation images only
(``benchmarks/ema_check.py``, docs/studies/weight-averaging.md; supervised cpu-small,
mIoU with averaged vs recomputed statistics): ``d = 0.999``: 54.21 vs 59.75 (COVID, all labels,
mean of 3 seeds), 58.27 vs 59.60 (CHASE_DB1 1/8); ``d = 0.99``: 60.29 vs 60.46 and 61.74 vs 62.40.
So the evaluated average gets **statistics recomputed for its own weights**,
``torch.optim.swa_utils.update_bn``'s way (:func:`recompute_batchnorm`: a cumulative mean over N
training batches forwarded in train mode, N = ``eval.ema_bn_batches``; 50 and 200 batches agreed
within 0.6 mIoU), on a copy (:meth:`ModelEma.for_evaluation`), so the average itself goes on
unchanged. The trainer draws those batches (weak views) from streams of their own, seeds their
dropout and restores every random state after, so evaluating the average cannot touch the training
trajectory. ``eval.ema_bn_batches: 0`` evaluates the averaged statistics.

Why not ``swa_utils.AveragedModel`` for the average itself: its EMA function is a fixed-decay
``_foreach_lerp_`` (no warm-up ramp, and not bit-identical to Mean Teacher's multiply-add), and
with ``use_buffers=True`` it also blends integer buffers; ``update_bn`` is the part of
``swa_utils`` used here.

**DDP.** After DDP's gradient all-reduce every rank steps identical parameters, so every rank's
averaged parameters are identical. BatchNorm buffers are per rank (each rank's running statistics,
and the statistics it recomputes, come from its own batches unless SyncBatchNorm), so they may
differ across ranks: :func:`broadcast_buffers` gives every rank rank 0's before an evaluation, and
checkpoints (written by rank 0) hold rank 0's: what is evaluated and what resumes is rank 0's
average, exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

__all__ = ["ModelEma", "broadcast_buffers", "decay_at", "ema_update", "has_batchnorm", "recompute_batchnorm"]


def decay_at(decay: float, updates: int, warmup: bool = True) -> float:
    """``d_k``: ``min(d, 1 − 1/(k+1))`` with warm-up (``k = updates``, 0 copies), else ``d``."""
    return min(decay, 1.0 - 1.0 / (updates + 1)) if warmup else decay


def _pairs(average: nn.Module, model: nn.Module) -> Iterator[tuple[Tensor, Tensor]]:
    yield from zip(average.parameters(), model.parameters(), strict=True)
    yield from zip(average.buffers(), model.buffers(), strict=True)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``θ̄ ← d·θ̄ + (1 − d)·θ`` for parameters and floating-point buffers of ``average`` (a copy of
    ``model``'s architecture); other buffers (BatchNorm's ``num_batches_tracked``) are copied.

    One multi-tensor multiply and one multi-tensor add (bit-identical to the per-tensor
    ``t.mul_(d).add_(s, alpha=1 − d)`` loop on CPU: tested)."""
    floats_avg: list[Tensor] = []
    floats_new: list[Tensor] = []
    for avg, new in _pairs(average, model):
        if avg.is_floating_point():
            floats_avg.append(avg)
            floats_new.append(new.detach())
        else:
            avg.copy_(new)
    if floats_avg:
        torch._foreach_mul_(floats_avg, decay)
        torch._foreach_add_(floats_avg, floats_new, alpha=1.0 - decay)


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer with running statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules()
    )


@torch.no_grad()
def recompute_batchnorm(module: nn.Module, batches: Iterable[Tensor]) -> None:
    """Replace the BatchNorm running statistics of ``module`` by their cumulative mean over
    ``batches`` forwarded in train mode (``torch.optim.swa_utils.update_bn``: momentum ``None``,
    i.e. the mean of the batch means and of the unbiased batch variances); mode and momenta are
    restored."""
    update_bn(batches, module)


class ModelEma(nn.Module):
    """An exponential moving average of ``model`` (module docstring), as a module.

    ``module`` is the averaged network (a deep copy of ``model`` at construction, gradients off, in
    eval mode unless a caller sets otherwise): forward through it. :meth:`update` folds the current
    weights of ``model`` in. ``state_dict()`` holds ``module.*`` and ``updates`` (the count ``k``),
    so a checkpoint round trip resumes the average exactly.

    Args:
        model: the network to average (its architecture and current weights are copied).
        decay: ``d`` in [0, 1).
        warmup: the ``min(d, 1 − 1/(k+1))`` ramp (plain mean over the first ``1/(1−d)`` updates).
    """

    updates: Tensor

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        """``d_k`` of the next update."""
        return decay_at(self.decay, int(self.updates), self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (``d_k``, then ``k ← k + 1``)."""
        ema_update(self.module, model, self.current_decay())
        self.updates += 1

    def train(self, mode: bool = True) -> ModelEma:
        """The averaged network stays in eval mode (its statistics are averaged, never updated by
        a forward); ``module.train()`` can still be called on purpose."""
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def for_evaluation(self, batches: Iterable[Tensor] | None) -> nn.Module:
        """The network to evaluate: a copy of the average with BatchNorm statistics recomputed over
        ``batches`` (:func:`recompute_batchnorm`, in eval mode), or the average itself when
        ``batches`` is None or it has no BatchNorm."""
        if batches is None or not has_batchnorm(self.module):
            return self.module
        model = copy.deepcopy(self.module)
        recompute_batchnorm(model, batches)
        return model.eval()

    def broadcast_buffers(self, src: int = 0) -> None:
        """:func:`broadcast_buffers` of the average."""
        broadcast_buffers(self.module, src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Under ``torch.distributed``: every rank takes rank ``src``'s buffers of ``module`` (an
    average's parameters are identical on every rank already; module docstring)."""
    if dist.is_available() and dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=src)
