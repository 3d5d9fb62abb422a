"""Segmentation networks: U-Net (SSL4MIS / UniMatch medical), DeepLabV3+ (UniMatch head, timm ResNet),
the Segmenter interface (encode/decode, feature perturbation, features), parameter groups, the
registry and local backbone weights. Tiny models (U-Net 4-8-16-32-64, ResNet-18 at 64²) keep it fast."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODELS, tiny_model, tiny_unet

from semiseg.config import MODEL_CONFIGS, ModelConfig, build_config
from semiseg.errors import ConfigError
from semiseg.models import Segmenter, SegOutput, build_model
from semiseg.models.deeplabv3plus import DeepLabV3Plus, DeepLabV3PlusConfig, TimmBackboneConfig
from semiseg.models.guidedmix import GuidedMixConfig
from semiseg.models.unet import SSL4MIS_DROPOUT, UNet, UNetConfig, default_dropout
from semiseg.models.weights import load_backbone_weights

TINY_WIDTHS = TINY_MODELS["unet"]["widths"]


def tiny_deeplab(in_channels: int = 3, num_classes: int = 3, **kw) -> Segmenter:
    """DeepLabV3+ on timm's ResNet-18 (random init)."""
    return tiny_model("deeplabv3plus", in_channels, num_classes, **kw)


BUILDERS = {"unet": tiny_unet, "deeplabv3plus": tiny_deeplab}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request) -> Segmenter:
    torch.manual_seed(0)
    return BUILDERS[request.param]()


# ----------------------------------------------------------------------------------------------
# Shapes and the encode/decode interface
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(64, 64), (33, 47), (65, 63), (50, 97)])
def test_output_has_input_size(model: Segmenter, size: tuple[int, int]) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 3, *size)


def test_unet_encode_returns_every_level() -> None:
    m = tiny_unet().eval()
    x = torch.randn(2, 3, 37, 45)
    feats = m.encode(x)
    assert [f.shape[1] for f in feats] == TINY_WIDTHS
    h, w = 37, 45
    for f in feats:
        assert f.shape[-2:] == (h, w)
        h, w = h // 2, w // 2
    with torch.no_grad():
        assert torch.equal(m.decode(feats, (37, 45)), m(x))


def test_deeplab_encode_returns_layer1_and_layer4() -> None:
    m = tiny_deeplab().eval()
    x = torch.randn(2, 3, 64, 64)
    c1, c4 = m.encode(x)
    assert c1.shape == (2, 64, 16, 16)  # ResNet-18 layer1, stride 4
    assert c4.shape == (2, 512, 4, 4)  # layer4, output stride 16
    with torch.no_grad():
        assert torch.equal(m.decode([c1, c4], (64, 64)), m(x))


def test_deeplab_output_stride_8() -> None:
    m = tiny_deeplab(output_stride=8).eval()
    assert m.encode(torch.randn(2, 3, 64, 64))[1].shape[-2:] == (8, 8)


def test_unet_too_small_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        tiny_unet()(torch.randn(1, 3, 12, 40))


def test_wrong_channel_count_is_a_clear_error(model: Segmenter) -> None:
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_one_input_channel(name: str) -> None:
    m = BUILDERS[name](in_channels=1, num_classes=2).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 41, 39)).shape == (2, 2, 41, 39)


# ----------------------------------------------------------------------------------------------
# Feature perturbation (UniMatch) and returned features
# ----------------------------------------------------------------------------------------------


def test_fp_logits_only_for_the_tail_and_clean_logits_match(model: Segmenter) -> None:
    model.eval()  # BN with running statistics: every sample independent of the rest of the batch
    x = torch.randn(4, 3, 40, 36)
    torch.manual_seed(1)
    with torch.no_grad():
        plain = model(x)
        out = model(x, fp_from=2)
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (4, 3, 40, 36)
    assert out.logits_fp is not None and out.logits_fp.shape == (2, 3, 40, 36)
    assert out.features is None
    torch.testing.assert_close(out.logits, plain, rtol=1e-4, atol=1e-5)
    # perturb() drops channels even in eval mode (training=True explicitly)
    assert not torch.allclose(out.logits_fp, out.logits[2:], atol=1e-4)


def test_fp_from_zero_perturbs_everything(model: Segmenter) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), fp_from=0)
    assert out.logits_fp.shape == out.logits.shape


