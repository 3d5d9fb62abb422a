"""MPMC plug-in (Beyond Pixels §3.3, eq. 2–7): patch targets, the asymmetric loss, the adaptive λ_s / λ_m
weights and their path through the mixers, which parameters each pass trains, any classes / crops /
batches / channels, the head's optimizer, tiny end-to-end runs on every host, resume, configs, grids."""

from __future__ import annotations

import json
import math
from functools import partial

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    composed,
    fit_interrupted,
    joint_context,
    nonzero,
    tiny_method,
    tiny_overrides,
    tiny_unet,
)

from semiseg.checkpoint import load_checkpoint
from semiseg.config import ModelConfig, build_config, load_config
from semiseg.errors import ConfigError
from semiseg.methods import StepInfo, build_method
from semiseg.methods.weak_strong import PixelTargets
from semiseg.models import build_model
from semiseg.plugins import MPMC, PLUGINS, MPMCConfig
from semiseg.plugins.mpmc import (
    PatchGeometry,
    SeparableAvgPool2d,
    asymmetric_loss,
    labeled_patch_loss,
    patch_targets,
    pixel_confidence,
    probe_tap,
    unlabeled_patch_loss,
)
from semiseg.trainer import Trainer, train

NUM_CLASSES = 3
CONFIGS = REPO / "src" / "semiseg" / "configs"


#: 2 labeled + 2 unlabeled 32² images, a padded strip in each, one CutMix box on both strong views.
make_batch = partial(helpers.make_batch, n_u=2, pad_labeled=3, pad_unlabeled=2, boxes="same")


def method_with(
    method: dict, mpmc: dict | None = None, classes: int = NUM_CLASSES, channels: int = 3, **plugins
):
    plugins = {"mpmc": mpmc or {}, **plugins}
    m = tiny_method(method, plugins, tiny_unet(channels, classes), iters=100, num_classes=classes)
    m.train()
    return m


def assert_channel_dropout(mask: torch.Tensor | None, n: int, channels: int, p: float = 0.5) -> None:
    """A Dropout2d multiplier of the perturbed student input: N×C×1×1, each 0 or 1/(1 − p)."""
    assert mask is not None and mask.shape == (n, channels, 1, 1)
    assert set(mask.unique().tolist()) <= {0.0, 1.0 / (1.0 - p)}


# ----------------------------------------------------------------------------------------------
# Patch targets, geometry, λ_s lookup
# ----------------------------------------------------------------------------------------------


def brute_force_targets(labels, num_classes, geom, out_size):
    n, H, W = labels.shape
    h, w = out_size
    y = torch.zeros(n, num_classes, h, w)
    valid = torch.zeros(n, h, w, dtype=torch.bool)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                r0, c0 = geom.stride * i + geom.offset, geom.stride * j + geom.offset
                rows = range(max(0, r0), min(H, r0 + geom.size))
                cols = range(max(0, c0), min(W, c0 + geom.size))
                for r in rows:
                    for c in cols:
                        v = int(labels[b, r, c])
                        if v != 255:
                            y[b, v, i, j] = 1
                            valid[b, i, j] = True
    return y, valid


