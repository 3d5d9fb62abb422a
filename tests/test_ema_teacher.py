"""``method.teacher: ema`` of FixMatch / UniMatch (methods/weak_strong.py): an EMA of the student labels
the weak view, feeds the pseudo-label policy's statistics and predicts the mix partner; it is updated
after every step, travels in checkpoints, and the default (``self``) leaves config hashes and state
dicts as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    Pointwise,
    exact_trainer,
    fit_interrupted,
    make_batch,
    tiny_method,
    tiny_overrides,
    torchrun_train,
)

from semiseg.checkpoint import load_checkpoint
from semiseg.config import build_config, config_hash, hashed_tree
from semiseg.ema import ModelEma
from semiseg.errors import ConfigError
from semiseg.methods import UniMatch
from semiseg.pseudo_labels import PseudoLabeler
from semiseg.types import StepInfo


@pytest.fixture(scope="module", autouse=True)
def _restore_global_determinism():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _differing(method) -> None:
    """Give the teacher weights of its own, so teacher and student predictions differ."""
    with torch.no_grad():
        for p in method.teacher.module.parameters():
            p.copy_(torch.randn_like(p))


def capture_step(method: UniMatch) -> dict:
    """Record the weak view's pseudo-labels (``pl``) and the plug-in context (``ctx``) of the
    method's next training step."""
    captured: dict = {}
    weak_pseudo_labels, plugin_context = method.weak_pseudo_labels, method.plugin_context

    def spy_labels(*args, **kwargs):
        pl, teacher_features = weak_pseudo_labels(*args, **kwargs)
        captured["pl"] = pl
        return pl, teacher_features

    def spy_context(*args, **kwargs):
        captured["ctx"] = plugin_context(*args, **kwargs)
        return captured["ctx"]

    method.weak_pseudo_labels = spy_labels  # type: ignore[method-assign]
    method.plugin_context = spy_context  # type: ignore[method-assign]
    return captured


@pytest.mark.parametrize("name", ["fixmatch", "unimatch"])
@pytest.mark.parametrize("mask", ["fixed", "freematch"])
def test_the_ema_teacher_makes_the_pseudo_labels_statistics_and_partner(
    name: str, mask: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    method = tiny_method({"name": name, "teacher": "ema", "pseudo": {"mask": mask}}, model=Pointwise())
    assert isinstance(method.teacher, ModelEma)
    _differing(method)
    batch = make_batch(2, 3, 16)
    calls: list[tuple[torch.Tensor, bool]] = []
    original = PseudoLabeler.__call__

    def spy(self, logits, ignore=None, update=False):
        calls.append((logits.detach().clone(), update))
        return original(self, logits, ignore, update)

    monkeypatch.setattr(PseudoLabeler, "__call__", spy)
    captured = capture_step(method)
    result = method.training_step(batch, StepInfo(0, 10))
    with torch.no_grad():
        teacher = method.teacher.module(batch.x_w)
        student = method.model(batch.x_w)
    assert not torch.equal(teacher.argmax(1), student.argmax(1)), "the test needs a differing teacher"
    updated = [logits for logits, update in calls if update]
    assert len(updated) == 1 and torch.equal(updated[0], teacher)  # policy statistics: the teacher's
    assert torch.equal(captured["pl"].label, teacher.softmax(1).argmax(1))
    assert torch.equal(captured["ctx"].pseudo_w, captured["pl"].label)
    partners = [logits for logits, update in calls if not update and logits.shape[0] == 3]
    assert any(torch.equal(p, method.teacher.module(batch.x_w.flip(0)).detach()) for p in partners)
    assert all(not torch.equal(p, student.flip(0)) for p in partners)
    assert result.loss.requires_grad


def test_the_students_weak_pass_keeps_its_gradient_for_feature_perturbation() -> None:
    torch.manual_seed(0)
    method = tiny_method({"name": "unimatch", "teacher": "ema"})
    assert isinstance(method, UniMatch)
    batch = make_batch(2, 2, 32)
    result = method.training_step(batch, StepInfo(0, 10))
    assert "loss_fp" in result.logs and result.logs["loss_fp"].requires_grad
    result.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())


def test_after_step_updates_the_teacher_with_the_warm_up_schedule() -> None:
    torch.manual_seed(0)
    method = tiny_method({"name": "fixmatch", "teacher": "ema", "teacher_decay": 0.99}, model=Pointwise())
    _differing(method)
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.after_step(StepInfo(0, 10))  # k = 0: d_0 = 0, a copy
    for t, s in zip(method.teacher.module.parameters(), method.model.parameters()):
        assert torch.equal(t, s)
    before = [t.clone() for t in method.teacher.module.parameters()]
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.after_step(StepInfo(1, 10))  # k = 1: d_1 = min(0.99, 1/2)
    for b, t, s in zip(before, method.teacher.module.parameters(), method.model.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)