def test_fp_dropout_zero_is_identity(model: Segmenter) -> None:
    model.eval()
    old = model.fp_dropout
    model.fp_dropout = 0.0
    try:
        with torch.no_grad():
            out = model(torch.randn(3, 3, 32, 32), fp_from=1)
        torch.testing.assert_close(out.logits_fp, out.logits[1:], rtol=1e-4, atol=1e-5)
    finally:
        model.fp_dropout = old


def test_return_features(model: Segmenter) -> None:
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, return_features=True)
        ref_feats = model.encode(x)
        out_fp = model(x, fp_from=1, return_features=True)
    assert isinstance(out, SegOutput) and out.logits_fp is None
    assert len(out.features) == len(ref_feats)
    for f, g in zip(out.features, ref_feats):
        torch.testing.assert_close(f, g)
    assert out_fp.features is not None and out_fp.features[0].shape[0] == 2  # clean features, whole batch


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_gradient_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    m = BUILDERS[name]().train()
    x = torch.randn(3, 3, 32, 32)
    y = torch.randint(0, 3, (3, 32, 32))
    out = m(x, fp_from=1)
    loss = F.cross_entropy(out.logits, y) + F.cross_entropy(out.logits_fp, y[1:])
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    # every weight tensor gets a signal (biases right before a BatchNorm legitimately get ~0)
    zero = [n for n, p in m.named_parameters() if p.ndim > 1 and p.grad.abs().sum() == 0]
    assert not zero, zero


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------


def test_backbone_and_head_split_all_parameters(model: Segmenter) -> None:
    backbone = {id(p) for p in model.backbone_parameters()}
    everything = {id(p) for p in model.parameters()}
    head = everything - backbone
    assert backbone and head
    assert backbone <= everything
    assert len(backbone) == len(model.backbone_parameters())  # no duplicates
    if isinstance(model, UNet):
        assert backbone == {id(p) for p in model.encoder.parameters()}
        assert head == {id(p) for p in model.decoder.parameters()}
    else:
        assert isinstance(model, DeepLabV3Plus)
        assert backbone == {id(p) for p in model.backbone.parameters()}
        assert {id(p) for p in model.classifier.parameters()} <= head
        assert {id(p) for p in model.aspp.parameters()} <= head


# ----------------------------------------------------------------------------------------------
# U-Net architecture (SSL4MIS / UniMatch medical)
# ----------------------------------------------------------------------------------------------


def test_default_unet_size_matches_unimatch_medical() -> None:
    # UniMatch's medical U-Net as its Decoder builds it (UpBlock's default bilinear=True: 1×1 conv +
    # bilinear up-sampling): 1,813,764 params for 1 channel, 4 classes — semiseg's default
    m = build_model(UNetConfig(), 1, 4)
    assert isinstance(m, UNet)
    assert m.widths == [16, 32, 64, 128, 256]
    assert n_params(m) == 1_813_764
    # the transposed-convolution up-path semiseg used before (and the committed paper-recipe tables)
    assert n_params(build_model(UNetConfig(upsample="transpose"), 1, 4)) == 1_944_324


def test_unet_dropout_schedule() -> None:
    assert default_dropout(5) == list(SSL4MIS_DROPOUT)
    d = default_dropout(4)
    assert d[0] == SSL4MIS_DROPOUT[0] and d[-1] == SSL4MIS_DROPOUT[-1] and d == sorted(d)
    m = UNet(3, 2, widths=[8, 16, 32])
    assert [lvl.__class__.__name__ for lvl in m.encoder.levels] == ["ConvBlock", "Sequential", "Sequential"]


def test_unet_bilinear_variant_keeps_sizes() -> None:
    m = UNet(3, 2, widths=[4, 8, 16], bilinear=True).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 23, 17)).shape == (1, 2, 23, 17)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_registry_sets_fp_dropout_and_dispatches() -> None:
    m = build_model(UNetConfig(widths=[4, 8], fp_dropout=0.3), 3, 2)
    assert isinstance(m, UNet) and m.fp_dropout == 0.3
    d = tiny_deeplab(fp_dropout=0.2)
    assert isinstance(d, DeepLabV3Plus) and d.fp_dropout == 0.2


