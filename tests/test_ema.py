"""The one EMA (semiseg/ema.py) and weight-averaged evaluation (``eval.ema``): the multi-tensor
update against a per-tensor loop, decay and warm-up, BatchNorm buffers, state round trips, an
untouched training trajectory, exact resume and the results' shape."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import tiny_overrides, torchrun_train
from torch import nn

from semiseg.checkpoint import average_state_from_checkpoint, load_checkpoint
from semiseg.config import config_hash, hashed_tree, load_config
from semiseg.ema import ModelEma, decay_at, ema_update, has_batchnorm, recompute_batchnorm
from semiseg.errors import ConfigError
from semiseg.trainer import Trainer, train


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


@torch.no_grad()
def loop_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """Brute force: one tensor at a time (Mean Teacher's update before the shared module)."""
    for t, s in zip(average.parameters(), model.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(average.buffers(), model.buffers(), strict=True):
        if t.is_floating_point():
            t.mul_(decay).add_(s, alpha=1.0 - decay)
        else:
            t.copy_(s)


def train_a_little(model: nn.Module, steps: int = 1) -> None:
    """Change weights and BatchNorm statistics the way training does."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8)
        if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def assert_states_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("channels_last", [False, True])
def test_update_is_bit_identical_to_the_per_tensor_loop(channels_last):
    torch.manual_seed(0)
    model = tiny_net()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fast, slow = copy.deepcopy(model), copy.deepcopy(model)
    for k in range(12):
        train_a_little(model)
        decay = decay_at(0.9, k) if k % 2 else 0.37 + 0.05 * k
        ema_update(fast, model, decay)
        loop_update(slow, model, decay)
    assert_states_equal(fast, slow)
    if channels_last:
        assert fast[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_decay_schedule_and_warmup():
    assert decay_at(0.999, 0) == 0.0  # the first update copies the weights
    assert decay_at(0.999, 9) == pytest.approx(0.9)
    assert decay_at(0.999, 999) == pytest.approx(0.999)
    assert decay_at(0.999, 10**6) == 0.999
    assert decay_at(0.999, 0, warmup=False) == 0.999
    with pytest.raises(ValueError):
        ModelEma(tiny_net(), 1.0)


def test_warmup_average_is_the_plain_mean_then_an_ema():
    """With the warm-up, the first 1/(1−d) updates give the plain mean of the weights seen; after
    that each update is θ̄ ← d·θ̄ + (1 − d)·θ."""
    model = nn.Linear(3, 1, bias=False)
    ema = ModelEma(model, decay=0.75)  # plain mean over the first 4 updates
    seen = []
    for value in (1.0, 2.0, 6.0, 3.0):
        model.weight.data.fill_(value)
        ema.update(model)
        seen.append(value)
        assert ema.module.weight.mean().item() == pytest.approx(sum(seen) / len(seen))
    model.weight.data.fill_(10.0)
    before = ema.module.weight.mean().item()
    ema.update(model)
    assert ema.module.weight.mean().item() == pytest.approx(0.75 * before + 0.25 * 10.0)
    assert int(ema.updates) == 5

    no_warmup = ModelEma(nn.Linear(3, 1, bias=False), decay=0.5, warmup=False)
    start = no_warmup.module.weight.detach().clone()
    model.weight.data.fill_(4.0)
    no_warmup.update(model)
    assert torch.allclose(no_warmup.module.weight, 0.5 * start + 2.0)


def test_batchnorm_statistics_are_averaged_and_counters_copied():
    torch.manual_seed(1)
    model = tiny_net()
    ema = ModelEma(model, decay=0.5, warmup=False)
    old_mean = ema.module[1].running_mean.clone()
    train_a_little(model, steps=3)
    ema.update(model)
    bn, bn_avg = model[1], ema.module[1]
    assert torch.allclose(bn_avg.running_mean, 0.5 * old_mean + 0.5 * bn.running_mean)
    assert int(bn_avg.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    # the average is never trained and never updates its own statistics by a forward
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.module.training
    stats = bn_avg.running_mean.clone()
    ema(torch.randn(2, 3, 8, 8))
    assert torch.equal(bn_avg.running_mean, stats)


def test_recomputed_statistics_are_the_mean_over_the_batches():
    """Brute force: running mean = mean of the batch means, running variance = mean of the unbiased
    batch variances of the BN input, over the batches (swa_utils.update_bn's definition)."""
    torch.manual_seed(3)
    model = tiny_net()
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    with torch.no_grad():
        conv = [model[0](x) for x in batches]
    recompute_batchnorm(model, batches)
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv])
    variances = torch.stack([c.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for c in conv])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-6)
    assert torch.allclose(model[1].running_var, variances.mean(0), atol=1e-5)
    assert model[1].momentum == 0.1 and model.training  # restored
    assert has_batchnorm(model) and not has_batchnorm(nn.Linear(2, 2))


