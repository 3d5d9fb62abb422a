"""Semi-supervised methods (FixMatch, UniMatch, Mean Teacher), build_method and the loss math, on tiny
tensors: named finite losses that back-propagate, UniMatch's recipe step by step, EMA exactness."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Pointwise, make_batch, tiny_method, tiny_trainer, tiny_unet, train_update
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from semiseg.config import build_config, load_config
from semiseg.errors import ConfigError
from semiseg.losses import masked_pseudo_ce, masked_softmax_mse, pseudo_label
from semiseg.methods import METHODS, MeanTeacher, StepInfo, UniMatch, build_method
from semiseg.methods.mean_teacher import ema_update, sigmoid_rampup
from semiseg.methods.weak_strong import PixelTargets
from semiseg.plugins.base import Plugin, PluginConfig, StepContext

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"
IGN = 255


# ----------------------------------------------------------------------------------------------
# Loss math
# ----------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(2, 4),
    st.floats(0, 1),
    st.integers(0, 9999),
    st.booleans(),
)
def test_masked_pseudo_ce_matches_brute_force(n, s, c, tau, seed, weighted):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, s, s, generator=g)
    pseudo = torch.randint(0, c, (n, s, s), generator=g)
    conf = torch.rand(n, s, s, generator=g)
    ignore = torch.where(torch.rand(n, s, s, generator=g) < 0.3, IGN, 0)
    weight = torch.rand(n, s, s, generator=g) if weighted else None
    got = masked_pseudo_ce(logits, pseudo, conf, ignore, tau, weight)
    num, den = 0.0, 0
    for i in range(n):
        for y in range(s):
            for x in range(s):
                if ignore[i, y, x] == IGN:
                    continue
                den += 1
                if conf[i, y, x] >= tau:
                    ce = -torch.log_softmax(logits[i, :, y, x], 0)[pseudo[i, y, x]].item()
                    num += ce * (weight[i, y, x].item() if weighted else 1.0)
    assert got.item() == pytest.approx(num / max(den, 1), rel=1e-5, abs=1e-6)


def test_masked_softmax_mse_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g).softmax(1)
    conf = torch.rand(2, 4, 4, generator=g)
    ignore = torch.where(torch.rand(2, 4, 4, generator=g) < 0.3, IGN, 0)
    got = masked_softmax_mse(logits, t, conf, ignore, 0.4)
    p = logits.softmax(1)
    num = sum(((p[i, :, y, x] - t[i, :, y, x]) ** 2).mean().item()
              for i in range(2) for y in range(4) for x in range(4)
              if ignore[i, y, x] != IGN and conf[i, y, x] >= 0.4)  # fmt: skip
    assert got.item() == pytest.approx(num / int((ignore != IGN).sum()), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Every method: named finite losses, backward
# ----------------------------------------------------------------------------------------------

CASES = [
    ({"name": "supervised"}, {}, {"loss_x"}),
    ({"name": "fixmatch"}, {}, {"loss_x", "loss_s"}),
    ({"name": "fixmatch", "mix": "supmix", "mixer": {"p": 1.0}}, {"sufd": {}}, {"loss_s", "sufd/loss_adv"}),
    ({"name": "unimatch"}, {}, {"loss_x", "loss_s1", "loss_s2", "loss_fp", "mask_ratio"}),
    ({"name": "unimatch", "mix": "classmix", "mixer": {"p": 1.0}}, {}, {"loss_s1"}),
    (
        {"name": "unimatch", "mix": "supmix", "mixer": {"strategy": "inverse_frequency"}},
        {"sufd": {}},
        {"loss_fp", "sufd/loss_adv", "total/sufd"},
    ),
    (
        {
            "name": "unimatch",
            "mix": "supmix",
            "mixer": {"strategy": "difficulty", "difficulty": "confidence"},
        },
        {"sufd": {"input": "features"}},
        {"loss_s2", "total/sufd"},
    ),
    ({"name": "unimatch", "mix": "none", "dice_weight": 1.0}, {}, {"loss_x"}),
    ({"name": "mean_teacher"}, {}, {"loss_x", "loss_u", "consistency_weight"}),
    ({"name": "mean_teacher", "consistency": "ce", "threshold": 0.5}, {"sufd": {}}, {"loss_u", "total/sufd"}),
]


@pytest.mark.parametrize(
    "method_cfg,plugins,expected", CASES, ids=lambda v: str(v) if isinstance(v, dict) else ""
)
def test_training_step_returns_finite_named_losses_and_backward_works(method_cfg, plugins, expected):
    """Two steps through the trainer's own update (``Trainer.train_step``): the named losses are
    logged and finite, and the segmenter got a gradient."""
    trainer = tiny_trainer(method_cfg, plugins)
    for step in range(2):
        logged = train_update(trainer, make_batch(seed=step), step)
    assert "total" in logged and expected <= set(logged)
    for name, value in logged.items():
        assert math.isfinite(value), name
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    assert set(trainer.extra_optimizers) == set(plugins)


def test_unimatch_total_is_the_weighted_sum_over_two():
    torch.manual_seed(0)
    method = tiny_method({"name": "unimatch", "threshold": 0.0})
    losses = method.training_step(make_batch(), StepInfo(0, 10)).named()
    expect = (
        losses["loss_x"] + 0.25 * losses["loss_s1"] + 0.25 * losses["loss_s2"] + 0.5 * losses["loss_fp"]
    ) / 2
    assert torch.allclose(losses["total"], expect)
    assert losses["loss_fp"].item() > 0 and losses["loss_s1"].item() > 0


def test_plugin_losses_are_added_after_the_division():
    torch.manual_seed(0)
    method = tiny_method({"name": "unimatch"}, {"sufd": {"lambda_adv": 0.5}})
    losses = method.training_step(make_batch(), StepInfo(0, 10)).named()
    base = (
        losses["loss_x"] + 0.25 * losses["loss_s1"] + 0.25 * losses["loss_s2"] + 0.5 * losses["loss_fp"]
    ) / 2
    assert torch.allclose(losses["total"], base + losses["sufd/loss_adv"])


# ----------------------------------------------------------------------------------------------
# UniMatch's official training step, step by step
# ----------------------------------------------------------------------------------------------


def test_unimatch_step_matches_the_official_recipe_by_hand():
    torch.manual_seed(0)
    model = Pointwise()
    with torch.no_grad():
        model.conv.weight.mul_(4.0)  # spread the confidences around τ
    model.fp_dropout = 0.0  # feature perturbation as identity, so loss_fp can be recomputed
    tau = 0.6
    method = tiny_method({"name": "unimatch", "threshold": tau}, model=model)
    method.train()
    batch = make_batch()
    losses = method.training_step(batch, StepInfo(0, 10)).named()
    n_l, n_u = batch.x_l.shape[0], batch.x_w.shape[0]

    # Passes: partner weak images in eval mode without grad; cat(x_l, x_w); cat(x_s1, x_s2).
    assert model.calls == [(False, False, n_u), (True, True, n_l + n_u), (True, True, 2 * n_u)]
    assert model.training  # mode restored after the eval pass

    with torch.no_grad():
        lab_mix, conf_mix = pseudo_label(model(batch.x_w.flip(0)))
        lab_w, conf_w = pseudo_label(model(batch.x_w))
        for x_s, box, key in ((batch.x_s1, batch.box1, "loss_s1"), (batch.x_s2, batch.box2, "loss_s2")):
            img, lab, conf, ign = x_s.clone(), lab_w.clone(), conf_w.clone(), batch.ignore.clone()
            inside = box == 1
            img[inside.unsqueeze(1).expand_as(img)] = x_s.flip(0)[inside.unsqueeze(1).expand_as(img)]
            lab[inside], conf[inside] = lab_mix[inside], conf_mix[inside]
            ign[inside] = batch.ignore.flip(0)[inside]
            ce = F.cross_entropy(model(img), lab, reduction="none")
            expect = (ce * ((conf >= tau) & (ign != IGN))).sum() / (ign != IGN).sum()
            assert losses[key].item() == pytest.approx(expect.item(), rel=1e-5)
        ce_w = F.cross_entropy(model(batch.x_w), lab_w, reduction="none")  # FP off: p_fp = p_w
        expect_fp = (ce_w * ((conf_w >= tau) & (batch.ignore != IGN))).sum() / (batch.ignore != IGN).sum()
        assert losses["loss_fp"].item() == pytest.approx(expect_fp.item(), rel=1e-5)
        expect_x = F.cross_entropy(model(batch.x_l), batch.y_l, ignore_index=IGN)
        assert losses["loss_x"].item() == pytest.approx(expect_x.item(), rel=1e-5)
        assert losses["mask_ratio"].item() == pytest.approx(
            (((conf_w >= tau) & (batch.ignore != IGN)).sum() / (batch.ignore != IGN).sum()).item()
        )


def test_unimatch_feature_perturbation_only_on_unlabeled_half():
    seen = []

    class Spy(Pointwise):
        def perturb(self, feats):
            seen.append(feats[0].shape[0])
            return super().perturb(feats)

    method = tiny_method({"name": "unimatch"}, model=Spy())
    batch = make_batch(n_l=2, n_u=3)
    losses = method.training_step(batch, StepInfo(0, 10)).named()
    assert seen == [3]
    losses["total"].backward()


def test_unimatch_skips_partner_pass_when_nothing_is_mixed():
    model = Pointwise()
    method = tiny_method({"name": "unimatch"}, model=model)
    batch = make_batch()
    batch.box1.zero_()
    batch.box2.zero_()
    method.training_step(batch, StepInfo(0, 10)).named()
    assert [c[0] for c in model.calls] == [True, True]


def test_pseudo_labels_are_detached_and_unlabeled_losses_reach_the_model():
    torch.manual_seed(0)
    model = Pointwise()
    method = tiny_method({"name": "unimatch", "threshold": 0.0, "mix": "none"}, model=model)
    losses = method.training_step(make_batch(), StepInfo(0, 10)).named()
    (g,) = torch.autograd.grad(losses["loss_s1"], model.conv.weight)
    assert bool(g.abs().sum() > 0)


def test_supmix_in_unimatch_uses_gt_with_confidence_one():
    """With SupMix always on and τ = 1, only pasted ground-truth pixels (confidence 1) can count."""
    torch.manual_seed(0)
    model = Pointwise()
    method = tiny_method(
        {"name": "unimatch", "mix": "supmix", "mixer": {"p": 1.0}, "threshold": 1.0}, model=model
    )
    batch = make_batch()
    losses = method.training_step(batch, StepInfo(0, 10)).named()
    assert losses["loss_s1"].item() > 0 and losses["loss_s2"].item() > 0
    assert losses["loss_fp"].item() == 0.0  # the weak pseudo-labels never reach confidence 1


@pytest.mark.parametrize("source", ["weak", "strong"])
def test_supmix_source_selects_the_labeled_view_that_is_pasted(source):
    """SupMix's ``mixer.source``: pasted pixels come from ``x_l`` (weak, eq. 7–11) or ``x_ls`` (strong)."""
    torch.manual_seed(0)
    method = tiny_method(
        {"name": "unimatch", "mix": "supmix", "mixer": {"p": 1.0, "source": source}}, model=Pointwise()
    )
    assert method.needs_labeled_strong == (source == "strong")
    batch = make_batch()
    batch.x_ls = batch.x_l + 100.0  # distinguishable from the weak view and from x_s1
    with torch.no_grad():
        conf_w, pseudo_w = method.model(batch.x_w).softmax(dim=1).max(dim=1)
    own = PixelTargets(pseudo_w, conf_w, batch.ignore, None)
    target = method.mix_strong_view(batch.x_s1, None, own, None, batch)
    pasted = target.confidence == 1.0
    assert bool(pasted.any())
    source = (batch.x_ls if source == "strong" else batch.x_l)[torch.arange(3) % 2]
    channels_first = lambda t: t.permute(1, 0, 2, 3)  # noqa: E731
    assert torch.equal(channels_first(target.image)[:, pasted], channels_first(source)[:, pasted])


