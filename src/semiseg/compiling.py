"""``train.compile``: ``torch.compile`` (inductor) of the segmenter's forward and backward.

What is compiled: each network a training step calls (the segmenter, and a teacher the method
evaluates instead of it), by ``nn.Module.compile``: the module, its parameters and its state-dict
keys stay what they are, and every call of it in a training step (the gradient passes, the
eval-mode no-grad pseudo-label pass) runs a compiled graph, its backward through AOTAutograd's
compiled backward. Not the whole step: the methods draw boxes and masks with NumPy and read
tensors in Python, so a whole-step graph would break into many pieces. Not the evaluation:
:func:`eager` switches a compiled network back for a block (compiling a CHASE_DB1 test pass took
11 s with static and 32 s with dynamic shapes and made the pass no faster;
docs/studies/step-cost.md).

On CPU at cpu-small it does not pay, so it is off by default: a UniMatch step is 1.05× faster with
one thread (1.15× with two; the convolutions, half the step, stay the same oneDNN kernels), and a
whole one-thread cell runs at 0.99× the eager speed with inductor's kernel cache warm and 0.77× with
a cold one.

Same numbers: ``torch._inductor.config.fallback_random`` makes dropout draw from the eager random
stream in the eager order, and ``layout_optimization`` is off so that every buffer keeps eager's
memory format (with it on, a channels-last network's dropout noise, drawn into a contiguous
buffer, was stored channels-last: the same numbers at other positions, a 2.0 logit difference
after one forward). Tested on every method family: the random state after N steps equals the
eager run's and the weights agree to rounding. ``dynamic=False`` compiles one static graph per
input shape (the fixed crop gives a handful). Compile time counts in a run's time; inductor's
on-disk cache makes every later run of the same network and shapes start in seconds.

Failure: before training, :func:`compile_networks` runs a forward + backward of each compiled
network on a zero batch (its weights, buffers, gradients and the random state restored after); if
that fails, the network stays eager and a one-line warning says so. A graph that fails to compile
later (a new shape) runs eagerly (``torch._dynamo.config.suppress_errors``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .models.base import Segmenter
from .modes import module_mode

__all__ = ["compile_networks", "eager", "is_compiled"]

#: Static graphs a network may accumulate (shapes × train/eval × grad modes × call options).
RECOMPILE_LIMIT = 64


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` runs through a ``nn.Module.compile`` graph."""
    return getattr(module, "_compiled_call_impl", None) is not None


@contextmanager
def eager(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``module(...)`` runs its eager forward even when it was compiled."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled


def _configure() -> None:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # dropout: the eager random stream, same draws
    # Keep every buffer in the memory format eager gives it: with layout optimisation inductor may
    # store a channels-last network's dropout noise (drawn into a contiguous ``empty``, see
    # models.base.Dropout) channels-last, i.e. draw the same numbers into other positions.
    inductor_config.layout_optimization = False
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)


def _trial(model: Segmenter, sample: torch.Tensor) -> None:
    """Compile (and run) the network's train-mode forward + backward (forward only when its weights
    take no gradient) and its eval-mode no-grad forward on ``sample``; the weights, buffers,
    gradients, mode and random state are restored."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {p: p.grad for p in model.parameters()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with module_mode(model, True):  # the mode is restored first, as the weights after it
            out = model(sample)
            if out.requires_grad:  # a teacher's weights take no gradient
                out.float().sum().backward()
            model.eval()
            with torch.no_grad():
                model(sample)
    finally:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(saved[key])
        for p, g in grads.items():
            p.grad = g
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def compile_networks(
    networks: list[Segmenter], sample: torch.Tensor, mode: str | None = None, warn: bool = True
) -> list[Segmenter]:
    """Compile each network in place (``nn.Module.compile(dynamic=False)``; ``mode``: inductor's
    mode, None for its default) after a trial pass on ``sample`` (module docstring); a network
    whose trial fails is left eager with a one-line warning on stderr. Returns the compiled ones."""
    import torch._dynamo.config as dynamo_config

    _configure()
    compiled = []
    for net in dict.fromkeys(networks):  # a network listed twice is compiled once
        net.compile(dynamic=False, mode=mode)
        try:
            with dynamo_config.patch(suppress_errors=False):  # the trial must see a failure
                _trial(net, sample)
        except Exception as exc:  # any compiler failure: keep the eager network
            net._compiled_call_impl = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if warn:
                print(
                    f"warning: train.compile: {type(net).__name__} runs eagerly "
                    f"(compiling failed: {type(exc).__name__}: {first[:160]})",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        compiled.append(net)
    dynamo_config.suppress_errors = True  # a graph that fails to compile later runs eagerly
    return compiled