def test_evaluation_copy_leaves_the_average_unchanged():
    torch.manual_seed(4)
    model = tiny_net()
    ema = ModelEma(model, decay=0.9)
    train_a_little(model, steps=2)
    ema.update(model)
    before = copy.deepcopy(ema.state_dict())
    evaluated = ema.for_evaluation(iter([torch.randn(2, 3, 8, 8) for _ in range(3)]))
    assert evaluated is not ema.module and not evaluated.training
    assert int(evaluated[1].num_batches_tracked) == 3
    assert not torch.equal(evaluated[1].running_mean, ema.module[1].running_mean)
    for key, value in ema.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(evaluated[0].weight, ema.module[0].weight)
    assert ema.for_evaluation(None) is ema.module


def test_state_dict_round_trip_resumes_the_average_exactly():
    torch.manual_seed(2)
    model = tiny_net()
    ema = ModelEma(model, decay=0.9)
    for _ in range(5):
        train_a_little(model)
        ema.update(model)
    state = copy.deepcopy(ema.state_dict())
    assert "updates" in state and int(state["updates"]) == 5
    restored = ModelEma(tiny_net(), decay=0.9)
    restored.load_state_dict(state)
    for _ in range(4):
        train_a_little(model)
        ema.update(model)
        restored.update(model)
    assert_states_equal(ema, restored)


def test_mean_teacher_uses_the_shared_update():
    from semiseg.methods import mean_teacher

    assert mean_teacher.ema_update is ema_update


# ----------------------------------------------------------------------------------------------
# The trainer: eval.ema
# ----------------------------------------------------------------------------------------------

EMA_ON = ["eval.ema=true", "eval.ema_decay=0.9"]


def method_state(run_dir) -> dict:
    return load_checkpoint(run_dir / "latest.pt")["model"]


def test_config_is_hash_neutral_and_checked():
    base = load_config(None, ["method.name=unimatch"])
    assert not any(k.startswith("ema") for k in hashed_tree(base)["eval"])
    assert config_hash(load_config(None, ["method.name=unimatch", "eval.ema=true"])) != config_hash(base)
    for bad in ("eval.ema_decay=1.0", "eval.ema_decay=-0.1", "eval.ema_start=-1", "eval.ema_bn_batches=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.parametrize("method", ["supervised", "mean_teacher"])
def test_training_trajectory_is_untouched(tmp_path, method):
    """Weights after N steps are bit-identical with and without the average (evaluated at every
    validation, its BatchNorm statistics recomputed from training batches); the final weights'
    results are the same and the average's sit under results[split]["ema"]."""
    common = tiny_overrides(iters=5, **{"method.name": method, "deterministic": True, "train.eval_every": 2})
    plain = train(load_config(None, common), run_dir=tmp_path / "plain")
    averaged = train(load_config(None, [*common, *EMA_ON]), run_dir=tmp_path / "ema")
    a, b = method_state(tmp_path / "plain"), method_state(tmp_path / "ema")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    test_plain, test_ema = plain.results["test"], averaged.results["test"]
    assert "ema" not in test_plain
    assert test_ema["miou"] == test_plain["miou"]
    assert set(test_ema["ema"]) >= {"miou", "mdice", "iou", "dice", "confusion"}
    assert set(test_ema["ema"]["iou"]) == set(test_plain["iou"])
    saved = json.loads((tmp_path / "ema" / "results.json").read_text())
    assert saved["weights"] == "final" and saved["results"]["test"]["ema"]["miou"] == test_ema["ema"]["miou"]
    val = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["kind"] == "val"]
    assert val and all("miou" in r and "ema/miou" in r for r in val)


