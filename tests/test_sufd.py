"""SUFD plug-in (SupMix paper eq. 12): discriminator shape, the two players' losses and exactly which
parameters each one's gradient reaches under the trainer's update order, warm-up, optimizer, schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semiseg.config import ModelConfig, build_config, config_hash
from semiseg.methods import Batch, StepInfo, build_method
from semiseg.models import build_model
from semiseg.plugins import PLUGINS, SUFD, Discriminator, StepContext, SUFDConfig

NUM_CLASSES = 3


def tiny_unet():
    return build_model(ModelConfig(name="unet", widths=[4, 8, 16, 32, 64]), 3, NUM_CLASSES)


def make_batch(n_l: int = 2, n_u: int = 2, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(0)
    y_l = torch.randint(0, NUM_CLASSES, (n_l, size, size), generator=g)
    box = torch.zeros(n_u, size, size)
    box[0, 4:12, 4:12] = 1
    return Batch(
        torch.randn(n_l, 3, size, size, generator=g), y_l,
        *(torch.randn(n_u, 3, size, size, generator=g) for _ in range(3)),
        torch.zeros(n_u, size, size, dtype=torch.uint8), box, box.clone(),
    )  # fmt: skip


def unimatch_sufd(**sufd):
    cfg = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": sufd}, "train": {"iters": 100}})
    return build_method(cfg, tiny_unet(), NUM_CLASSES)


def context(method, batch: Batch, step: int = 0) -> StepContext:
    n_l = batch.x_l.shape[0]
    logits = method.model(torch.cat((batch.x_l, batch.x_w)))
    lw = logits[n_l:]
    pseudo, conf = lw.detach().softmax(1).max(1)[1], lw.detach().softmax(1).max(1)[0]
    return StepContext(batch, StepInfo(step, 100), logits[:n_l], lw, pseudo, conf, batch.ignore)


def grads(params) -> list[torch.Tensor | None]:
    return [p.grad for p in params]


def nonzero(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


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
    ctx = context(method, make_batch())
    loss = sufd.losses(ctx)["loss_adv"]
    loss.backward()
    assert any(nonzero(g) for g in grads(method.model.parameters()))
    assert all(g is None for g in grads(sufd.disc.parameters()))
    assert all(p.requires_grad for p in sufd.disc.parameters())  # un-frozen again afterwards


def test_generator_term_value():
    torch.manual_seed(0)
    method = unimatch_sufd(lambda_adv=0.25)
    sufd = method.plugins["sufd"]
    ctx = context(method, make_batch())
    o_u = sufd.disc(ctx.logits_w.softmax(1))
    expect = 0.25 * F.binary_cross_entropy_with_logits(o_u, torch.ones_like(o_u))
    assert sufd.losses(ctx)["loss_adv"].item() == pytest.approx(expect.item(), rel=1e-6)


def test_discriminator_term_value_and_detached_inputs():
    torch.manual_seed(0)
    method = unimatch_sufd()
    sufd = method.plugins["sufd"]
    ctx = context(method, make_batch())
    loss = sufd.optimizer_losses(ctx)["sufd"]
    p_w, p_l = ctx.logits_w.softmax(1).detach(), ctx.logits_l.softmax(1).detach()
    o_u, o_l = sufd.disc(p_w), sufd.disc(p_l)
    expect = 0.5 * (F.binary_cross_entropy_with_logits(o_u, torch.zeros_like(o_u))
                    + F.binary_cross_entropy_with_logits(o_l, torch.ones_like(o_l)))  # fmt: skip
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    loss.backward()
    assert all(g is None for g in grads(method.model.parameters()))  # inputs detached
    assert all(nonzero(g) for g in grads(sufd.disc.parameters()))


def test_trainer_order_d_step_uses_only_the_d_loss():
    """The trainer back-propagates total, steps the segmenter, then zeroes D's grads and back-propagates
    total/sufd: D's update must equal Adam on ∇ of the D loss alone, and the segmenter gets nothing."""
    torch.manual_seed(0)
    method = unimatch_sufd(lambda_adv=1.0)
    method.train()
    sufd = method.plugins["sufd"]
    seg_opt = torch.optim.SGD(method.model.parameters(), lr=0.01)
    d_opt = method.extra_optimizers()["sufd"]
    losses = method.training_step(make_batch(), StepInfo(0, 100))
    assert set(losses) >= {"total", "sufd/loss_adv", "total/sufd"}

    seg_opt.zero_grad()
    losses["total"].backward()
    seg_grads = [None if g is None else g.clone() for g in grads(method.model.parameters())]
    assert any(nonzero(g) for g in seg_grads)
    seg_opt.step()

    # Reference: D's gradient from the D loss alone, computed on a copy before the step.
    d_loss_grads = torch.autograd.grad(losses["total/sufd"], list(sufd.disc.parameters()), retain_graph=True)
    for p in method.model.parameters():
        p.grad = None
    d_opt.zero_grad()
    losses["total/sufd"].backward()
    for g, ref in zip(grads(sufd.disc.parameters()), d_loss_grads):
        assert torch.equal(g, ref)
    assert all(g is None for g in grads(method.model.parameters()))  # no segmenter grads from D loss
    before = [p.detach().clone() for p in sufd.disc.parameters()]
    d_opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, sufd.disc.parameters()))


