"""GuidedMix-Net: pair selection, λ sampling, decoupling arithmetic, MITrans, the network's interface,
the training step (alone, with SUFD, end to end from the CLI) and its configs and grids."""

from __future__ import annotations

import dataclasses
import json
import math
from functools import partial
from pathlib import Path

import helpers
import pytest
import torch
from helpers import (
    REPO,
    composed,
    fit_interrupted,
    tiny_method,
    tiny_model,
    tiny_model_config,
    tiny_overrides,
    tiny_trainer,
    train_update,
)
from torch import Tensor, nn

from semiseg.config import MIGRATIONS, build_config, config_hash, load_config
from semiseg.errors import ConfigError
from semiseg.methods import Batch, StepInfo, build_method
from semiseg.methods.guidedmix import (
    GuidedMix,
    GuidedMixConfig,
    class_presence,
    decouple,
    decoupled_consistency,
    lupi_mix,
    masked_mean,
    nearest_pairs,
    pair_embedding,
    random_pairs,
    sample_lambda,
    sigmoid_focal,
)
from semiseg.models import Segmenter, SegOutput, build_model
from semiseg.models.guidedmix import GuidedMixNet, GuidedMixOutput, MITrans, NonLocalTransfer

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "semiseg" / "configs"
GRIDS = REPO / "benchmarks" / "grids"
GUIDEDMIX_SYNTHETIC = composed("cpu_small", "synthetic", "guidedmix/cpu_small")
IGN = 255
NEW_MODEL_FIELDS = (
    "backbone_widths",
    "psp_bins",
    "psp_channels",
    "decoder_channels",
    "mitrans",
    "mitrans_levels",
    "mitrans_zero_init",
)


tiny_cfg = partial(tiny_model_config, "guidedmix")  # GuidedMix-Net on a 4-8-8-8 ResNet-18

#: 2 labeled + 3 unlabeled 32² images with padded strips, no CutMix boxes.
make_batch = partial(helpers.make_batch, pad_labeled=2, pad_unlabeled=3, boxes=None)


def tiny_net(num_classes: int = 3, in_channels: int = 3, **kw: object) -> GuidedMixNet:
    model = tiny_model("guidedmix", in_channels, num_classes, **kw)
    assert isinstance(model, GuidedMixNet)
    return model


def method_for(
    method: dict | None = None, plugins: dict | None = None, model: Segmenter | None = None, iters: int = 10
) -> GuidedMix:
    model = model if model is not None else tiny_net()
    built = tiny_method({"name": "guidedmix", **(method or {})}, plugins, model, iters)
    assert isinstance(built, GuidedMix)
    return built


# ----------------------------------------------------------------------------------------------
# Similar pairs (eq. 3), λ (eq. 2), PMG (eq. 7–8), losses (eq. 10, 12)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_nearest_pairs_match_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    feat_l = torch.randn(4, 6, 3, 3, generator=g)
    feat_u = torch.randn(5, 6, 3, 3, generator=g)
    for kind in ("pooled", "map"):
        e_l, e_u = pair_embedding(feat_l, kind), pair_embedding(feat_u, kind)
        got = nearest_pairs(e_u, e_l)
        for k in range(5):
            if kind == "pooled":
                d = [
                    math.dist(feat_u[k].mean((1, 2)).tolist(), feat_l[i].mean((1, 2)).tolist())
                    for i in range(4)
                ]
            else:  # eq. 3 literally: sqrt of the sum over h, w (and channels) of the squared difference
                d = [float(((feat_l[i] - feat_u[k]) ** 2).sum().sqrt()) for i in range(4)]
            assert int(got[k]) == min(range(4), key=d.__getitem__)
        self_pairs = nearest_pairs(e_l, e_l, exclude_self=True)
        for i in range(4):
            d = [float((e_l[i] - e_l[j]).norm()) if j != i else math.inf for j in range(4)]
            assert int(self_pairs[i]) == min(range(4), key=d.__getitem__)


