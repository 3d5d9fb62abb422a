import json
import math

import pytest
import torch
from helpers import (
    Pointwise,
    composed,
    fit_interrupted,
    make_batch,
    model_overrides,
    tiny_overrides,
    tiny_trainer,
    train_update,
)

from semiseg.checkpoint import atomic_save, load_checkpoint
from semiseg.config import config_hash, load_config
from semiseg.errors import SemisegError, TrainingError
from semiseg.models import build_model
from semiseg.optim import build_optimizer, poly_lr, set_poly_lr
from semiseg.trainer import Trainer, model_state_from_checkpoint, train


def _final_weights(run_dir):
    return model_state_from_checkpoint(load_checkpoint(run_dir / "latest.pt"))


def test_tiny_run_writes_everything(tmp_path):
    cfg = load_config(None, tiny_overrides(iters=4, **{"train.eval_every": 2}))
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    for name in (
        "latest.pt",
        "best.pt",
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "splits/labeled.txt",
    ):
        assert (run / name).is_file(), name
    payload = json.loads((run / "results.json").read_text())
    for key in ("dataset", "fraction", "method", "seed", "protocol", "steps", "seconds", "results"):
        assert key in payload
    test = payload["results"]["test"]
    assert 0.0 <= test["miou"] <= 1.0 and set(test["iou"]) == {"background", "vessel", "lesion"}
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == [1, 2, 3, 4]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert {"iou/background", "iou/vessel", "iou/lesion"} <= set(val[0])  # per-class curves
    assert result.steps == 4
    labeled = (run / "splits/labeled.txt").read_text().split()
    unlabeled = (run / "splits/unlabeled.txt").read_text().split()
    assert len(labeled) == 4 and not set(labeled) & set(unlabeled)


def test_poly_schedule_values():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert math.isclose(poly_lr(0.01, 50, 100, 0.9), 0.01 * 0.5**0.9)
    assert math.isclose(poly_lr(0.01, 25, 100, 1.0), 0.0075)  # power 1: linear
    assert poly_lr(0.02, 30, 100, 0.0) == 0.02  # power 0: constant
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0


OPTIM = {
    "optim.lr": 0.02,
    "optim.lr_multi": 10.0,
    "optim.momentum": 0.8,
    "optim.weight_decay": 5e-4,
    "optim.nesterov": True,
}


def test_param_groups_backbone_at_lr_and_head_at_lr_times_lr_multi():
    cfg = load_config(None, tiny_overrides(**OPTIM))
    model = build_model(cfg.model, 3, 3)
    frozen = next(model.decoder.parameters()).requires_grad_(False)
    opt = build_optimizer(model, cfg)
    backbone, head = opt.param_groups
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert backbone_ids == {id(p) for p in model.encoder.parameters()}  # the U-Net's encoder
    assert {id(p) for p in backbone["params"]} == backbone_ids
    trainable_head = {id(p) for p in model.parameters() if p.requires_grad} - backbone_ids
    assert {id(p) for p in head["params"]} == trainable_head and id(frozen) not in trainable_head
    assert (backbone["lr"], backbone["lr_scale"]) == (0.02, 1.0)
    assert (head["lr"], head["lr_scale"]) == (pytest.approx(0.2), 10.0)
    for group in opt.param_groups:
        assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.8, 5e-4, True)
    assert opt.defaults["foreach"] is True  # multi-tensor update on every device
    (only,) = build_optimizer(Pointwise(), cfg).param_groups  # all backbone: no head group
    assert only["lr"] == 0.02 and only["lr_scale"] == 1.0


def test_set_poly_lr_scales_every_group():
    cfg = load_config(None, tiny_overrides(iters=8, **OPTIM))
    opt = build_optimizer(build_model(cfg.model, 3, 3), cfg)
    for step in range(8):
        base = set_poly_lr(opt, cfg, step)
        assert base == poly_lr(0.02, step, 8, 0.9)
        assert [g["lr"] for g in opt.param_groups] == [base, base * 10.0]


