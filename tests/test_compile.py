"""``train.compile`` (semiseg/compiling.py): every method family trains compiled with the eager
run's random draws and weights equal to rounding; a network that fails to compile trains eagerly
after a one-line warning; evaluation runs the eager forward; the setting is volatile."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_overrides
from torch import nn

import semiseg.compiling as compiling
from semiseg.checkpoint import load_checkpoint
from semiseg.compiling import eager, is_compiled
from semiseg.config import config_hash, load_config
from semiseg.trainer import Trainer

TINY_GUIDEDMIX = {
    "method.name": "guidedmix",
    "model.name": "guidedmix",
    "model.backbone": "resnet18",
    "model.backbone_widths": "[4, 8, 8, 8]",
    "model.output_stride": 32,
    "model.psp_channels": 8,
    "model.decoder_channels": "[8, 8, 8, 4, 4]",
}

FAMILIES = {
    "supervised": {"method.name": "supervised"},
    "fixmatch": {"method.name": "fixmatch"},
    "unimatch": {"method.name": "unimatch", "train.channels_last": "true"},
    "unimatch_supmix_sufd": {"method.name": "unimatch", "method.mix": "supmix", "plugins.sufd": "{}"},
    "mean_teacher": {"method.name": "mean_teacher"},
    "unimatch_mpmc": {"method.name": "unimatch", "plugins.mpmc": "{}"},
    "guidedmix": TINY_GUIDEDMIX,
}


def test_compile_is_volatile():
    base = load_config(None, ["method.name=unimatch"])
    assert config_hash(load_config(None, ["method.name=unimatch", "train.compile=true"])) == config_hash(base)


def test_eager_block_bypasses_the_compiled_forward():
    net = nn.Linear(2, 2)
    net.compile()  # lazy: nothing is compiled until a call
    assert is_compiled(net)
    with eager(net):
        assert not is_compiled(net)
        net(torch.zeros(1, 2))
    assert is_compiled(net)


def test_a_network_that_fails_to_compile_trains_eagerly_after_a_warning(tmp_path, monkeypatch, capsys):
    def failing_trial(model, sample):
        raise RuntimeError("inductor says no\nsecond line")

    monkeypatch.setattr(compiling, "_trial", failing_trial)
    cfg = load_config(None, tiny_overrides(iters=2, **{"train.compile": "true"}))
    trainer = Trainer(cfg, tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()
    warning = "warning: train.compile: UNet runs eagerly (compiling failed: RuntimeError: inductor says no)"
    assert err == [warning]
    assert trainer.compiled == [] and not is_compiled(trainer.model)
    assert trainer.fit().results["test"]["miou"] is not None


def _trained(tmp_path, name: str, overrides: list[str]) -> tuple[Trainer, dict, list[dict]]:
    trainer = Trainer(load_config(None, overrides), tmp_path / name)
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / name / "latest.pt")
    log = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, ckpt, [r for r in log if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # a first compilation on a busy 2-core machine takes minutes
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_family_trains_compiled_with_the_eager_numbers(tmp_path, family):
    """Compiled and eager from one seed: the network is compiled (no fallback); after one step the
    weights agree to float rounding (forward, backward and update); after three steps the random
    state is the eager run's (the same dropout and augmentation draws) and the logged losses agree
    to the rounding that discrete choices amplify (as ``train.channels_last``, test_trainer.py)."""
    for iters in (1, 3):
        overrides = tiny_overrides(iters=iters, **{"deterministic": True, **FAMILIES[family]})
        _, eager_ckpt, eager_log = _trained(tmp_path, f"eager{iters}", overrides)
        trainer, ckpt, log = _trained(tmp_path, f"compiled{iters}", [*overrides, "train.compile=true"])
        assert trainer.model in trainer.compiled and is_compiled(trainer.model)
        assert torch.equal(ckpt["rng"]["torch"], eager_ckpt["rng"]["torch"])
        if iters == 1:
            for key, value in eager_ckpt["model"].items():
                if value.is_floating_point():
                    assert torch.allclose(ckpt["model"][key], value, rtol=1e-4, atol=1e-5), key
                else:
                    assert torch.equal(ckpt["model"][key], value), key
    assert [r["step"] for r in log] == [r["step"] for r in eager_log]
    first = eager_log[0]
    for key in first:
        if key not in ("it/s", "step", "kind"):
            assert log[0][key] == pytest.approx(first[key], rel=1e-5, abs=1e-6), key
    assert [r["total"] for r in log] == pytest.approx([r["total"] for r in eager_log], rel=1e-2)