def test_identical_features_pair_with_each_other() -> None:
    e_l = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    e_u = torch.tensor([[8.5, 0.2], [0.1, -0.1], [5.0, 4.0]])
    assert nearest_pairs(e_u, e_l).tolist() == [2, 0, 1]


def test_random_pairs_are_in_range_and_never_self() -> None:
    torch.manual_seed(0)
    assert set(random_pairs(200, 3).tolist()) == {0, 1, 2}
    own = random_pairs(4, 4, exclude_self=True)
    assert bool((own != torch.arange(4)).all()) and bool(((own >= 0) & (own < 4)).all())
    many = torch.stack([random_pairs(3, 3, exclude_self=True) for _ in range(200)])
    assert bool((many != torch.arange(3)).all())
    assert {tuple(sorted(set(many[:, k].tolist()))) for k in range(3)} == {(1, 2), (0, 2), (0, 1)}


@pytest.mark.parametrize("alpha,lambda_max", [(1.0, 0.5), (0.5, 0.3), (2.0, 0.1), (0.2, 0.05)])
def test_lambda_bounds(alpha: float, lambda_max: float) -> None:
    torch.manual_seed(0)
    lam = sample_lambda(alpha, lambda_max, 2000)
    assert lam.shape == (2000,)
    assert bool((lam > 0).all()) and bool((lam < lambda_max).all()) and bool((lam <= 0.5).all())
    # Beta(1, 1) folded and truncated below 0.5 is uniform on [0, 0.5): mean 0.25
    if alpha == 1.0:
        assert abs(float(lam.mean()) - 0.25) < 0.02


def test_lambda_is_reproducible_and_fails_clearly_when_out_of_reach() -> None:
    torch.manual_seed(3)
    a = sample_lambda(1.0, 0.3, 5)
    torch.manual_seed(3)
    assert torch.equal(a, sample_lambda(1.0, 0.3, 5))
    with pytest.raises(RuntimeError, match="method.lambda_max"):
        sample_lambda(1e6, 1e-4, 1)  # Beta(α, α) with huge α sits at 0.5


def test_lupi_mix_and_decoupling_by_hand() -> None:
    x_l = torch.full((2, 1, 2, 2), 10.0)
    x_u = torch.full((2, 1, 2, 2), 2.0)
    lam = torch.tensor([0.25, 0.5])
    mixed = lupi_mix(x_l, x_u, lam)
    assert torch.allclose(mixed[0], torch.full((1, 2, 2), 0.25 * 10 + 0.75 * 2))  # 4.0
    assert torch.allclose(mixed[1], torch.full((1, 2, 2), 6.0))
    m_mix = torch.tensor([[[[0.9]], [[0.1]]]])  # 1 sample, 2 classes, 1×1
    m_l = torch.tensor([[[[0.6]], [[0.4]]]])
    soft = decouple(m_mix, m_l, torch.tensor([0.25]), "soft")
    hard = decouple(m_mix, m_l, torch.tensor([0.25]), "hard")
    assert torch.allclose(soft.flatten(), torch.tensor([0.9 - 0.15, 0.1 - 0.1]))  # eq. 8
    assert torch.allclose(hard.flatten(), torch.tensor([0.3, -0.3]))  # eq. 7
    # unmix: soft / (1 − λ), the exact inverse of a convex mix of probabilities (sums to 1 again).
    m_u = torch.tensor([[[[0.2]], [[0.8]]]])
    convex = 0.25 * m_l + 0.75 * m_u
    unmixed = decouple(convex, m_l, torch.tensor([0.25]), "soft", unmix=True)
    assert torch.allclose(unmixed, m_u) and torch.allclose(unmixed.sum(1), torch.ones(1, 1, 1))
    assert torch.allclose(
        decouple(convex, m_l, torch.tensor([0.25]), "soft").sum(1), torch.full((1, 1, 1), 0.75)
    )
    assert torch.equal(decouple(m_mix, m_l, torch.tensor([0.25]), "hard", unmix=True), hard)