class StrongViewProbe(Plugin):
    """Records what the plug-in context holds when each hook runs."""

    needs_features = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(PluginConfig(), 3, model, 10)
        self.seen: list[tuple[str, bool, int | None, int]] = []

    @property
    def needs_strong_features(self) -> bool:
        return True

    def _record(self, hook: str, ctx: StepContext) -> None:
        views = None if ctx.features_s is None else len(ctx.features_s)
        self.seen.append((hook, ctx.has_strong_views, views, len(ctx.extras)))

    def pixel_weights(self, ctx: StepContext) -> None:
        self._record("pixel_weights", ctx)

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        self._record("losses", ctx)
        return {}


@pytest.mark.parametrize(("name", "views"), [("fixmatch", 1), ("unimatch", 2), ("mean_teacher", None)])
def test_plugins_get_the_strong_views_features_after_the_strong_forward(name, views):
    """``has_strong_views`` says whether the host hands over strong-view features; they are ``None``
    while the mix is built (``pixel_weights``) and filled before ``losses``. Hosts leave ``extras``
    to plug-ins."""
    torch.manual_seed(0)
    method = tiny_method({"name": name})
    probe = StrongViewProbe(method.model)
    method.attach_plugins({"probe": probe})
    method.training_step(make_batch(), StepInfo(0, 10))
    strong = views is not None
    assert probe.seen == [("pixel_weights", strong, None, 0), ("losses", strong, views, 0)]