@pytest.mark.parametrize(
    "geom,size",
    [
        (PatchGeometry(14, 2, -6), (20, 26)),  # U-Net level 1
        (PatchGeometry(43, 4, -21), (24, 17)),  # ResNet layer1
        (PatchGeometry(5, 1, -2), (9, 11)),  # stride 1
        (PatchGeometry(3, 4, 1), (21, 16)),  # gaps between patches, positive offset
        (PatchGeometry(4, 2, 0), (15, 15)),  # even size
    ],
)
def test_patch_targets_match_a_brute_force_loop(geom, size):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (3, *size), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = 255
    labels[1, :, : size[1] // 2] = 255  # three quarters ignore
    labels[1, : size[0] // 2] = 255
    labels[2] = 255  # padding only
    out = (math.ceil(size[0] / geom.stride), size[1] // geom.stride)
    y, valid = patch_targets(labels, 4, geom, out)
    y_ref, valid_ref = brute_force_targets(labels, 4, geom, out)
    assert y.shape == (3, 4, *out) and valid.shape == (3, *out)
    assert torch.equal(y, y_ref) and torch.equal(valid, valid_ref)
    assert valid[0].any() and not valid[2].any() and not y[2].any()  # padding: no class, not valid


def test_probe_measures_the_taps_stride_and_receptive_field():
    model = tiny_unet()
    # U-Net: level 0 is conv3-conv3 (field 5); level 1 adds MaxPool 2 and two 3×3 convs at stride 2.
    assert probe_tap(model, 0).stride == 1 and probe_tap(model, 0).field == (-2, 2)
    auto = probe_tap(model, None)
    assert (auto.index, auto.channels, auto.stride, auto.field) == (1, 8, 2, (-6, 7))
    assert probe_tap(model, 2).field == (-14, 17)
    plugin = method_with({"name": "unimatch"}).plugins["mpmc"]
    assert plugin.tap == 1 and plugin.geometry == PatchGeometry(14, 2, -6)
    custom = method_with({"name": "unimatch"}, {"patch_size": 6, "tap": 2}).plugins["mpmc"]
    assert custom.geometry == PatchGeometry(6, 4, -1)  # centred on the field's centre 1.5
    with pytest.raises(ConfigError, match=r"plugins\.mpmc\.tap"):
        probe_tap(model, 7)


def test_probe_on_deeplab_taps_resnet_layer1():
    model = build_model(ModelConfig(name="deeplabv3plus", backbone="resnet18"), 3, NUM_CLASSES)
    probe = probe_tap(model, None)
    # stem 7×7/2 (7) + max-pool 3×3/2 (11) + layer1's four 3×3 convs at stride 4 (43), centred on 4i
    assert (probe.index, probe.channels, probe.stride, probe.field) == (0, 64, 4, (-21, 21))


def test_pixel_confidence_is_gamma_of_the_pseudo_class_at_the_nearest_patch():
    geom = PatchGeometry(14, 2, -6)
    g = torch.Generator().manual_seed(2)
    gamma = torch.rand(2, 3, 5, 6, generator=g).softmax(1)
    pseudo = torch.randint(0, 3, (2, 11, 12), generator=g)
    out = pixel_confidence(gamma, pseudo, geom)
    assert out.shape == pseudo.shape
    for b in range(2):
        for r in range(11):
            for c in range(12):
                # nearest centre: centre of location i is 0.5 + 2i
                i = min(4, max(0, round((r - 0.5) / 2 + 1e-9)))
                j = min(5, max(0, round((c - 0.5) / 2 + 1e-9)))
                assert out[b, r, c] == gamma[b, pseudo[b, r, c], i, j]


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma_pos,gamma_neg", [(0.0, 1.0), (0.0, 0.0), (1.0, 4.0), (0.5, 2.0)])
def test_asymmetric_loss_is_eq3_by_hand(gamma_pos, gamma_neg):
    logits = torch.tensor([[-3.0, -0.4, 0.0, 0.7, 2.5], [1.0, -1.0, 4.0, -2.0, 0.3]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    out = asymmetric_loss(logits, targets, gamma_pos, gamma_neg)
    for idx in range(logits.numel()):
        a, y = float(logits.flatten()[idx]), float(targets.flatten()[idx])
        q = 1.0 / (1.0 + math.exp(-a))
        expect = -((1 - q) ** gamma_pos) * math.log(q) if y == 1 else -(q**gamma_neg) * math.log(1 - q)
        assert float(out.flatten()[idx]) == pytest.approx(expect, rel=1e-5)
    if gamma_pos == gamma_neg == 0.0:  # no focusing: plain BCE
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        assert torch.allclose(out, bce, atol=1e-6)


def test_asymmetric_loss_has_finite_gradients_for_saturated_logits():
    logits = torch.tensor([-80.0, -30.0, 30.0, 80.0], requires_grad=True)
    loss = asymmetric_loss(logits, torch.tensor([1.0, 0.0, 1.0, 0.0]), 0.0, 1.0).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_labeled_and_unlabeled_patch_losses_by_hand():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    targets = (torch.rand(2, 3, 4, 5, generator=g) > 0.5).float()
    valid = torch.rand(2, 4, 5, generator=g) > 0.3
    per_loc = asymmetric_loss(logits, targets, 0.0, 1.0).mean(1)  # eq. 3: 1/C Σ_c
    assert labeled_patch_loss(logits, targets, valid, 0.0, 1.0).item() == pytest.approx(
        per_loc[valid].mean().item(), rel=1e-6
    )
    teacher = torch.randn(2, 3, 4, 5, generator=g)
    gamma = teacher.softmax(1)
    bce = F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher), reduction="none")
    expect = (gamma * bce).mean(1)[valid].mean()  # eq. 6 with λ_m = γ
    assert unlabeled_patch_loss(logits, teacher, gamma, valid).item() == pytest.approx(
        expect.item(), rel=1e-6
    )
    hard = F.binary_cross_entropy_with_logits(logits, (teacher >= 0).float(), reduction="none")
    assert unlabeled_patch_loss(logits, teacher, gamma, valid, hard=True).item() == pytest.approx(
        (gamma * hard).mean(1)[valid].mean().item(), rel=1e-6
    )


# ----------------------------------------------------------------------------------------------
# λ_s / λ_m
# ----------------------------------------------------------------------------------------------


def test_weight_shapes_and_ranges():
    torch.manual_seed(0)
    method = method_with({"name": "unimatch"})
    mpmc = method.plugins["mpmc"]
    batch = make_batch(n_u=3)
    ctx = joint_context(method, batch)
    lam_s = mpmc.pixel_weights(ctx)
    st = mpmc.state(ctx)
    assert lam_s.shape == (3, 32, 32) and not lam_s.requires_grad
    assert bool((lam_s > 0).all() and (lam_s <= 1).all())
    assert st.gamma.shape == (3, NUM_CLASSES, 16, 16)  # λ_m: one weight per class and location
    assert torch.allclose(st.gamma.sum(1), torch.ones(3, 16, 16))
    assert st.valid_u.shape == (3, 16, 16) and bool(st.valid_u.all())  # 2 padded rows < a patch
    assert st.targets_l.shape == (2, NUM_CLASSES, 16, 16)
    # Logged per pseudo-label class: the mean λ_s of its pixels, by hand.
    logged = mpmc.diagnostics(ctx)
    for c in range(NUM_CLASSES):
        pixels = ctx.pseudo_w == c
        if pixels.any():
            assert float(logged[f"lambda_s/{c}"]) == pytest.approx(float(lam_s[pixels].mean()), rel=1e-5)
        else:
            assert f"lambda_s/{c}" not in logged


def set_teacher_bias(mpmc: MPMC, bias: list[float]) -> None:
    with torch.no_grad():
        mpmc.head.classifier.weight.zero_()
        mpmc.head.classifier.bias.copy_(torch.tensor(bias))


def test_confident_teacher_gives_weights_near_one_and_uncertain_near_one_over_c():
    torch.manual_seed(0)
    method = method_with({"name": "unimatch"})
    mpmc = method.plugins["mpmc"]
    batch = make_batch()

    set_teacher_bias(mpmc, [12.0, -12.0, -12.0])
    ctx = joint_context(method, batch)
    ctx.pseudo_w = torch.zeros_like(ctx.pseudo_w)  # every pixel predicted as the confident class
    assert torch.allclose(mpmc.pixel_weights(ctx), torch.ones(2, 32, 32), atol=1e-6)
    assert torch.allclose(mpmc.state(ctx).gamma[:, 0], torch.ones(2, 16, 16), atol=1e-6)
    ctx.pseudo_w = torch.ones_like(ctx.pseudo_w)  # a class the patch classifier rules out
    assert bool((mpmc.pixel_weights(ctx) < 1e-6).all())

    set_teacher_bias(mpmc, [0.0, 0.0, 0.0])
    ctx = joint_context(method, batch)
    assert torch.allclose(mpmc.pixel_weights(ctx), torch.full((2, 32, 32), 1 / 3))
    assert torch.allclose(mpmc.state(ctx).gamma, torch.full((2, 3, 16, 16), 1 / 3))


def test_literal_softmax_of_probabilities_is_bounded():
    torch.manual_seed(0)
    method = method_with({"name": "unimatch"}, {"confidence_from": "probs"})
    mpmc = method.plugins["mpmc"]
    set_teacher_bias(mpmc, [30.0, -30.0, -30.0])
    ctx = joint_context(method, make_batch())
    ctx.pseudo_w = torch.zeros_like(ctx.pseudo_w)
    e = math.e
    assert torch.allclose(mpmc.pixel_weights(ctx), torch.full((2, 32, 32), e / (e + 2)), atol=1e-5)


def test_presence_lambda_s_gives_every_class_the_teacher_finds_in_the_patch_weight_one():
    """``lambda_s: presence``: σ(q) of the pixel's class, so two classes sharing every patch both get
    ≈ 1 (eq. 5's γ gives each ½), a ruled-out class ≈ 0; λ_m (γ) is unchanged; the CutMix partner's
    pasted pixels read the partner's σ(q) at the pasted label."""
    torch.manual_seed(0)
    batch = make_batch()
    weights = {}
    for mode in ("gamma", "presence"):
        method = method_with({"name": "unimatch"}, {"lambda_s": mode})
        mpmc = method.plugins["mpmc"]
        set_teacher_bias(mpmc, [12.0, 12.0, -12.0])
        ctx = joint_context(method, batch)
        ctx.pseudo_w = torch.arange(32).remainder(2).expand(2, 32, 32).clone()  # classes 0 and 1
        weights[mode] = mpmc.pixel_weights(ctx)
        assert torch.allclose(mpmc.state(ctx).gamma[:, :2], torch.full((2, 2, 16, 16), 0.5), atol=1e-5)
        ctx.pseudo_w = torch.full_like(ctx.pseudo_w, 2)
        assert bool((mpmc.pixel_weights(ctx) < 1e-5).all())
        partner = torch.zeros(2, 32, 32, dtype=torch.long)
        pasted = mpmc.partner_pixel_weights(ctx, partner, weights[mode])
        assert torch.allclose(pasted, weights[mode].new_full((2, 32, 32), 0.5 if mode == "gamma" else 1.0),
                              atol=1e-5)  # fmt: skip
    assert torch.allclose(weights["gamma"], torch.full((2, 32, 32), 0.5), atol=1e-5)
    assert torch.allclose(weights["presence"], torch.ones(2, 32, 32), atol=1e-5)
    with pytest.raises(ConfigError, match="lambda_s"):
        method_with({"name": "unimatch"}, {"lambda_s": "softmax"})


def test_lambda_s_follows_the_cutmix_partner_and_supmix_pastes_weight_one():
    torch.manual_seed(0)
    batch = make_batch(n_u=3)
    method = method_with({"name": "unimatch", "mix": "cutmix"})
    mpmc = method.plugins["mpmc"]
    ctx = joint_context(method, batch)
    partner = method.partner_prediction(batch.x_w)
    weight, partner_weight = method.plugin_mix_weights(ctx, partner.label)
    own = PixelTargets(ctx.pseudo_w, ctx.conf_w, ctx.ignore, weight)
    pasted = PixelTargets(partner.label, partner.score, ctx.ignore.flip(0), partner_weight)
    target = method.mix_strong_view(batch.x_s1, batch.box1, own, pasted, batch)
    box = batch.box1.bool()
    # Inside the box: the partner's γ at the class the mix pastes (its eval-mode pseudo-label), by hand.
    gamma, geom = mpmc.state(ctx).gamma.flip(0), mpmc.geometry
    expected = torch.empty_like(weight)
    for n in range(3):
        for i in range(32):
            for j in range(32):
                r = min(max(math.floor((i - geom.center) / geom.stride + 0.5), 0), gamma.shape[2] - 1)
                c = min(max(math.floor((j - geom.center) / geom.stride + 0.5), 0), gamma.shape[3] - 1)
                expected[n, i, j] = gamma[n, partner.label[n, i, j], r, c]
    assert torch.equal(target.weight[box], expected[box])
    assert torch.equal(target.label[box], partner.label[box])
    assert torch.equal(target.weight[~box], weight[~box])
    assert not torch.equal(expected[box], weight.flip(0)[box])  # not the partner's train-mode label

    method = method_with({"name": "unimatch", "mix": "supmix", "mixer": {"p": 1.0}})
    ctx = joint_context(method, batch)
    weight, _ = method.plugin_mix_weights(ctx, None)
    own = PixelTargets(ctx.pseudo_w, ctx.conf_w, ctx.ignore, weight)
    target = method.mix_strong_view(batch.x_s1, batch.box1, own, None, batch)
    pasted = target.confidence == 1.0  # ground truth (eq. 11); predictions never reach exactly 1 here
    assert bool(pasted.any()) and bool((~pasted).any())
    assert bool((target.weight[pasted] == 1.0).all())
    assert torch.equal(target.weight[~pasted], weight[~pasted])
    assert bool((weight < 1.0).all())  # so the 1s above come from the paste


# ----------------------------------------------------------------------------------------------
# Which parameters each pass trains
# ----------------------------------------------------------------------------------------------


def test_one_pass_trains_the_encoder_and_the_head():
    torch.manual_seed(0)
    method = method_with({"name": "unimatch"})
    mpmc = method.plugins["mpmc"]
    assert set(method.extra_optimizers()) == {"mpmc"} and mpmc.optimizer_on_total
    ctx = joint_context(method, make_batch())
    stats_before = [b.clone() for b in mpmc.head.buffers()]

    terms = mpmc.losses(ctx)
    assert set(terms) == {"loss_l", "loss_u"}
    assert any(not torch.equal(a, b) for a, b in zip(stats_before, mpmc.head.buffers()))  # BN updated once
    logged = mpmc.optimizer_losses(ctx)["mpmc"]
    assert not logged.requires_grad
    assert logged.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)
    sum(terms.values()).backward()
    assert all(nonzero(p.grad) for p in mpmc.head.parameters())
    assert nonzero(next(iter(method.model.encoder.levels[1].parameters())).grad)  # the tap's level
    assert all(p.grad is None for p in method.model.decoder.parameters())  # MPMC reads the encoder only


def test_trainer_steps_the_head_on_the_gradient_of_total(tmp_path, monkeypatch):
    """The head's SGD steps once per step on exactly the gradient of that step's MPMC terms (what
    total's backward leaves in the head, zeroed before it: not accumulated over steps)."""
    cfg = load_config(None, tiny_overrides(iters=3, **{"method.name": "unimatch", "plugins.mpmc": "{}"}))
    trainer = Trainer(cfg, tmp_path / "run")
    opt = trainer.extra_optimizers["mpmc"]
    head = list(trainer.method.plugins["mpmc"].head.parameters())
    expected: list[list[torch.Tensor]] = []
    seen: list[list[torch.Tensor]] = []
    training_step, step = trainer.method.training_step, opt.step

    def recording_training_step(batch, info):
        result = training_step(batch, info)
        assert result.steps_with_loss == {"mpmc"} and not result.optimizer_losses
        terms = result.logs["mpmc/loss_l"] + result.logs["mpmc/loss_u"]
        expected.append([g.clone() for g in torch.autograd.grad(terms, head, retain_graph=True)])
        return result

    def recording_step(*args, **kwargs):
        seen.append([p.grad.clone() for p in opt.param_groups[0]["params"]])
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.method, "training_step", recording_training_step)
    monkeypatch.setattr(opt, "step", recording_step)
    trainer.fit()
    assert len(seen) == len(expected) == 3
    for got, want in zip(seen, expected):
        assert all(nonzero(g) for g in got)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, want))