def test_mse_consistency_by_hand_and_which_side_learns() -> None:
    cfg = GuidedMixConfig()
    direct_logits = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]], requires_grad=True)  # 1×2×1×2
    p = direct_logits.detach().softmax(1)
    dec = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)
    valid = torch.tensor([[[True, True]]])
    want = ((p - dec.detach()) ** 2).sum(1).mean()  # eq. 10: squared norm per pixel, mean over pixels
    loss = decoupled_consistency(direct_logits, dec, valid, cfg, "decoupled")
    assert torch.allclose(loss, want)
    loss.backward()
    assert direct_logits.grad is not None and dec.grad is None  # the decoupled mask is the target
    direct_logits.grad = None
    decoupled_consistency(direct_logits, dec, valid, cfg, "direct").backward()
    assert direct_logits.grad is None and dec.grad is not None
    # ignored pixels: excluded from the sum and the count
    one = decoupled_consistency(direct_logits, dec, torch.tensor([[[True, False]]]), cfg, "none")
    assert torch.allclose(one, ((p - dec.detach()) ** 2).sum(1)[0, 0, 0])


def test_focal_matches_the_formula_and_targets_the_argmax() -> None:
    logits = torch.tensor([[[[2.0]], [[-1.0]], [[0.5]]]])  # 1×3×1×1
    target = torch.tensor([[[2]]])
    gamma, alpha = 0.5, 0.25
    want = 0.0
    for c, z in enumerate([2.0, -1.0, 0.5]):
        t = 1.0 if c == 2 else 0.0
        p = 1 / (1 + math.exp(-z))
        bce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        pt1 = (1 - p) * t + p * (1 - t)
        want += (alpha * t + (1 - alpha) * (1 - t)) * pt1**gamma * bce
    assert math.isclose(float(sigmoid_focal(logits, target, gamma, alpha)), want / 3, rel_tol=1e-5)
    cfg = GuidedMixConfig(
        unsup_loss="focal", mask_space="logits", unsup_target="direct", focal_gamma=gamma, focal_alpha=alpha
    )
    direct = torch.tensor([[[[0.0]], [[0.0]], [[3.0]]]])  # argmax 2
    dec = logits.clone().requires_grad_(True)
    loss = decoupled_consistency(direct, dec, torch.ones(1, 1, 1, dtype=torch.bool), cfg, "direct")
    assert math.isclose(float(loss.detach()), want / 3, rel_tol=1e-5)


def test_class_presence_and_masked_mean() -> None:
    y = torch.tensor([[[0, 0], [2, IGN]], [[1, 1], [IGN, IGN]]])
    assert class_presence(y, 3).tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    per_pixel = torch.tensor([[1.0, 2.0, 3.0]])
    valid = torch.tensor([[True, False, True]])
    assert float(masked_mean(per_pixel, valid)) == pytest.approx(2.0)
    assert float(masked_mean(per_pixel, valid, torch.tensor([[0.5, 1.0, 0.0]]))) == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------
# MITrans and the network
# ----------------------------------------------------------------------------------------------


def test_mitrans_shapes_softmax_rows_and_zero_init_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 5)
    block = NonLocalTransfer(6, zero_init=True)
    assert block.query.out_channels == 3 and block.key.out_channels == 3 and block.value.out_channels == 6
    assert torch.equal(block(x), x)  # residual identity when V (its last layer) is zero
    attn = block.affinity(x)
    assert attn.shape == (2, 20, 20) and torch.allclose(attn.sum(-1), torch.ones(2, 20))
    live = NonLocalTransfer(6)
    assert not torch.allclose(live(x), x)
    # eq. 5 by hand for one position: v'_n = Σ_m A_nm V_m + v_n
    v = live.value(x).flatten(2)  # 2×6×20
    a = live.affinity(x)
    want = (a[1, 7][None, :] * v[1]).sum(-1) + x[1].flatten(1)[:, 7]
    assert torch.allclose(live(x)[1].flatten(1)[:, 7], want, atol=1e-5)
    up = MITrans(6, skip_channels=3, out_channels=5, scale=2, zero_init=True)
    out = up(x, torch.randn(2, 3, 8, 10))
    assert out.shape == (2, 5, 8, 10)
    assert up(x, torch.randn(2, 3, 9, 11)).shape == (2, 5, 9, 11)  # odd skip sizes are met exactly
    assert isinstance(up.attention, NonLocalTransfer)