def test_supmix_source_strong_without_labeled_strong_view_fails_clearly():
    method = tiny_method({"name": "unimatch", "mix": "supmix", "mixer": {"p": 1.0, "source": "strong"}})
    with pytest.raises(AssertionError, match="x_ls"):
        method.training_step(make_batch(), StepInfo(0, 10)).named()


# ----------------------------------------------------------------------------------------------
# Mean Teacher
# ----------------------------------------------------------------------------------------------


def test_ema_update_is_exact():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    bn_s, bn_t = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        for mod in (student, teacher, bn_s, bn_t):
            for p in mod.parameters():
                p.copy_(torch.randint(-8, 8, p.shape).float() / 4)  # dyadic: exact in float
        bn_s.running_mean.fill_(1.0)
        bn_s.num_batches_tracked.fill_(7)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.75)
    for t0, t, s in zip(before, teacher.parameters(), student.parameters()):
        assert torch.equal(t, 0.75 * t0 + 0.25 * s)
    ema_update(bn_t, bn_s, 0.5)
    assert torch.equal(bn_t.running_mean, torch.full((2,), 0.5))
    assert int(bn_t.num_batches_tracked) == 7


def test_mean_teacher_after_step_updates_teacher_with_momentum():
    torch.manual_seed(0)
    method = tiny_method(
        {"name": "mean_teacher", "ema_momentum": 0.9, "ema_warmup": False}, model=Pointwise()
    )
    assert isinstance(method, MeanTeacher)
    with torch.no_grad():
        method.model.conv.weight.add_(1.0)
    t0 = method.teacher.conv.weight.clone()
    s = method.model.conv.weight.detach().clone()
    method.after_step(StepInfo(5, 10))
    assert torch.allclose(method.teacher.conv.weight, 0.9 * t0 + 0.1 * s, atol=1e-7, rtol=0)
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_mean_teacher_warmup_momentum_and_eval_model():
    method = tiny_method({"name": "mean_teacher", "ema_momentum": 0.99}, model=Pointwise())
    assert method.momentum_at(0) == 0.0  # first update copies the student (Tarvainen's warm-up)
    assert method.momentum_at(9) == pytest.approx(0.9)
    assert method.momentum_at(10_000) == 0.99
    assert method.eval_model() is method.teacher
    student = tiny_method({"name": "mean_teacher", "eval_teacher": False}, model=Pointwise())
    assert student.eval_model() is student.model
    assert any(k.startswith("teacher.") for k in method.state_dict())


