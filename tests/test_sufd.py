"""SUFD plug-in (SupMix paper eq. 12): discriminator shape, the two players' losses and exactly which
parameters each one's gradient reaches under the trainer's update order, warm-up, optimizer, schedule."""

from __future__ import annotations

from functools import partial

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import joint_context, nonzero, tiny_method, tiny_trainer, train_update

from semiseg.config import build_config, config_hash
from semiseg.methods import StepInfo
from semiseg.plugins import PLUGINS, SUFD, Discriminator, SUFDConfig

NUM_CLASSES = 3

#: 2 labeled + 2 unlabeled 32² images, no padding, one CutMix box on both strong views.
make_batch = partial(helpers.make_batch, n_u=2, pad_labeled=0, pad_unlabeled=0, boxes="same")


def unimatch_sufd(**sufd):
    return tiny_method({"name": "unimatch"}, {"sufd": sufd}, iters=100, num_classes=NUM_CLASSES)


def grads(params) -> list[torch.Tensor | None]:
    return [p.grad for p in params]


# ----------------------------------------------------------------------------------------------
# Discriminator
# ----------------------------------------------------------------------------------------------


def test_discriminator_is_hung_et_al():
    d = Discriminator(NUM_CLASSES, [64, 128, 256, 512], 0.2)
    widths = [(c.in_channels, c.out_channels) for c in d.convs]
    assert widths == [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in d.convs)
    assert d(torch.randn(2, 3, 128, 128)).shape == (2, 1, 4, 4)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 5), (7, 15), (15, 1), (16, 16), (33, 20)])
def test_discriminator_handles_small_inputs(h, w):
    d = Discriminator(NUM_CLASSES, [8, 8, 8, 8])
    out = d(torch.randn(1, NUM_CLASSES, h, w))
    assert out.shape[:2] == (1, 1) and out.shape[2] >= 1 and out.shape[3] >= 1


# ----------------------------------------------------------------------------------------------
# Gradients of the two players
# ----------------------------------------------------------------------------------------------


def test_generator_term_reaches_segmenter_and_not_discriminator():
    torch.manual_seed(0)
    method = unimatch_sufd(lambda_adv=1.0)
    sufd = method.plugins["sufd"]
    ctx = joint_context(method, make_batch())
    loss = sufd.losses(ctx)["loss_adv"]
    loss.backward()
    assert any(nonzero(g) for g in grads(method.model.parameters()))
    assert all(g is None for g in grads(sufd.disc.parameters()))
    assert all(p.requires_grad for p in sufd.disc.parameters())  # un-frozen again afterwards


def test_generator_term_value():
    torch.manual_seed(0)
    method = unimatch_sufd(lambda_adv=0.25)
    sufd = method.plugins["sufd"]
    ctx = joint_context(method, make_batch())
    o_u = sufd.disc(ctx.logits_w.softmax(1))
    expect = 0.25 * F.binary_cross_entropy_with_logits(o_u, torch.ones_like(o_u))
    assert sufd.losses(ctx)["loss_adv"].item() == pytest.approx(expect.item(), rel=1e-6)


def test_discriminator_term_value_and_detached_inputs():
    torch.manual_seed(0)
    method = unimatch_sufd()
    sufd = method.plugins["sufd"]
    ctx = joint_context(method, make_batch())
    loss = sufd.optimizer_losses(ctx)["sufd"]
    p_w, p_l = ctx.logits_w.softmax(1).detach(), ctx.logits_l.softmax(1).detach()
    o_u, o_l = sufd.disc(p_w), sufd.disc(p_l)
    expect = 0.5 * (F.binary_cross_entropy_with_logits(o_u, torch.zeros_like(o_u))
                    + F.binary_cross_entropy_with_logits(o_l, torch.ones_like(o_l)))  # fmt: skip
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    loss.backward()
    assert all(g is None for g in grads(method.model.parameters()))  # inputs detached
    assert all(nonzero(g) for g in grads(sufd.disc.parameters()))


def test_trainer_steps_the_segmenter_on_total_and_d_on_the_d_loss_alone(monkeypatch):
    """Through the trainer's own update (``Trainer.train_step``): the segmenter's SGD steps on
    ∇total, D's Adam on ∇ of the D loss alone (D's gradients zeroed before it), and the D loss's
    backward leaves the segmenter's gradients as they were."""
    trainer = tiny_trainer({"name": "unimatch"}, {"sufd": {"lambda_adv": 1.0}}, iters=100)
    sufd = trainer.method.plugins["sufd"]
    segmenter = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    disc = list(sufd.disc.parameters())
    d_opt = trainer.extra_optimizers["sufd"]
    expected: dict[str, tuple] = {}
    seen: dict[str, list] = {}
    training_step = trainer.method.training_step

    def recording_training_step(batch, info):
        result = training_step(batch, info)
        assert "sufd/loss_adv" in result.logs and set(result.optimizer_losses) == {"sufd"}
        expected["segmenter"] = torch.autograd.grad(
            result.loss, segmenter, retain_graph=True, allow_unused=True
        )
        expected["disc"] = torch.autograd.grad(result.optimizer_losses["sufd"], disc, retain_graph=True)
        return result

    def recording(opt, name):
        step = opt.step

        def recorded(*args, **kwargs):
            params = [p for group in opt.param_groups for p in group["params"]]
            seen[name] = [None if p.grad is None else p.grad.clone() for p in params]
            return step(*args, **kwargs)

        monkeypatch.setattr(opt, "step", recorded)

    monkeypatch.setattr(trainer.method, "training_step", recording_training_step)
    recording(trainer.optimizer, "segmenter")
    recording(d_opt, "disc")
    before = [p.detach().clone() for p in disc]
    train_update(trainer, make_batch(), 0)

    assert set(seen) == {"segmenter", "disc"}
    assert any(nonzero(g) for g in seen["segmenter"])
    for got, want in zip(seen["segmenter"], expected["segmenter"], strict=True):
        assert (got is None) == (want is None) and (got is None or torch.allclose(got, want))
    for got, want in zip(seen["disc"], expected["disc"], strict=True):
        assert torch.allclose(got, want)
    for p, at_step in zip(segmenter, seen["segmenter"]):  # the D loss added nothing to the segmenter
        assert (p.grad is None) == (at_step is None) and (p.grad is None or torch.equal(p.grad, at_step))
    assert any(not torch.equal(a, b) for a, b in zip(before, disc))  # D stepped