def test_network_interface() -> None:
    torch.manual_seed(0)
    model = tiny_net(num_classes=3)
    x = torch.randn(2, 3, 37, 45)
    feats = model.encode(x)
    assert len(feats) == 5 and feats[-1].shape[1] == 8  # stem, layer1..3, psp(layer4)
    assert [f.shape[-1] for f in feats] == [23, 12, 6, 3, 2]
    logits = model(x)
    assert isinstance(logits, Tensor) and logits.shape == (2, 3, 37, 45)
    assert model.decode(feats, (37, 45)).shape == (2, 3, 37, 45)
    out = model(x, return_features=True)
    assert isinstance(out, GuidedMixOutput) and isinstance(out, SegOutput)
    assert out.image_logits is not None and out.image_logits.shape == (2, 3)
    assert torch.allclose(out.image_logits, model.classify(out.features))
    fp = model(x, fp_from=1)
    assert isinstance(fp, SegOutput) and fp.logits.shape == (2, 3, 37, 45)
    assert fp.logits_fp is not None and fp.logits_fp.shape == (1, 3, 37, 45)
    assert sum(isinstance(m, MITrans) for m in model.modules()) == 2
    assert isinstance(model.decoder[0], MITrans) and isinstance(model.decoder[1], MITrans)
    assert not isinstance(model.decoder[2], MITrans)
    backbone = {id(p) for p in model.backbone_parameters()}
    assert backbone == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in model.image_classifier.parameters()}.isdisjoint(backbone)
    model(x, return_features=True).image_logits.sum().backward()
    assert model.image_classifier.weight.grad is not None
    gray = tiny_net(num_classes=2, in_channels=1)
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)


def test_every_parameter_gets_a_gradient_from_plain_logits() -> None:
    """DDP (find_unused_parameters=False) needs it: the classifier is tied in with weight 0 in training,
    leaving the logits' values unchanged."""
    torch.manual_seed(0)
    model = tiny_net().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        untied = model(x)
    logits = model(x)
    assert torch.equal(logits.detach(), untied)
    logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert float(model.image_classifier.weight.grad.abs().sum()) == 0.0


def test_mitrans_off_and_output_stride() -> None:
    plain = tiny_net(mitrans=False)
    assert not any(isinstance(m, NonLocalTransfer) for m in plain.modules())
    dilated = tiny_net(output_stride=16)
    feats = dilated.encode(torch.randn(2, 3, 64, 64))
    assert feats[-1].shape[-1] == feats[-2].shape[-1] == 4  # layer4 keeps layer3's size
    assert dilated(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = tiny_net().eval()
    torch.manual_seed(1)
    b = tiny_net().eval()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert torch.equal(a(x, return_features=True).image_logits, b(x, return_features=True).image_logits)


def test_backbone_weights_file_loads_into_the_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = tiny_net()
    path = tmp_path / "encoder.pth"
    torch.save(a.backbone.state_dict(), path)
    b = build_model(tiny_cfg(weights=str(path)), 3, 3)
    assert all(torch.equal(v, b.backbone.state_dict()[k]) for k, v in a.backbone.state_dict().items())


def test_pretrained_is_never_downloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    seen: list[bool] = []
    real = timm.create_model

    def spy(*args, **kwargs):
        seen.append(bool(kwargs.get("pretrained")))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    tiny_net()
    cfg = load_config(GUIDEDMIX_SYNTHETIC)
    assert cfg.model.pretrained is False
    build_model(cfg.model, 3, 3)
    assert seen and not any(seen)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"decoder_channels": [8, 8, 8]}, "model.decoder_channels"),
        ({"mitrans_levels": [5]}, "model.mitrans_levels"),
        ({"output_stride": 4}, "model.output_stride"),
        ({"psp_bins": []}, "model.psp_bins"),
        ({"psp_channels": 0}, "model.psp_channels"),
        ({"backbone_widths": [4, 8]}, "model.backbone_widths"),
        ({"backbone_widths": [4, 8, 8, 8], "pretrained": True}, "model.backbone_widths"),
        ({"backbone": "no_such_net"}, "model.backbone"),
    ],
)
def test_bad_model_options_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_model(tiny_cfg(**change), 3, 3)


