"""semiseg.modes: a module's train / eval mode switched for a block and restored after."""

from __future__ import annotations

import pytest
from torch import nn

from semiseg.modes import eval_mode, module_mode


@pytest.mark.parametrize("start", [True, False])
def test_eval_mode_restores_the_previous_mode(start):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train(start)
    with eval_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training is start and model[1].training is start


def test_the_mode_is_restored_when_the_block_raises():
    model = nn.Linear(2, 2).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training


def test_module_mode_sets_train_mode_and_nests():
    model = nn.Linear(2, 2).eval()
    with module_mode(model, True):
        assert model.training
        with eval_mode(model):
            assert not model.training
        assert model.training
    assert not model.training
