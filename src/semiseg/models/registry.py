"""Names → segmentation networks: :func:`build_model` turns a :class:`~semiseg.config.ModelConfig`
into a :class:`~semiseg.models.base.Segmenter` (weights loaded, feature-perturbation rate set)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import Segmenter
from .weights import load_backbone_weights


def _build_unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> Segmenter:
    from .unet import UNet

    if cfg.pretrained:
        raise ConfigError(
            "model.pretrained: the U-Net has no ImageNet weights; train from scratch or set model.weights "
            "to a saved encoder"
        )
    if len(cfg.widths) < 2 or any(w < 1 for w in cfg.widths):
        raise ConfigError(f"model.widths: need at least two positive widths, got {cfg.widths}")
    if cfg.dropout is not None and len(cfg.dropout) != len(cfg.widths):
        raise ConfigError(f"model.dropout: {len(cfg.dropout)} values for {len(cfg.widths)} U-Net levels")
    return UNet(
        in_channels, num_classes, widths=cfg.widths, dropout=cfg.dropout, bilinear=cfg.upsample == "bilinear"
    )


def _build_deeplabv3plus(cfg: ModelConfig, in_channels: int, num_classes: int) -> Segmenter:
    import timm

    from .deeplabv3plus import DeepLabV3Plus, create_timm_backbone

    if cfg.output_stride not in (8, 16, 32):
        raise ConfigError(f"model.output_stride: must be 8, 16 or 32, got {cfg.output_stride}")
    if not cfg.aspp_rates or any(r < 1 for r in cfg.aspp_rates):
        raise ConfigError(f"model.aspp_rates: need positive dilation rates, got {cfg.aspp_rates}")
    if cfg.low_level_channels < 1:
        raise ConfigError(f"model.low_level_channels: must be >= 1, got {cfg.low_level_channels}")
    if not timm.is_model(cfg.backbone):
        raise ConfigError(f"model.backbone: unknown timm model {cfg.backbone!r} (e.g. resnet50, resnet101)")
    try:
        backbone = create_timm_backbone(cfg.backbone, in_channels, cfg.output_stride, cfg.pretrained)
    except Exception as exc:  # noqa: BLE001 - timm/hub errors become one-line config errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if cfg.pretrained:
            raise ConfigError(
                f"model.pretrained: could not get ImageNet weights for {cfg.backbone!r} through timm "
                f"(needs the network; offline, download them elsewhere and set model.weights): {first}"
            ) from exc
        raise ConfigError(
            f"model.backbone: cannot build {cfg.backbone!r} as a feature backbone: {first}"
        ) from exc
    return DeepLabV3Plus(
        in_channels,
        num_classes,
        backbone=backbone,
        output_stride=cfg.output_stride,
        aspp_rates=cfg.aspp_rates,
        low_level_channels=cfg.low_level_channels,
    )


def _build_guidedmix(cfg: ModelConfig, in_channels: int, num_classes: int) -> Segmenter:
    from .guidedmix import build_guidedmix  # GuidedMix-Net's network; options validated there

    return build_guidedmix(cfg, in_channels, num_classes)


#: Model name → builder ``(cfg, in_channels, num_classes) -> Segmenter``.
MODELS: dict[str, Callable[[ModelConfig, int, int], Segmenter]] = {
    "unet": _build_unet,
    "deeplabv3plus": _build_deeplabv3plus,
    "guidedmix": _build_guidedmix,
}


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> Segmenter:
    """Build the segmenter named by ``cfg.name``, load ``cfg.weights`` into its backbone, set
    ``fp_dropout``.

    Raises:
        ConfigError: unknown ``model.name``, invalid option, unreadable or mismatching weights file.
    """
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r} (known: {', '.join(sorted(MODELS))})")
    if not 0.0 <= cfg.fp_dropout < 1.0:
        raise ConfigError(f"model.fp_dropout: must be in [0, 1), got {cfg.fp_dropout}")
    if cfg.pretrained and cfg.weights:
        raise ConfigError("model.weights: set either model.pretrained or model.weights, not both")
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(
            f"model: need in_channels >= 1 and num_classes >= 1, got {in_channels}, {num_classes}"
        )
    model = MODELS[cfg.name](cfg, in_channels, num_classes)
    if cfg.weights:
        load_backbone_weights(backbone_module(model), cfg.weights)
    model.fp_dropout = cfg.fp_dropout
    return model


def backbone_module(model: Segmenter) -> nn.Module:
    """The sub-module whose parameters :meth:`Segmenter.backbone_parameters` returns."""
    get = getattr(model, "backbone_module", None)
    if callable(get):
        return get()
    raise TypeError(f"{type(model).__name__} has no backbone_module()")