def test_new_model_fields_are_hash_neutral() -> None:
    added = {m.path for m in MIGRATIONS}
    for name in NEW_MODEL_FIELDS:
        assert f"model.{name}" in added, name
    gm = ["model.name=guidedmix"]
    base = load_config(None, gm)
    assert config_hash(base) == config_hash(load_config(None, [*gm, "model.psp_channels=512"]))
    assert config_hash(base) != config_hash(load_config(None, [*gm, "model.psp_channels=64"]))


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


class Recorder(Segmenter):
    """A 1×1-conv segmenter without classifier that records (grad enabled, batch) per pass."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels, self.num_classes = 3, 3
        self.conv = nn.Conv2d(3, 3, 1)
        self.calls: list[tuple[bool, int]] = []

    def encode(self, x: Tensor) -> list[Tensor]:
        self.calls.append((torch.is_grad_enabled(), x.shape[0]))
        return [x]

    def decode(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        return self.conv(feats[0])


def test_training_step_losses_and_gradients() -> None:
    torch.manual_seed(0)
    method = method_for()
    losses = method.training_step(make_batch(), StepInfo(5, 10)).named()
    for key in ("loss_x", "loss_u", "loss_dec", "loss_cla", "lambda", "consistency_weight", "total"):
        assert key in losses and bool(torch.isfinite(losses[key])), key
    assert 0 < float(losses["lambda"].detach()) < 0.5
    assert float(losses["loss_cla"].detach()) > 0 and float(losses["loss_dec"].detach()) > 0
    losses["total"].backward()
    model = method.model
    assert (
        model.image_classifier.weight.grad is not None and model.image_classifier.weight.grad.abs().sum() > 0
    )
    assert model.decoder[0].attention.query.weight.grad is not None
    assert float(losses["consistency_weight"].detach()) == 1.0  # step 5 ≥ rampup 0.3 × 10 steps: ω(t) = ω


def test_passes_total_and_ramp_by_hand() -> None:
    """One pass of cat(x_l, x_u) with grad, the mixed unlabeled pass without (it only makes the target),
    the mixed labeled pass with; total = L_ce + L_dec + L_cla + ω(t)·L_usup."""
    torch.manual_seed(0)
    rec = Recorder()
    method = method_for({"rampup": 0.5, "unsup_weight": 2.0, "dec_weight": 0.5}, model=rec, iters=100)
    losses = method.training_step(make_batch(n_l=2, n_u=3), StepInfo(10, 100)).named()
    assert rec.calls == [(True, 5), (False, 3), (True, 2)]
    omega = 2.0 * math.exp(-5 * (1 - 10 / 50) ** 2)
    assert float(losses["consistency_weight"].detach()) == pytest.approx(omega)
    assert float(losses["loss_cla"].detach()) == 0.0  # no classifier on this model: L_cla skipped
    want = losses["loss_x"] + 0.5 * losses["loss_dec"] + omega * losses["loss_u"]
    assert torch.allclose(losses["total"], want)
    rec.calls.clear()
    method_for({"unsup_target": "none"}, model=rec).training_step(make_batch(), StepInfo(0, 10)).named()
    assert rec.calls == [(True, 5), (True, 5)]  # mixed unlabeled + labeled pairs in one pass with grad
    rec.calls.clear()
    method_for({"dec_weight": 0.0}, model=rec).training_step(make_batch(n_l=1), StepInfo(0, 10)).named()
    assert rec.calls == [(True, 4), (False, 3)]


def recorded_step(method_cfg: dict) -> tuple[Recorder, Batch, dict[str, Tensor]]:
    """One step (3 labeled, 2 unlabeled images) on a :class:`Recorder`, the RNG then reset to the
    step's seed so a test can redraw the method's λ."""
    torch.manual_seed(0)
    rec = Recorder()
    method = method_for(method_cfg, model=rec)
    batch = make_batch(n_l=3, n_u=2)
    torch.manual_seed(7)
    losses = method.training_step(batch, StepInfo(9, 10)).named()
    torch.manual_seed(7)
    return rec, batch, losses


def test_usup_target_is_the_decoupled_mask_of_the_paired_labeled_image() -> None:
    """Recompute L_usup from the method's own pairs and λ (eq. 2, 3, 8, 10)."""
    rec, batch, losses = recorded_step({"pair_features": "map", "dec_weight": 0.0})
    lam = sample_lambda(1.0, 0.5, 1).expand(2)
    pair = nearest_pairs(batch.x_w.flatten(1), batch.x_l.flatten(1))  # Recorder's features = the image
    with torch.no_grad():
        p_l, p_u = rec(batch.x_l).softmax(1), rec(batch.x_w).softmax(1)
        p_mix = rec(lupi_mix(batch.x_l[pair], batch.x_w, lam)).softmax(1)
    target = p_mix - lam[:, None, None, None] * p_l[pair]
    valid = batch.ignore != IGN
    want = ((p_u - target) ** 2).sum(1)[valid].mean()
    assert float(losses["loss_u"].detach()) == pytest.approx(float(want), rel=1e-5)