def test_registry_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match=r"^model\.name: .*'segformer'"):
        build_model(ModelConfig(name="segformer"), 3, 2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^model\.backbone: .*'resnet_nope'"):
        build_model(DeepLabV3PlusConfig(name="deeplabv3plus", backbone="resnet_nope"), 3, 2)


def test_each_model_owns_its_config_section() -> None:
    """``model`` is validated against the chosen model's ``Config``; the options every model has
    (name, weights, feature perturbation) live in the shared base."""
    assert MODEL_CONFIGS["unet"] is UNetConfig and MODEL_CONFIGS["deeplabv3plus"] is DeepLabV3PlusConfig
    assert MODEL_CONFIGS["guidedmix"] is GuidedMixConfig and issubclass(GuidedMixConfig, TimmBackboneConfig)
    shared = {"name", "pretrained", "weights", "fp_dropout"}
    for cls in (UNetConfig, DeepLabV3PlusConfig, GuidedMixConfig):
        assert issubclass(cls, ModelConfig) and shared <= {f.name for f in cls.__dataclass_fields__.values()}
    assert not hasattr(UNetConfig(), "backbone") and not hasattr(DeepLabV3PlusConfig(), "psp_bins")
    cfg = build_config({"model": {"name": "guidedmix", "psp_channels": 8}})
    assert isinstance(cfg.model, GuidedMixConfig) and cfg.model.psp_channels == 8
    assert isinstance(build_config({}).model, UNetConfig)
    with pytest.raises(ConfigError, match=r"^model\.psp_bins: unknown config key"):
        build_config({"model": {"name": "unet", "psp_bins": [1, 2]}})
    with pytest.raises(ConfigError, match=r"^model\.widths: unknown config key"):
        build_config({"model": {"name": "deeplabv3plus", "widths": [4, 8]}})


def test_model_config_by_name_builds_the_models_own_class() -> None:
    """``ModelConfig(name=..., **options)`` (the flat class's call of schema version 2) builds the
    named model's class; the base alone builds the model with its defaults."""
    deeplab = ModelConfig(name="deeplabv3plus", backbone="resnet18")
    assert type(deeplab) is DeepLabV3PlusConfig and deeplab.backbone == "resnet18"
    assert type(ModelConfig(widths=[4, 8])) is UNetConfig
    with pytest.raises(TypeError):
        ModelConfig(name="unet", psp_bins=[1])
    assert type(ModelConfig()) is ModelConfig
    assert isinstance(build_model(ModelConfig(), 1, 2), UNet)


def test_registry_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.output_stride"):
        tiny_deeplab(output_stride=4)
    with pytest.raises(ConfigError, match="model.widths"):
        build_model(UNetConfig(widths=[16]), 3, 2)
    with pytest.raises(ConfigError, match="model.fp_dropout"):
        build_model(UNetConfig(widths=[4, 8], fp_dropout=1.0), 3, 2)
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_model(UNetConfig(widths=[4, 8], pretrained=True), 3, 2)  # no ImageNet U-Net
    with pytest.raises(ConfigError, match="either model.pretrained or model.weights"):
        tiny_deeplab(pretrained=True, weights=str(tmp_path / "w.pth"))


def test_pretrained_download_failure_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Never downloads: simulate an offline timm.
    import semiseg.models.deeplabv3plus as dl

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(dl, "create_timm_backbone", offline)
    with pytest.raises(ConfigError, match=r"^model\.pretrained: .*model\.weights.*unreachable"):
        tiny_deeplab(pretrained=True)


# ----------------------------------------------------------------------------------------------
# Local backbone weights
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet_like() -> dict[str, torch.Tensor]:
    """A ResNet-18 classification state dict (random values), as an ImageNet file would hold it."""
    import timm

    torch.manual_seed(3)
    net = timm.create_model("resnet18", pretrained=False)
    for t in net.state_dict().values():  # make BN statistics distinguishable from a fresh model's
        if t.is_floating_point():
            t.add_(torch.rand_like(t))
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def imagenet_file(imagenet_like: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18_imagenet.pth"
    torch.save(imagenet_like, path)
    return path


def assert_backbone_equals(model: DeepLabV3Plus, state: dict[str, torch.Tensor]) -> None:
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_weights_round_trip_drops_fc_and_reports(
    imagenet_file: Path, imagenet_like: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="semiseg.models.weights"):
        m = tiny_deeplab(weights=str(imagenet_file))
    assert_backbone_equals(m, imagenet_like)
    assert "dropped 2 classifier keys" in caplog.text and "fc.weight" in caplog.text


def test_weights_unwraps_state_dict_and_module_prefix(tmp_path: Path, imagenet_like: dict) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in imagenet_like.items()}}, path)
    assert_backbone_equals(tiny_deeplab(weights=str(path)), imagenet_like)