def test_warmup_turns_the_generator_term_off():
    torch.manual_seed(0)
    method = unimatch_sufd(warmup_iters=5)
    sufd = method.plugins["sufd"]
    batch = make_batch()
    early = sufd.losses(joint_context(method, batch, step=4))["loss_adv"]
    assert early.item() == 0.0
    early.backward()
    assert not any(nonzero(g) for g in grads(method.model.parameters()))
    assert sufd.losses(joint_context(method, batch, step=5))["loss_adv"].item() > 0
    assert "sufd" in sufd.optimizer_losses(joint_context(method, batch, step=0))  # D trains during warm-up


# ----------------------------------------------------------------------------------------------
# Optimizer, schedule, checkpoint, options
# ----------------------------------------------------------------------------------------------


def test_optimizer_is_adam_with_poly_decay():
    method = unimatch_sufd(lr=1e-3, poly_power=1.0)
    opt = method.extra_optimizers()["sufd"]
    assert opt is method.extra_optimizers()["sufd"]  # one optimizer, created once
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["lr"] == 1e-3
    assert {id(p) for p in opt.param_groups[0]["params"]} == {
        id(p) for p in method.plugins["sufd"].disc.parameters()
    }
    method.extra_schedulers()["sufd"](49)  # after step 49 of 100: lr of step 50
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    method.extra_schedulers()["sufd"](99)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_discriminator_is_saved_in_the_method_state_dict():
    method = unimatch_sufd()
    keys = [k for k in method.state_dict() if k.startswith("plugins.sufd.disc.")]
    assert len(keys) == 10  # 5 convs × (weight, bias)


def test_features_input_uses_the_deepest_encoder_feature():
    torch.manual_seed(0)
    method = unimatch_sufd(input="features")
    sufd = method.plugins["sufd"]
    assert sufd.needs_features and method.plugins_need_features
    assert sufd.disc.convs[0].in_channels == 64  # widths [4, 8, 16, 32, 64]: deepest level
    losses = method.training_step(make_batch(), StepInfo(0, 100)).named()
    losses["total"].backward()
    assert bool(torch.isfinite(losses["total/sufd"]))


def test_config_validation_and_registration():
    assert PLUGINS["sufd"] is SUFD and SUFD.Config is SUFDConfig
    from semiseg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"plugins\.sufd\.lambda_adv"):
        build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"lambda_adv": -1}}})
    with pytest.raises(ConfigError, match=r"plugins\.sufd\.nope"):
        build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"nope": 1}}})


@pytest.mark.parametrize("module", ["semiseg.plugins", "semiseg.plugins.sufd", "semiseg.methods.unimatch"])
def test_modules_import_first_in_a_fresh_interpreter(module):
    """No circular import whichever of methods / plug-ins is imported first."""
    import subprocess
    import sys

    code = f"import {module}; from semiseg.plugins import PLUGINS; assert 'sufd' in PLUGINS"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_input_scale_downsamples_what_the_discriminator_sees():
    torch.manual_seed(0)
    method = unimatch_sufd(input_scale=0.5)
    sufd = method.plugins["sufd"]
    ctx = joint_context(method, make_batch(size=32))
    p_l, p_w = sufd._inputs(ctx)
    assert p_w.shape[-2:] == (16, 16) and p_l.shape[-2:] == (16, 16)
    expect = F.avg_pool2d(ctx.logits_w.softmax(1), 2)
    assert torch.allclose(p_w, expect, atol=1e-6)
    o_u = sufd.disc(expect)
    value = 0.01 * F.binary_cross_entropy_with_logits(o_u, torch.ones_like(o_u))
    assert sufd.losses(ctx)["loss_adv"].item() == pytest.approx(value.item(), rel=1e-5)
    with pytest.raises(Exception, match="plugins.sufd.input_scale"):
        build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"input_scale": 0}}})


def test_discriminator_optimizer_is_multi_tensor_or_fused_as_configured():
    """``plugins.sufd.fused``: D's Adam takes the multi-tensor update (``foreach``, the default) or
    the fused kernel, with the configured lr, betas and weight decay; the choice is volatile."""
    opt = unimatch_sufd(lr=2e-4, betas=[0.5, 0.9], weight_decay=1e-5).extra_optimizers()["sufd"]
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    assert opt.defaults["betas"] == (0.5, 0.9) and opt.defaults["weight_decay"] == 1e-5
    assert opt.param_groups[0]["lr"] == 2e-4
    fused = unimatch_sufd(fused=True).extra_optimizers()["sufd"]
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    base = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {}}})
    other = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"fused": True}}})
    assert config_hash(base) == config_hash(other)
    base = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {}}})
    other = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"fused": True}}})
    assert config_hash(base) == config_hash(other)