def test_dec_loss_by_hand() -> None:
    """L_dec (eq. 12) from the method's own labeled pairs and λ: the hard-decoupled mask of the mixed
    labeled pair, M(λ·x_i + (1 − λ)·x_π(i)) − λ-free M(x_i), against the detached M(x_π(i))."""
    rec, batch, losses = recorded_step({"pair_features": "map", "unsup_weight": 0.0})
    sample_lambda(1.0, 0.5, 1)  # λ of the unlabeled mix comes first
    lam = sample_lambda(1.0, 0.5, 1).expand(3)
    flat = batch.x_l.flatten(1)
    pair = nearest_pairs(flat, flat, exclude_self=True)
    assert bool((pair != torch.arange(3)).all())
    with torch.no_grad():
        p_l = rec(batch.x_l).softmax(1)
        p_mix = rec(lupi_mix(batch.x_l, batch.x_l[pair], lam)).softmax(1)
    target = p_mix - p_l  # dec_decoupling: hard (eq. 12)
    valid = (batch.y_l[pair] != IGN) & (batch.y_l != IGN)
    want = ((p_l[pair] - target) ** 2).sum(1)[valid].mean()
    assert float(losses["loss_dec"].detach()) == pytest.approx(float(want), rel=1e-5)


def test_one_unlabeled_image_per_step_is_rejected_before_training() -> None:
    cfg = build_config({"method": {"name": "guidedmix"}, "data": {"unlabeled_batch_size": 1}})
    with pytest.raises(ConfigError, match=r"data\.unlabeled_batch_size"):
        build_method(cfg, tiny_net(), 3)