def test_hosts_pass_their_step_multipliers():
    torch.manual_seed(0)
    batch = make_batch()
    for host, (labeled, unlabeled) in {
        "unimatch": (0.5, lambda w: 0.5 * w),
        "fixmatch": (0.5, lambda w: 0.5 * w),
        "mean_teacher": (1.0, lambda w: w),
    }.items():
        method = method_with({"name": host, "warmup_iters": 2, "rampup_iters": 10})
        seen = spy_state(method.plugins["mpmc"])
        method.training_step(batch, StepInfo(6, 100)).named()
        w = math.exp(-5.0 * (1.0 - 4 / 10) ** 2)  # sigmoid ramp-up, 4 steps after the warm-up
        assert seen["ctx"].labeled_scale == pytest.approx(labeled), host
        assert seen["ctx"].unlabeled_scale == pytest.approx(unlabeled(w)), host


def test_strong_student_needs_a_host_with_strong_views():
    method = method_with({"name": "mean_teacher"}, {"student_input": "strong"})
    with pytest.raises(RuntimeError, match="student_input: strong"):
        method.training_step(make_batch(), StepInfo(0, 100)).named()


def spy_state(mpmc) -> dict:
    """Record the plug-in's step state and context of the next step."""
    seen: dict = {}
    original = mpmc.state

    def spy(ctx):
        seen["state"], seen["ctx"] = original(ctx), ctx
        return seen["state"]

    mpmc.state = spy
    return seen