def test_weights_from_whole_segmenter_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    src = tiny_deeplab()
    path = tmp_path / "run_ckpt.pth"
    torch.save({"model": src.state_dict(), "iter": 10}, path)  # semiseg / UniMatch checkpoint layout
    with caplog.at_level(logging.INFO, logger="semiseg.models.weights"):
        m = tiny_deeplab(weights=str(path))
    assert_backbone_equals(m, src.backbone.state_dict())
    assert "head keys" in caplog.text


def test_weights_safetensors(tmp_path: Path, imagenet_like: dict) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in imagenet_like.items()}, str(path))
    assert_backbone_equals(tiny_deeplab(weights=str(path)), imagenet_like)


def test_weights_adapted_to_one_input_channel(imagenet_file: Path, imagenet_like: dict) -> None:
    m = tiny_deeplab(in_channels=1, weights=str(imagenet_file))
    torch.testing.assert_close(m.backbone.conv1.weight, imagenet_like["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(m.backbone.layer1[0].conv1.weight, imagenet_like["layer1.0.conv1.weight"])


@pytest.mark.parametrize("edit", ["extra", "missing"])
def test_weights_key_mismatch_names_the_file(tmp_path: Path, imagenet_like: dict, edit: str) -> None:
    state = dict(imagenet_like)
    if edit == "extra":
        state["layer5.0.conv1.weight"] = torch.zeros(1)
        expected = r"1 unexpected keys \(layer5\.0\.conv1\.weight\)"
    else:
        del state["layer2.1.bn2.running_var"]
        expected = r"1 missing keys \(layer2\.1\.bn2\.running_var\)"
    path = tmp_path / f"{edit}.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=expected) as info:
        tiny_deeplab(weights=str(path))
    msg = str(info.value)
    assert msg.startswith(f"model.weights: {path}: ") and "\n" not in msg


def test_weights_wrong_architecture_lists_first_keys(tmp_path: Path) -> None:
    import timm

    path = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34").state_dict(), path)
    with pytest.raises(ConfigError, match=r"unexpected keys \(layer1\.2\..*…") as info:
        tiny_deeplab(weights=str(path))
    assert str(path) in str(info.value)


def test_weights_shape_mismatch_names_the_key(tmp_path: Path, imagenet_like: dict) -> None:
    state = dict(imagenet_like)
    state["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"shape mismatch for 'layer3\.0\.conv2\.weight'"):
        tiny_deeplab(weights=str(path))


def test_weights_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=f"^model.weights: {missing}: file not found$"):
        tiny_deeplab(weights=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        tiny_deeplab(weights=str(garbage))
    not_a_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(ConfigError, match="not a state dict"):
        tiny_deeplab(weights=str(not_a_state))


def test_unet_encoder_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(7)
    src = tiny_unet()
    path = tmp_path / "unet_encoder.pth"
    torch.save(src.encoder.state_dict(), path)
    m = tiny_unet(weights=str(path))
    for k, v in m.encoder.state_dict().items():
        assert torch.equal(v, src.encoder.state_dict()[k]), k
    # the decoder is not touched
    assert not torch.equal(m.decoder.classifier.weight, src.decoder.classifier.weight)


def test_load_backbone_weights_returns_a_report(imagenet_file: Path) -> None:
    m = tiny_deeplab()
    report = load_backbone_weights(m.backbone, imagenet_file)
    assert report.dropped_classifier == ["fc.weight", "fc.bias"]
    assert report.loaded == len(m.backbone.state_dict())
    assert report.adapted == [] and report.dropped_non_backbone == []


def test_dropout_mask_does_not_depend_on_memory_format():
    from semiseg.models.base import Dropout

    drop = Dropout(0.3).train()
    x = torch.randn(2, 5, 6, 7)
    torch.manual_seed(0)
    native = torch.nn.functional.dropout(x, 0.3, True)
    torch.manual_seed(0)
    assert torch.equal(drop(x), native)  # contiguous: the native path, bit for bit
    torch.manual_seed(0)
    nhwc = drop(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(nhwc, native) and nhwc.is_contiguous(memory_format=torch.channels_last)