def test_random_pairing_and_released_options_train() -> None:
    torch.manual_seed(0)
    cfg = load_config(CONFIGS / "methods" / "guidedmix" / "released.yaml")
    released = dataclasses.asdict(cfg.method)
    trainer = tiny_trainer(released, model="guidedmix", **{"model.mitrans": False})
    assert trainer.method.cfg.pairing == "random" and trainer.method.cfg.unsup_loss == "focal"
    logged = train_update(trainer, make_batch(), 0)  # the trainer's own update
    assert logged["loss_cla"] == 0.0 and logged["loss_dec"] == 0.0
    assert logged["consistency_weight"] == 10.0 and math.isfinite(logged["total"])
    per_sample = {"name": "guidedmix", "pairing": "random", "lambda_per_sample": True, "decoupling": "hard"}
    assert math.isfinite(train_update(tiny_trainer(per_sample, model="guidedmix"), make_batch(), 0)["total"])


def test_guidedmix_composes_with_sufd() -> None:
    trainer = tiny_trainer({"name": "guidedmix"}, {"sufd": {"lambda_adv": 0.01}}, model="guidedmix")
    method = trainer.method
    assert "sufd" in method.plugins and set(method.extra_optimizers()) == {"sufd"}
    logged = train_update(trainer, make_batch(), 1)  # the trainer's own update
    assert "total/sufd" in logged and any(k.startswith("sufd/") for k in logged)
    assert all(math.isfinite(v) for v in logged.values())
    state = method.state_dict()
    assert any(k.startswith("plugins.sufd.") for k in state) and any(k.startswith("model.") for k in state)