def test_warmup_turns_the_generator_term_off():
    torch.manual_seed(0)
    method = unimatch_sufd(warmup_iters=5)
    sufd = method.plugins["sufd"]
    batch = make_batch()
    early = sufd.losses(context(method, batch, step=4))["loss_adv"]
    assert early.item() == 0.0
    early.backward()
    assert not any(nonzero(g) for g in grads(method.model.parameters()))
    assert sufd.losses(context(method, batch, step=5))["loss_adv"].item() > 0
    assert "sufd" in sufd.optimizer_losses(context(method, batch, step=0))  # D trains during warm-up


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
    losses = method.training_step(make_batch(), StepInfo(0, 100))
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
    ctx = context(method, make_batch(size=32))
    p_l, p_w = sufd._inputs(ctx)
    assert p_w.shape[-2:] == (16, 16) and p_l.shape[-2:] == (16, 16)
    expect = F.avg_pool2d(ctx.logits_w.softmax(1), 2)
    assert torch.allclose(p_w, expect, atol=1e-6)
    o_u = sufd.disc(expect)
    value = 0.01 * F.binary_cross_entropy_with_logits(o_u, torch.ones_like(o_u))
    assert sufd.losses(ctx)["loss_adv"].item() == pytest.approx(value.item(), rel=1e-5)
    with pytest.raises(Exception, match="plugins.sufd.input_scale"):
        build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"input_scale": 0}}})


def _adam_after_steps(**kw: object) -> torch.Tensor:
    torch.manual_seed(0)
    disc = Discriminator(NUM_CLASSES, [8, 16, 32, 64])
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.9, 0.99), **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p in disc.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return torch.nn.utils.parameters_to_vector(disc.parameters()).detach()


def test_discriminator_optimizer_is_adam_fused_or_multi_tensor():
    """D's Adam: ``foreach`` (default, bit-identical to the per-parameter loop) or ``fused``
    (volatile: rounding only)."""
    loop = _adam_after_steps(foreach=False)
    assert torch.equal(_adam_after_steps(foreach=True), loop)
    assert torch.allclose(_adam_after_steps(fused=True), loop, rtol=0, atol=1e-7)
    assert unimatch_sufd(fused=True).extra_optimizers()["sufd"].defaults["fused"]
    opt = unimatch_sufd().extra_optimizers()["sufd"]
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    base = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {}}})
    other = build_config({"method": {"name": "unimatch"}, "plugins": {"sufd": {"fused": True}}})
    assert config_hash(base) == config_hash(other)