def test_state_round_trip_carries_the_teacher() -> None:
    torch.manual_seed(0)
    a = tiny_method({"name": "unimatch", "teacher": "ema"})
    a.after_step(StepInfo(0, 10))
    _differing(a)
    state = a.state_dict()
    assert any(k.startswith("teacher.module.") for k in state) and "teacher.updates" in state
    torch.manual_seed(1)
    b = tiny_method({"name": "unimatch", "teacher": "ema"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(b.teacher(x), a.teacher(x))
        b.load_state_dict(state)
        assert torch.equal(b.teacher(x), a.teacher(x)) and int(b.teacher.updates) == 1


def test_teacher_self_is_the_old_method_exactly() -> None:
    method = tiny_method({"name": "unimatch"})
    assert method.teacher is None
    assert not any(k.startswith("teacher.") for k in method.state_dict())
    default = build_config({"method": {"name": "unimatch"}})
    explicit = build_config({"method": {"name": "unimatch", "teacher": "self", "teacher_decay": 0.99}})
    assert config_hash(default) == config_hash(explicit)
    assert (
        "teacher" not in hashed_tree(default)["method"]
        and "teacher_decay" not in hashed_tree(default)["method"]
    )
    ema = build_config({"method": {"name": "unimatch", "teacher": "ema"}})
    assert config_hash(ema) != config_hash(default)
    with pytest.raises(ConfigError, match=r"^method\.teacher_decay"):
        build_config({"method": {"name": "fixmatch", "teacher": "ema", "teacher_decay": 1.0}})
    with pytest.raises(ConfigError, match=r"^method\.teacher"):
        build_config({"method": {"name": "fixmatch", "teacher": "mean"}})


def test_plugins_see_the_teachers_features() -> None:
    torch.manual_seed(0)
    method = tiny_method(
        {"name": "unimatch", "teacher": "ema"}, plugins={"mpmc": {}, "sufd": {"channels": [8, 8, 8, 8]}}
    )
    _differing(method)
    batch = make_batch(2, 2, 32)
    captured = capture_step(method)
    result = method.training_step(batch, StepInfo(0, 10))
    ctx = captured["ctx"]
    with torch.no_grad():
        want = method.teacher.module(batch.x_w, return_features=True).features
    assert all(torch.equal(t, w) for t, w in zip(ctx.teacher_features_w, want))
    assert not torch.equal(ctx.teacher_features_w[0], ctx.features_w[0].detach())
    assert "mpmc/loss_u" in result.logs and "sufd" in result.optimizer_losses


def _trainer(run_dir: Path, resume: bool = False):
    return exact_trainer({"name": "unimatch", "teacher": "ema"}, run_dir, 4, resume)


def test_resume_with_an_ema_teacher_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _trainer(tmp_path / "straight").fit()
    fit_interrupted(_trainer(tmp_path / "resumed"), monkeypatch, at_step=2)
    monkeypatch.undo()
    _trainer(tmp_path / "resumed", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / d / "latest.pt") for d in ("straight", "resumed"))
    assert a["model"].keys() == b["model"].keys() and "teacher.updates" in a["model"]
    assert int(a["model"]["teacher.updates"]) == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize(
    "method",
    [
        ["method.name=unimatch", "method.teacher=ema"],
        ["method.name=bcp", "method.stage1_iters=2", "data.batch_size=2", "data.unlabeled_batch_size=2"],
    ],
    ids=["unimatch-ema-teacher", "bcp"],
)
def test_torchrun_two_gloo_processes_keep_the_teacher_identical(tmp_path: Path, method: list[str]) -> None:
    """Under DDP (two gloo processes) an EMA teacher is updated from synchronised weights, so it is
    the same on every rank: the trainer compares every parameter of the method (the teacher's
    included) across ranks at the end and fails the run otherwise."""
    run = tmp_path / "ddp"
    overrides = tiny_overrides(iters=4, **{"data.synthetic.num_test": 2, "train.device": "cpu"}) + method
    proc = torchrun_train(run, overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(run / "latest.pt")["model"]
    assert any(key.startswith("teacher") or ".teacher" in key for key in state), sorted(state)[:8]