def test_mean_teacher_consistency_ramps_up():
    assert sigmoid_rampup(0, 10) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    method = tiny_method(
        {"name": "mean_teacher", "consistency_weight": 2.0, "rampup": 0.5}, model=Pointwise()
    )
    early = method.training_step(make_batch(), StepInfo(0, 100)).named()
    late = method.training_step(make_batch(), StepInfo(60, 100)).named()
    assert early["consistency_weight"].item() == pytest.approx(2.0 * sigmoid_rampup(0, 50))
    assert late["consistency_weight"].item() == pytest.approx(2.0)
    assert torch.allclose(late["total"], late["loss_x"] + 2.0 * late["loss_u"])


# ----------------------------------------------------------------------------------------------
# build_method, configs, checkpoints
# ----------------------------------------------------------------------------------------------


def test_supervised_rejects_plugins_that_need_unlabeled_data():
    with pytest.raises(ConfigError, match=r"plugins\.sufd"):
        tiny_method({"name": "supervised"}, {"sufd": {}})


@pytest.mark.parametrize(
    "method_cfg,key",
    [
        ({"name": "unimatch", "threshold": 1.5}, "method.threshold"),
        ({"name": "unimatch", "mix": "supmix", "mixer": {"p": -0.1}}, "method.mixer.p"),
        ({"name": "fixmatch", "weight_s": -1.0}, "method.weight_s"),
        ({"name": "unimatch", "mix": "mixup"}, "method.mix"),
        ({"name": "mean_teacher", "ema_momentum": 2.0}, "method.ema_momentum"),
    ],
)
def test_bad_method_values_name_the_key(method_cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({"method": method_cfg})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_method_yaml_files_build(path):
    cfg = load_config(path, ["train.iters=5"])
    method = build_method(cfg, Pointwise(), 3)
    assert type(method) is METHODS[cfg.method.name]
    assert set(method.extra_optimizers()) == set(cfg.plugins)


def test_unimatch_supmix_sufd_is_one_config():
    cfg = load_config(CONFIGS / "unimatch_supmix_sufd.yaml")
    method = build_method(cfg, tiny_unet(), 3)
    assert isinstance(method, UniMatch) and method.cfg.mix == "supmix" and "sufd" in method.plugins


def test_state_dict_round_trip_keeps_statistics_and_discriminator():
    method_cfg = {"name": "unimatch", "mix": "supmix", "mixer": {"strategy": "difficulty"}}
    trainer = tiny_trainer(method_cfg, {"sufd": {}})
    train_update(trainer, make_batch(), 0)
    a = trainer.method
    state = a.state_dict()
    assert {"mixer.stats.iou", "mixer.stats.frequency"} <= set(state)
    assert any(k.startswith("plugins.sufd.disc.") for k in state)
    b = tiny_method(method_cfg, {"sufd": {}})
    b.load_state_dict(state)
    assert torch.equal(b.mixer.stats.iou, a.mixer.stats.iou)
    assert bool(b.mixer.stats.seen.any())
