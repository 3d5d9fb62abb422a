"""Switching a module's train / eval mode for the length of a block, its previous mode restored after
(also when the block raises)::

    with eval_mode(model):
        logits = model(x)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: importing this module does not import torch
    from torch import nn


@contextmanager
def module_mode(module: nn.Module, train: bool) -> Iterator[nn.Module]:
    """``module`` in train mode (``train``) or eval mode inside the block; its previous mode
    (``module.training``, set again with ``module.train``) is restored after."""
    was_training = module.training
    module.train(train)
    try:
        yield module
    finally:
        module.train(was_training)


def eval_mode(module: nn.Module) -> AbstractContextManager[nn.Module]:
    """``module`` in eval mode inside the block, its previous mode restored after."""
    return module_mode(module, False)