def test_each_update_uses_that_steps_poly_lr_in_each_group():
    """Through the trainer's own update: step k moves each parameter by lr_k·scale·grad (momentum and
    weight decay off), lr_k = poly_lr(lr, k, iters, power): the schedule is set before the step."""
    changes = {"optim.lr_multi": 10.0, "optim.poly_power": 1.0, "optim.momentum": 0.0}
    trainer = tiny_trainer(iters=4, **changes, **{"optim.weight_decay": 0.0})
    groups = trainer.optimizer.param_groups
    for step in range(4):
        before = [[p.detach().clone() for p in g["params"]] for g in groups]
        logged = train_update(trainer, make_batch(seed=step), step)
        lr = 0.01 * (1 - step / 4)
        assert logged["lr"] == pytest.approx(lr)
        for group, old, scale in zip(groups, before, (1.0, 10.0)):
            for p, p0 in zip(group["params"], old):
                if p.grad is not None:
                    torch.testing.assert_close(p0 - p.detach(), lr * scale * p.grad, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    "method",
    [
        {"method.name": "supervised"},
        {
            "method.name": "unimatch",
            "method.mix": "supmix",
            "method.mixer.strategy": "difficulty",
            "plugins.sufd": "{}",
        },
        {"method.name": "mean_teacher"},
        {  # the adaptive recipe: its statistics (buffers) must resume exactly too
            "method.name": "fixmatch",
            "method.warmup_iters": 1,
            "method.rampup_iters": 2,
            "method.pseudo.mask": "freematch",
            "method.pseudo.align": "labeled_prior",
            "method.unlabeled_loss": "balanced_ce",
        },
        {"method.name": "mean_teacher", "method.pseudo.mask": "flexmatch", "method.threshold": 0.7},
        {"method.name": "unimatch", "plugins.sufd": "{}", "train.channels_last": "true"},
    ],
    ids=[
        "supervised",
        "unimatch+supmix+sufd",
        "mean_teacher",
        "fixmatch+recipe",
        "mean_teacher+flexmatch",
        "unimatch+sufd+channels_last",
    ],
)
def test_resume_continues_exactly(tmp_path, monkeypatch, method):
    """Interrupted at step 3 and resumed from the step-2 checkpoint == never interrupted (bit-exact)."""
    overrides = tiny_overrides(iters=4, **method)
    straight = tmp_path / "straight"
    train(load_config(None, overrides), straight)

    interrupted = tmp_path / "interrupted"
    trainer = Trainer(load_config(None, overrides), interrupted)
    fit_interrupted(trainer, monkeypatch, at_step=3)
    assert load_checkpoint(interrupted / "latest.pt")["step"] == 2
    train(load_config(None, overrides), interrupted, resume=True)

    logged = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4]  # no duplicate steps
    seconds = json.loads((interrupted / "results.json").read_text())["seconds"]
    assert seconds >= load_checkpoint(interrupted / "latest.pt")["train_seconds"] * 0.999

    a, b = _final_weights(straight), _final_weights(interrupted)
    assert a.keys() == b.keys()
    # the whole method state too: EMA teachers, discriminators, pseudo-label statistics
    full_a, full_b = (load_checkpoint(d / "latest.pt")["model"] for d in (straight, interrupted))
    assert full_a.keys() == full_b.keys()
    for key in full_a:
        assert torch.equal(full_a[key], full_b[key]), key
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_existing_run_dir_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    train(load_config(None, tiny_overrides(iters=2)), run)
    before = (run / "latest.pt").read_bytes()
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(load_config(None, tiny_overrides(iters=2)), run)
    with pytest.raises(TrainingError, match="config differs"):
        Trainer(load_config(None, tiny_overrides(iters=3, **{"optim.lr": 0.5})), run, resume=True)
    assert (run / "latest.pt").read_bytes() == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(iters=6)), run)
    original = trainer.method.training_step

    def poisoned(batch, info):
        result = original(batch, info)
        if info.step == 3:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(trainer.method, "training_step", poisoned)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    assert "non-finite loss at step 3" in str(info.value) and "latest.pt" in str(info.value)
    ckpt = load_checkpoint(run / "latest.pt")
    assert ckpt["step"] == 2
    assert all(
        torch.isfinite(v).all() for v in model_state_from_checkpoint(ckpt).values() if v.is_floating_point()
    )


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError):
        atomic_save({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_refuses_pickled_code_and_garbage(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _Payload()}, evil)
    with pytest.raises(SemisegError, match="cannot load checkpoint"):
        load_checkpoint(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SemisegError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(SemisegError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_logged_losses_are_means_over_the_logging_window(tmp_path, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(iters=4, **{"train.log_every": 2})), run)
    original = trainer.method.training_step

    def with_probe(batch, info):
        result = original(batch, info)
        result.logs["probe"] = torch.tensor(float(info.step))
        return result

    monkeypatch.setattr(trainer.method, "training_step", with_probe)
    trainer.fit()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["kind"] == "train"]
    assert [(r["step"], r["probe"]) for r in train] == [(2, 0.5), (4, 2.5)]


GUIDEDMIX_TINY = model_overrides("guidedmix")  # the shipped config's network, tiny


@pytest.mark.parametrize(
    "config,extra",
    [
        (None, {"method.name": "unimatch", "plugins.sufd": "{}"}),
        (None, {"method.name": "mean_teacher"}),
        ("unimatch_supmix_sufd_mpmc", {}),
        ("guidedmix/cpu_small", GUIDEDMIX_TINY),
    ],
    ids=["unimatch+sufd", "mean_teacher", "unimatch+supmix+sufd+mpmc", "guidedmix"],
)
def test_channels_last_changes_only_rounding(tmp_path, config, extra):
    """``train.channels_last``: NHWC weights (network and plug-ins), the same config hash, and the
    same training up to floating-point rounding (dropout masks do not depend on the memory format)."""
    base = None if config is None else composed("cpu_small", "synthetic", config)
    runs = {}
    for flag in ("false", "true"):
        cfg = load_config(base, tiny_overrides(iters=3, **extra, **{"train.channels_last": flag}))
        trainer = Trainer(cfg, tmp_path / flag)
        convs = [m.weight for m in trainer.method.modules() if isinstance(m, torch.nn.Conv2d)]
        nhwc = flag == "true" and trainer.method.model.channels_last_safe  # GuidedMixNet opts out
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        assert all(w.is_contiguous(memory_format=fmt) for w in convs)
        assert not nhwc or not all(w.is_contiguous() for w in convs)
        trainer.fit()
        runs[flag] = (config_hash(cfg), [json.loads(r) for r in (tmp_path / flag / "metrics.jsonl").open()])
    assert runs["false"][0] == runs["true"][0]
    eager, nhwc = ([r["total"] for r in log if r["kind"] == "train"] for _, log in runs.values())
    # step 1 sees identical weights and data: rounding only (a different dropout mask moved it by
    # 0.2 %); later steps add what two updates make of that rounding, which discrete choices can
    # amplify (GuidedMix-Net's nearest-pair selection and argmax masks: 0.18 % at step 3 measured).
    assert eager[0] == pytest.approx(nhwc[0], rel=1e-5)
    assert eager == pytest.approx(nhwc, rel=1e-2)