@pytest.mark.parametrize("mix", ["cutmix", "supmix"])
def test_student_sees_the_mixed_strong_views_with_targets_from_their_source(mix):
    torch.manual_seed(0)
    batch = make_batch(n_u=3)
    unimatch = method_with(
        {"name": "unimatch", "mix": mix, **({"mixer": {"p": 1.0}} if mix == "supmix" else {})}
    )
    mpmc = unimatch.plugins["mpmc"]
    seen = spy_state(mpmc)
    losses = unimatch.training_step(batch, StepInfo(0, 100)).named()
    st, ctx = seen["state"], seen["ctx"]
    assert st.dropout is None and len(ctx.features_s) == 2 and len(ctx.sources_s) == 2
    assert len(st.students) == 1 and st.students[0].shape[0] == 2 * 3  # both strong views, one batch
    z_s = ctx.features_s[0][mpmc.tap]
    assert z_s.requires_grad and z_s.data_ptr() != ctx.features_w[mpmc.tap].data_ptr()
    t_logits, gamma, valid = st.student_targets
    h, w = st.teacher_logits.shape[-2:]
    geom = mpmc.geometry
    for v, sources in enumerate(ctx.sources_s):
        for n in range(3):
            for i in range(h):
                for j in range(w):
                    y = min(max(math.floor(geom.center + geom.stride * i + 0.5), 0), 31)  # half up
                    x = min(max(math.floor(geom.center + geom.stride * j + 0.5), 0), 31)
                    src = int(sources[n, y, x])
                    k = v * 3 + n
                    if src == 2:  # SupMix ground truth: left out
                        assert not bool(valid[k, i, j])
                        continue
                    m = n if src == 0 else 2 - n  # own, or the partner (flipped batch)
                    assert torch.equal(t_logits[k, :, i, j], st.teacher_logits[m, :, i, j])
                    assert torch.equal(gamma[k, :, i, j], st.gamma[m, :, i, j])
                    assert bool(valid[k, i, j]) == bool(st.valid_u[m, i, j])
    kinds = set(torch.cat(ctx.sources_s).unique().tolist())
    assert kinds == ({0, 1} if mix == "cutmix" else {0, 2})
    grads = torch.autograd.grad(losses["mpmc/loss_u"], z_s, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0  # L_u^M trains the strong-view encoder


def test_student_input_is_perturbed_for_a_self_teacher_and_plain_for_mean_teacher():
    torch.manual_seed(0)
    batch = make_batch()
    unimatch = method_with({"name": "unimatch"})
    dropout = unimatch.plugins["mpmc"].state(joint_context(unimatch, batch)).dropout  # no strong views
    assert_channel_dropout(dropout, 2, 8)  # the tap: U-Net level 1, 8 channels

    mt = method_with({"name": "mean_teacher"})
    seen = spy_state(mt.plugins["mpmc"])
    mt.training_step(batch, StepInfo(0, 100)).named()
    assert seen["state"].dropout is None  # the student already sees another (strong) view
    ctx = seen["ctx"]
    assert ctx.teacher_features_w[1].data_ptr() != ctx.features_w[1].data_ptr()
    forced = method_with({"name": "mean_teacher"}, {"student_input": "perturbed"}).plugins["mpmc"]
    ctx.extras.clear()  # the step's cached state belongs to the other plug-in
    assert_channel_dropout(forced.state(ctx).dropout, 2, 8)


def test_switches_and_warmup():
    torch.manual_seed(0)
    batch = make_batch()
    only_l = method_with({"name": "unimatch"}, {"unlabeled": False})
    ctx = joint_context(only_l, batch)
    assert only_l.plugins["mpmc"].pixel_weights(ctx) is None
    assert set(only_l.plugins["mpmc"].losses(ctx)) == {"loss_l"}

    only_u = method_with({"name": "unimatch"}, {"labeled": False})
    ctx = joint_context(only_u, batch)
    assert only_u.plugins["mpmc"].pixel_weights(ctx) is not None
    assert set(only_u.plugins["mpmc"].losses(ctx)) == {"loss_u"}

    warm = method_with({"name": "unimatch"}, {"warmup_iters": 5})
    assert warm.plugins["mpmc"].pixel_weights(joint_context(warm, batch, step=4)) is None
    assert set(warm.plugins["mpmc"].losses(joint_context(warm, batch, step=4))) == {"loss_l"}
    assert warm.plugins["mpmc"].pixel_weights(joint_context(warm, batch, step=5)) is not None

    scaled = method_with({"name": "unimatch"}, {"scale": 0.5, "beta": 0.2, "weight_labeled": 2.0})
    plain = method_with({"name": "unimatch"}, {"beta": 1.0})
    initial = {k: v.clone() for k, v in scaled.state_dict().items()}
    plain.load_state_dict(initial)
    torch.manual_seed(1)
    a = scaled.plugins["mpmc"].losses(joint_context(scaled, batch))
    torch.manual_seed(1)
    b = plain.plugins["mpmc"].losses(joint_context(plain, batch))
    assert a["loss_l"].item() == pytest.approx(b["loss_l"].item(), rel=1e-5)  # 0.5 · 2
    assert a["loss_u"].item() == pytest.approx(0.1 * b["loss_u"].item(), rel=1e-5)  # 0.5 · 0.2

    # scale: null follows the host's multipliers of the step.
    plain.load_state_dict(initial)  # the head's BN statistics (the teacher's) moved with b's step
    torch.manual_seed(1)  # the U-Net's dropout draws too
    ctx = joint_context(plain, batch)
    ctx.labeled_scale, ctx.unlabeled_scale = 0.5, 0.125
    c = plain.plugins["mpmc"].losses(ctx)
    assert c["loss_l"].item() == pytest.approx(0.5 * b["loss_l"].item(), rel=1e-5)
    assert c["loss_u"].item() == pytest.approx(0.125 * b["loss_u"].item(), rel=1e-5)


@pytest.mark.parametrize("host", ["unimatch", "fixmatch", "mean_teacher"])
def test_labeled_patch_loss_trains_in_the_hosts_warmup(host):
    torch.manual_seed(0)
    batch = make_batch()
    method = method_with({"name": host, "warmup_iters": 2, "rampup_iters": 4})
    losses = method.training_step(batch, StepInfo(0, 100)).named()
    assert {"mpmc/loss_l", "total/mpmc"} <= set(losses) and "mpmc/loss_u" not in losses
    expected = losses["loss_x"].item() + losses["mpmc/loss_l"].item()  # L_x + L_l^M: ratio 1, as after it
    assert losses["total"].item() == pytest.approx(expected, rel=1e-6)
    head = list(method.plugins["mpmc"].head.parameters())
    assert all(g is not None for g in torch.autograd.grad(losses["total"], head, retain_graph=True))
    enc = torch.autograd.grad(
        losses["mpmc/loss_l"], list(method.model.encoder.parameters()), allow_unused=True
    )
    assert any(g is not None and g.abs().sum() > 0 for g in enc)
    # After the warm-up: both terms, at the host's multipliers (UniMatch / FixMatch: ½ and ½·ramp).
    after = method.training_step(batch, StepInfo(3, 100)).named()
    assert {"mpmc/loss_l", "mpmc/loss_u"} <= set(after)
    without = method_with({"name": host, "warmup_iters": 2}, {"unlabeled": False, "labeled": True})
    assert "total/mpmc" in without.training_step(batch, StepInfo(0, 100)).named()
    sufd_only = method_with({"name": host, "warmup_iters": 2}, {"labeled": False})
    assert "total/mpmc" not in sufd_only.training_step(batch, StepInfo(0, 100)).named()


def test_perturbed_student_input_stays_out_of_the_running_statistics():
    torch.manual_seed(0)
    batch = make_batch()
    method = method_with({"name": "unimatch"}, {"labeled": False, "student_input": "perturbed"})
    mpmc = method.plugins["mpmc"]
    before = {k: v.clone() for k, v in mpmc.head.state_dict().items() if "running" in k}
    ctx = joint_context(method, batch)
    sum(mpmc.losses(ctx).values()).backward()
    after = mpmc.head.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_probe_starts_at_the_models_smallest_input():
    model = build_model(ModelConfig(name="unet", widths=[2, 2, 2, 2, 2, 2, 2, 2]), 1, 2)
    assert model.min_size > 64
    probe = probe_tap(model, None)
    # level 1 (MaxPool 2 and two 3×3 convs after level 0's two): the same field as the tiny U-Net's
    assert (probe.index, probe.channels, probe.stride, probe.field) == (1, 2, 2, (-6, 7))


@pytest.mark.parametrize(
    "channels,classes,size,n_l,n_u",
    [(1, 2, (24, 40), 1, 3), (3, 5, (33, 32), 3, 1), (1, 4, (32, 32), 2, 2)],
    ids=["grey-2cls-nonsquare", "rgb-5cls-odd", "grey-4cls"],
)
def test_any_classes_crop_batch_and_channels(channels, classes, size, n_l, n_u):
    torch.manual_seed(0)
    method = method_with({"name": "unimatch", "mix": "supmix"}, classes=classes, channels=channels)
    batch = make_batch(n_l=n_l, n_u=n_u, size=size, channels=channels, num_classes=classes)
    losses = method.training_step(batch, StepInfo(0, 100)).named()
    assert {"mpmc/loss_l", "mpmc/loss_u", "total/mpmc"} <= set(losses)
    assert all(bool(torch.isfinite(v)) for v in losses.values())
    losses["total"].backward()
    assert all(p.grad is not None for p in method.plugins["mpmc"].head.parameters())


# ----------------------------------------------------------------------------------------------
# The head's optimizer, state dict, config
# ----------------------------------------------------------------------------------------------


def test_head_has_its_own_sgd_with_poly_decay_and_is_in_the_state_dict():
    method = method_with({"name": "fixmatch"}, {"lr": 0.02, "poly_power": 1.0, "momentum": 0.8})
    mpmc = method.plugins["mpmc"]
    opt = method.extra_optimizers()["mpmc"]
    assert opt is method.extra_optimizers()["mpmc"] and isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == 0.02 and group["momentum"] == 0.8 and group["weight_decay"] == 1e-4
    assert {id(p) for p in group["params"]} == {id(p) for p in mpmc.head.parameters()}
    assert not {id(p) for p in group["params"]} & {id(p) for p in method.model.parameters()}
    method.extra_schedulers()["mpmc"](49)
    assert group["lr"] == pytest.approx(0.01)
    keys = [k for k in method.state_dict() if k.startswith("plugins.mpmc.head.")]
    assert any(k.endswith("classifier.weight") for k in keys) and any("running_mean" in k for k in keys)


def test_head_layout_follows_the_paper():
    mpmc = method_with({"name": "unimatch"}, {"channels": [12, 10, 6], "pool_sizes": [3, 7, 19]}).plugins[
        "mpmc"
    ]
    convs = [m for m in mpmc.head.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [3, 3, 1] * 3
    assert [c.out_channels for c in convs] == [12, 12, 12, 10, 10, 10, 6, 6, 6]
    assert convs[0].in_channels == 8 * 4  # the tap (8 channels) and three average pools
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in mpmc.head.modules()) == 9
    assert mpmc.head.classifier.kernel_size == (1, 1) and mpmc.head.classifier.out_channels == NUM_CLASSES
    assert [p.kernel_size for p in mpmc.head.pools] == [3, 7, 19]
    assert all(p.count_include_pad is False for p in mpmc.head.pools)
    default = method_with({"name": "unimatch"}).plugins["mpmc"]
    assert [c.out_channels for c in default.head.blocks.modules() if isinstance(c, torch.nn.Conv2d)] == [
        8
    ] * 9


@pytest.mark.parametrize("count_include_pad", [False, True])
def test_separable_pooling_equals_avgpool2d(count_include_pad):
    x = torch.randn(2, 3, 11, 23, dtype=torch.float64)
    for k in (1, 3, 7, 19):
        ref = torch.nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=count_include_pad)(x)
        assert torch.allclose(SeparableAvgPool2d(k, count_include_pad)(x), ref, atol=1e-12)