@pytest.mark.parametrize(
    "method_cfg,key",
    [
        ({"lambda_max": 0.7}, "method.lambda_max"),
        ({"lambda_max": 0.0}, "method.lambda_max"),
        ({"alpha": 0.0}, "method.alpha"),
        ({"rampup": 1.5}, "method.rampup"),
        ({"unsup_weight": -1.0}, "method.unsup_weight"),
        ({"focal_alpha": 2.0}, "method.focal_alpha"),
        ({"pairing": "nearest"}, "method.pairing"),
        ({"unsup_loss": "focal", "unsup_target": "none"}, "method.unsup_target"),
        ({"unsup_loss": "focal", "unsup_target": "direct"}, "method.unsup_target"),
        ({"unsup_loss": "focal", "mask_space": "logits", "dec_target": "none"}, "method.dec_target"),
    ],
)
def test_bad_method_values_name_the_key(method_cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({"method": {"name": "guidedmix", **method_cfg}})


# ----------------------------------------------------------------------------------------------
# Configs, grids and an end-to-end run
# ----------------------------------------------------------------------------------------------


def test_shipped_configs_and_grids() -> None:
    from semiseg.experiment import load_grid

    for ds in ("chase_db1", "covid_infnet", "synthetic"):
        cfg = load_config(composed("cpu_small", ds, "guidedmix/cpu_small"))
        assert cfg.method.name == "guidedmix" and cfg.model.name == "guidedmix"
        assert cfg.model.backbone == "resnet18" and cfg.model.backbone_widths == [16, 32, 64, 128]
    for ds in ("chase_db1", "covid_infnet"):
        cfg = load_config(composed("paper", f"{ds}_paper", "guidedmix"))
        assert cfg.model.backbone == "resnet101" and cfg.model.output_stride == 32 and cfg.protocol == "paper"
    for path in sorted((CONFIGS / "methods" / "guidedmix").glob("*.yaml")):
        load_config(path)
    cells = {}
    for name in ("guidedmix_cpu_small", "guidedmix_ablation_cpu_small", "guidedmix_lambda_sweep_cpu_small"):
        grid = load_grid(GRIDS / f"{name}.yaml")
        assert {c.seed for c in grid.cells} == {0, 1, 2} and {c.fraction for c in grid.cells} == {0.125}
        for c in grid.cells:
            cells.setdefault(c.run_dir, set()).add(config_hash(c.cfg))
    assert all(len(h) == 1 for h in cells.values())  # a shared run directory has one config
    ablation = load_grid(GRIDS / "guidedmix_ablation_cpu_small.yaml")
    by = {c.method: c.cfg for c in ablation.cells if c.seed == 0}
    assert by["guidedmix_random_pairs+cedice"].method.pairing == "random"
    assert by["guidedmix_no_mitrans+cedice"].model.mitrans is False
    assert by["guidedmix_hard+cedice"].method.decoupling == "hard"
    unmix = by["guidedmix_unmix+cedice"].method
    assert unmix.unmix and unmix.dec_decoupling == "soft" and unmix.decoupling == "soft"
    assert not by["guidedmix+cedice"].method.unmix  # the paper's equations by default
    assert all(cfg.method.dice_weight == 1.0 for cfg in by.values())  # the recipe's labeled loss
    sweep = load_grid(GRIDS / "guidedmix_lambda_sweep_cpu_small.yaml")
    assert sorted({c.cfg.method.lambda_max for c in sweep.cells}) == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_tiny_end_to_end_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from semiseg.cli import main

    sets = tiny_overrides(
        iters=3,
        **{
            "model.name": "guidedmix",
            "model.backbone_widths": "[4, 8, 8, 8]",
            "model.psp_channels": 8,
            "model.decoder_channels": "[8, 8, 8, 4, 4]",
        },
    )
    run = tmp_path / "gm"
    files = ["-c", "protocols/cpu_small", "-c", "datasets/synthetic", "-c", "methods/guidedmix/cpu_small"]
    args = ["train", *files, *[x for s in sets for x in ("--set", s)]]
    code = main([*args, "--run-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    payload = json.loads((run / "results.json").read_text())
    assert payload["steps"] == 3 and payload["results"]["test"]["miou"] is not None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(math.isfinite(r["loss_u"]) and math.isfinite(r["loss_cla"]) for r in train)

    # benchmarks/guidedmix_targets.py reads the finished run back: per-class IoU and shares of the
    # direct prediction and of each decoupled mask's arg-max.
    import importlib.util

    spec = importlib.util.spec_from_file_location("gm_targets", REPO / "benchmarks" / "guidedmix_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    row = module.run_targets(run, [0.25])
    assert row["images"] > 0 and row["labeled_images"] > 0
    assert set(row["masks"]) == {"direct", "soft@0.25", "hard@0.25"}
    for mask in row["masks"].values():
        assert sum(c["share"] for c in mask.values()) == pytest.approx(1.0)
        assert all(c["iou"] is None or 0.0 <= c["iou"] <= 1.0 for c in mask.values())
    assert "| run | mask |" in module.markdown([row], "cmd")


def test_resume_is_exact_with_random_pairs_and_per_sample_lambda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """λ and random pairs come from the CPU RNG the trainer checkpoints: interrupted at step 3 and
    resumed from the step-2 checkpoint == never interrupted (bit-exact)."""
    from semiseg.checkpoint import load_checkpoint
    from semiseg.trainer import Trainer, model_state_from_checkpoint, train

    sets = tiny_overrides(
        iters=4,
        **{
            "model.name": "guidedmix",
            "model.backbone_widths": "[4, 8, 8, 8]",
            "model.psp_channels": 8,
            "model.decoder_channels": "[8, 8, 8, 4, 4]",
            "method.pairing": "random",
            "method.lambda_per_sample": "true",
            "eval.splits": "[]",
        },
    )
    config = GUIDEDMIX_SYNTHETIC
    train(load_config(config, sets), tmp_path / "straight")
    trainer = Trainer(load_config(config, sets), tmp_path / "interrupted")
    fit_interrupted(trainer, monkeypatch, at_step=3)
    train(load_config(config, sets), tmp_path / "interrupted", resume=True)
    a, b = (
        model_state_from_checkpoint(load_checkpoint(tmp_path / d / "latest.pt"))
        for d in ("straight", "interrupted")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