def test_the_average_in_the_checkpoint_is_the_one_evaluated(tmp_path):
    cfg = load_config(None, tiny_overrides(iters=4, **{"deterministic": True}) + EMA_ON)
    result = train(cfg, run_dir=tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert int(ckpt["ema"]["updates"]) == 4
    trainer = Trainer(cfg, tmp_path / "run", resume=True)
    trainer.load(tmp_path / "run" / "latest.pt")
    assert trainer.evaluate_average("test")["miou"] == result.results["test"]["ema"]["miou"]
    assert trainer.evaluate_split("test")["miou"] == result.results["test"]["miou"]


def test_averaged_statistics_are_evaluated_with_zero_bn_batches(tmp_path):
    cfg = load_config(
        None, tiny_overrides(iters=3, **{"deterministic": True}) + [*EMA_ON, "eval.ema_bn_batches=0"]
    )
    result = train(cfg, run_dir=tmp_path / "run")
    trainer = Trainer(cfg, tmp_path / "run", resume=True)
    trainer.load(tmp_path / "run" / "latest.pt")
    direct = trainer.evaluate_split("test", model=trainer.ema.module)
    assert direct["confusion"] == result.results["test"]["ema"]["confusion"]


def test_ema_start_leaves_early_steps_out(tmp_path):
    overrides = tiny_overrides(iters=4, **{"deterministic": True})
    cfg = load_config(None, [*overrides, *EMA_ON, "eval.ema_start=3"])
    train(cfg, run_dir=tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert int(ckpt["ema"]["updates"]) == 1  # only step 3 (0-based): a copy of the final weights
    prefix = ckpt["eval_prefix"]
    average = average_state_from_checkpoint(ckpt)
    assert average is not None and average.keys() == {
        k[len(prefix) :] for k in ckpt["model"] if k.startswith(prefix)
    }
    for key, value in average.items():
        assert torch.equal(value, ckpt["model"][prefix + key]), key
    assert average_state_from_checkpoint({"model": {}}) is None


def test_interrupted_and_resumed_run_has_the_uninterrupted_average(tmp_path, monkeypatch):
    overrides = tiny_overrides(iters=6, **{"method.name": "fixmatch", "deterministic": True}) + EMA_ON
    train(load_config(None, overrides), run_dir=tmp_path / "whole")

    original = Trainer.train_step

    def crash_at_3(self, batch, info):
        if info.step == 3:
            raise RuntimeError("simulated crash")
        return original(self, batch, info)

    monkeypatch.setattr(Trainer, "train_step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(None, overrides), run_dir=tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "train_step", original)
    assert load_checkpoint(tmp_path / "resumed" / "latest.pt")["step"] == 2
    train(load_config(None, overrides), run_dir=tmp_path / "resumed", resume=True)
    whole = load_checkpoint(tmp_path / "whole" / "latest.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "latest.pt")
    assert whole["ema"].keys() == resumed["ema"].keys()
    for key in whole["ema"]:
        assert torch.equal(whole["ema"][key], resumed["ema"][key]), key
    a = json.loads((tmp_path / "whole" / "results.json").read_text())["results"]["test"]["ema"]
    b = json.loads((tmp_path / "resumed" / "results.json").read_text())["results"]["test"]["ema"]
    assert a["confusion"] == b["confusion"]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_evaluate_rank_zeros_average(tmp_path):
    """Under DDP the averaged parameters agree on every rank; the evaluated (and saved) average is
    rank 0's: one process evaluating the saved average gets the two ranks' confusion matrix."""
    run = tmp_path / "ddp"
    # ema_bn_batches=0: the averaged BatchNorm statistics, so the saved average alone decides the
    # evaluation (recomputed statistics would come from a different data stream in one process)
    overrides = tiny_overrides(iters=4, **{"data.synthetic.num_test": 3, "train.device": "cpu"}) + [
        *EMA_ON,
        "eval.ema_bn_batches=0",
    ]
    proc = torchrun_train(run, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_average = json.loads((run / "results.json").read_text())["results"]["test"]["ema"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, run, resume=True)
    trainer.load(run / "latest.pt")
    assert trainer.evaluate_average("test")["confusion"] == ddp_average["confusion"]