def test_config_validation_and_registration():
    assert PLUGINS["mpmc"] is MPMC and MPMC.Config is MPMCConfig
    for bad, key in [
        ({"pool_sizes": [6]}, "pool_sizes"),
        ({"beta": -1}, "beta"),
        ({"labeled": False, "unlabeled": False}, "mpmc"),
        ({"student_input": "weak"}, "student_input"),
        ({"patch_stride": 2}, "patch_stride"),  # the stride is the tap's: no override
        ({"scale": -1}, "scale"),
        ({"fp_dropout": 1.0}, "fp_dropout"),
        ({"nope": 1}, "nope"),
    ]:
        with pytest.raises(ConfigError, match=rf"plugins\.mpmc(\.{key})?"):
            build_config({"method": {"name": "unimatch"}, "plugins": {"mpmc": bad}})
    with pytest.raises(ConfigError, match=r"plugins\.mpmc"):
        build_method(build_config({"plugins": {"mpmc": {}}}), tiny_unet(), NUM_CLASSES)  # supervised


# ----------------------------------------------------------------------------------------------
# End to end, resume, shipped configs and grids
# ----------------------------------------------------------------------------------------------


def _head_state(method) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in method.plugins["mpmc"].head.state_dict().items()}


@pytest.mark.parametrize(
    "config,extra",
    [
        ("unimatch_supmix_sufd_mpmc", {}),
        (None, {"method.name": "fixmatch", "plugins.mpmc": "{}"}),
        (None, {"method.name": "mean_teacher", "plugins.mpmc": "{}"}),
    ],
    ids=["unimatch+supmix+sufd+mpmc", "fixmatch+mpmc", "mean_teacher+mpmc"],
)
def test_tiny_training_run(tmp_path, config, extra):
    files = None if config is None else composed("cpu_small", "synthetic", config)
    cfg = load_config(files, tiny_overrides(iters=3, **extra))
    trainer = Trainer(cfg, tmp_path / "run")
    before = _head_state(trainer.method)
    encoder_before = [p.detach().clone() for p in trainer.model.encoder.parameters()]
    trainer.fit()
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if r["kind"] == "train"][-1]
    assert {"mpmc/loss_l", "mpmc/loss_u", "total/mpmc"} <= set(last)
    lambdas = [v for k, v in last.items() if k.startswith("mpmc/lambda_s/")]
    assert lambdas and all(0.0 < v <= 1.0 for v in lambdas)
    if config is not None:
        assert {"sufd/loss_adv", "total/sufd"} <= set(last) and cfg.method.mix == "supmix"
    after = trainer.method.plugins["mpmc"].head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, trainer.model.encoder.parameters()))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["results"]["test"]["miou"] is not None


def test_checkpoint_holds_the_head_and_resume_is_exact(tmp_path, monkeypatch):
    overrides = tiny_overrides(iters=4, **{"method.name": "unimatch", "plugins.mpmc": "{}"})
    straight = tmp_path / "straight"
    train(load_config(None, overrides), straight)

    interrupted = tmp_path / "interrupted"
    trainer = Trainer(load_config(None, overrides), interrupted)
    fit_interrupted(trainer, monkeypatch, at_step=3)
    ckpt = load_checkpoint(interrupted / "latest.pt")
    assert ckpt["step"] == 2 and "mpmc" in ckpt["extra_optimizers"]
    assert ckpt["extra_optimizers"]["mpmc"]["state"]  # SGD momentum buffers of the head
    assert any(k.startswith("plugins.mpmc.head.") for k in ckpt["model"])
    train(load_config(None, overrides), interrupted, resume=True)

    a, b = load_checkpoint(straight / "latest.pt"), load_checkpoint(interrupted / "latest.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_method_files_and_runnables():
    runnables = {
        "unimatch_mpmc": ("chase_db1", "covid_infnet", "synthetic"),
        "unimatch_supmix_sufd_mpmc": ("chase_db1", "covid_infnet", "synthetic"),
        "unimatch_mpmc_l": ("chase_db1", "synthetic"),  # Table 6 ablation: CHASE_DB1 only
        "unimatch_mpmc_ul": ("chase_db1", "synthetic"),
        "unimatch_mpmc_presence": ("chase_db1", "synthetic"),  # ours: λ_s = σ(q), beside the ablation
    }
    for name, datasets in runnables.items():
        assert (CONFIGS / "methods" / f"{name}.yaml").is_file()
        for dataset in datasets:
            assert "mpmc" in load_config(composed("cpu_small", dataset, name)).plugins, (dataset, name)
    full = load_config(composed("cpu_small", "chase_db1", "unimatch_supmix_sufd_mpmc"))
    assert full.method.name == "unimatch" and full.method.mix == "supmix"
    assert set(full.plugins) == {"sufd", "mpmc"} and full.plugins["mpmc"].scale is None
    assert full.name == "cpu_small-chase_db1-unimatch_supmix_sufd_mpmc"
    covid = load_config(composed("cpu_small", "covid_infnet", "unimatch_mpmc"))
    assert set(covid.plugins) == {"mpmc"} and covid.data.name == "covid_infnet"
    assert covid.plugins["mpmc"].lr == covid.optim.lr * covid.optim.lr_multi


def test_grids_load_without_running():
    from semiseg.config import config_hash
    from semiseg.experiment import load_grid

    grid = load_grid(REPO / "benchmarks" / "grids" / "mpmc_cpu_small.yaml")
    assert len(grid.cells) == 2 * 4 * 3
    assert {c.method for c in grid.cells} == {
        "unimatch+freematch+da", "unimatch+mpmc+freematch+da",
        "unimatch+supmix+sufd+freematch+da", "unimatch+supmix+sufd+mpmc+freematch+da",
    }  # fmt: skip
    assert {c.dataset for c in grid.cells} == {"chase_db1", "covid_infnet"}
    assert {c.fraction for c in grid.cells} == {0.125} and {c.seed for c in grid.cells} == {0, 1, 2}
    assert all(c.cfg.method.pseudo.mask == "freematch" for c in grid.cells)  # the chosen recipe

    ablation = load_grid(REPO / "benchmarks" / "grids" / "mpmc_ablation_cpu_small.yaml")
    assert len(ablation.cells) == 5 * 3 and {c.dataset for c in ablation.cells} == {"chase_db1"}
    parts = {
        c.method: (
            c.cfg.plugins["mpmc"].labeled,
            c.cfg.plugins["mpmc"].unlabeled,
            c.cfg.plugins["mpmc"].lambda_s,
        )
        for c in ablation.cells
        if "mpmc" in c.cfg.plugins
    }
    assert parts == {
        "unimatch+mpmc_l+freematch+da": (True, False, "gamma"),
        "unimatch+mpmc_ul+freematch+da": (False, True, "gamma"),
        "unimatch+mpmc+freematch+da": (True, True, "gamma"),
        "unimatch+mpmc_presence+freematch+da": (True, True, "presence"),
    }
    # Cells shared with the recipe Table 1 are the same runs (same folder, same config hash): run once.
    table1 = load_grid(REPO / "benchmarks" / "grids" / "table1_cpu_small_recipe.yaml")
    ours = {
        (c.dataset, c.method, c.seed): (c.run_dir, config_hash(c.cfg)) for c in [*grid.cells, *ablation.cells]
    }
    shared = [c for c in table1.cells if (c.dataset, c.method, c.seed) in ours]
    assert len(shared) == 2 * 2 * 3
    for c in shared:
        assert ours[(c.dataset, c.method, c.seed)] == (c.run_dir, config_hash(c.cfg))


def test_benchmark_lambda_s_per_class_of_a_finished_run(tmp_path):
    """benchmarks/mpmc_confidence.py reads a finished run back (method state with the head) and gives
    per-class λ_s in [0, 1]: the teacher's where a class is pseudo-labelled, the ideal teacher's
    (1 / classes in the patch) wherever the class is in the ground truth."""
    import importlib.util

    overrides = tiny_overrides(iters=2, **{"method.name": "unimatch", "plugins.mpmc": "{}"})
    train(load_config(None, overrides), tmp_path / "run")
    script = REPO / "benchmarks" / "mpmc_confidence.py"
    spec = importlib.util.spec_from_file_location("mpmc_confidence", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.run_confidence(tmp_path / "run")
    assert row["images"] > 0 and row["patch"]["size"] >= row["patch"]["stride"] >= 1
    shares = [s["pseudo_share"] for s in row["classes"].values()]
    assert sum(shares) == pytest.approx(1.0)
    for stats in row["classes"].values():
        keys = ["teacher_lambda_s", "ideal_lambda_s", "pseudo_precision"]
        keys += [f"{w}_{part}_lambda_s" for w in ("gamma", "presence") for part in ("correct", "wrong")]
        keys.append("presence_all_lambda_s")
        for key in keys:
            assert stats[key] is None or 0.0 <= stats[key] <= 1.0
    assert any(s["ideal_lambda_s"] is not None and s["ideal_lambda_s"] < 1.0 for s in row["classes"].values())
    assert "| class |" in module.markdown([row], "cmd")
