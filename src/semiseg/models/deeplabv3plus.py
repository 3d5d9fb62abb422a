"""DeepLabV3+ with UniMatch's head on a timm ResNet.

Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation"
(ECCV 2018), as implemented in UniMatch (Yang et al., CVPR 2023, ``model/semseg/deeplabv3plus.py``):

* backbone: a ResNet with dilated last stage(s) (output stride 16 or 8); ``c1`` = layer1 (stride 4),
  ``c4`` = layer4;
* ASPP on ``c4``: a ``1×1`` branch, one ``3×3`` atrous branch per rate (6, 12, 18), an image-pooling
  branch, each conv-BN-ReLU with 256 channels, concatenated and projected by a ``1×1`` conv-BN-ReLU
  to 256 channels. UniMatch's ``ASPPModule`` has no dropout after the projection (torchvision's
  DeepLabV3 has 0.5): ``aspp_dropout`` defaults to 0 to match UniMatch;
* decoder: ``c1`` reduced to 48 channels (``1×1`` conv-BN-ReLU), ASPP output bilinearly up-sampled to
  ``c1``'s size, concatenated, two ``3×3`` conv-BN-ReLU with 256 channels, ``1×1`` classifier,
  bilinear up-sampling (``align_corners=True``) to the input size.

:meth:`DeepLabV3Plus.encode` returns ``[c1, c4]``; UniMatch's feature perturbation is Dropout2d on
both (as the official code does).

Backbone: ``timm.create_model(name, features_only=True, out_indices=(1, 4), output_stride=...)``,
so any timm ResNet name works (``resnet18`` … ``resnet101``; ``resnet101s`` has the same deep stem
``3×3 64-64-128`` as UniMatch's ``deep_base`` ResNet, and its state-dict keys match UniMatch's
``pretrained/resnet101.pth``). ``in_channels != 3`` is handled by timm's ``in_chans``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import Dropout, Segmenter


@dataclass
class TimmBackboneConfig(ModelConfig):
    """Options of a model on a timm ResNet backbone (DeepLabV3+, GuidedMix-Net)."""

    backbone: str = "resnet101"  # a timm ResNet name
    output_stride: int = 16


@dataclass
class DeepLabV3PlusConfig(TimmBackboneConfig):
    """``model`` options of ``name: deeplabv3plus``."""

    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    low_level_channels: int = 48


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1
) -> nn.Sequential:
    """``conv (no bias) → BN → ReLU`` with 'same' padding."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool → ``1×1`` conv-BN-ReLU → broadcast back.

    As in UniMatch/torchvision, its BatchNorm sees one value per channel and sample, so training needs
    a batch of at least two images.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.conv(self.gap(x))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3 §3.3; UniMatch ``ASPPModule``)."""

    def __init__(
        self, in_channels: int, rates: Sequence[int], out_channels: int = 256, dropout: float = 0.0
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_relu(in_channels, out_channels, 1)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, dilation=int(r)) for r in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(len(branches) * out_channels, out_channels, 1)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


def create_timm_backbone(
    name: str, in_channels: int, output_stride: int = 16, pretrained: bool = False
) -> nn.Module:
    """A timm ResNet returning ``[layer1, layer4]`` features (``features_only``, dilated to
    ``output_stride``). ``pretrained=True`` downloads ImageNet weights (needs the network).

    Random init follows UniMatch's ResNet (Kaiming fan-out convs, BatchNorm γ = 1): timm's
    ``zero_init_last`` (γ = 0 on each block's last BN) is switched off for timm ResNets.
    """
    return timm_features(name, in_channels, (1, 4), output_stride, pretrained)


def timm_features(
    name: str,
    in_channels: int,
    out_indices: tuple[int, ...],
    output_stride: int,
    pretrained: bool,
    **extra: object,
) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` returning the ``out_indices`` features;
    timm ResNets are built without ``zero_init_last`` (UniMatch's init). ``extra``: more keyword
    arguments for timm (e.g. ``channels``)."""
    import timm

    kwargs: dict[str, object] = {"zero_init_last": False} if name in timm.list_models(module="resnet") else {}
    kwargs.update(extra)
    return timm.create_model(
        name,
        features_only=True,
        out_indices=out_indices,
        output_stride=output_stride,
        pretrained=pretrained,
        in_chans=in_channels,
        **kwargs,
    )


def backbone_or_config_error(cfg: TimmBackboneConfig, create: Callable[[], nn.Module]) -> nn.Module:
    """``create()`` (a timm backbone of ``cfg.backbone``), with timm and hub errors turned into one-line
    config errors naming ``model.pretrained`` (weights that could not be fetched) or ``model.backbone``."""
    try:
        return create()
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


class DeepLabV3Plus(Segmenter):
    """DeepLabV3+ (UniMatch's head) behind the :class:`Segmenter` interface.

    Args:
        in_channels: input channels (timm adapts the stem).
        num_classes: output classes.
        backbone: a timm ResNet name, or an already built module whose ``forward`` returns
            ``[c1, c4]`` and which has ``feature_info.channels()`` (as timm ``features_only`` models).
        output_stride: 8, 16 or 32 (dilation replaces the strides of the last stages).
        aspp_rates: atrous rates of the ``3×3`` ASPP branches (6, 12, 18 for output stride 16).
        low_level_channels: channels ``c1`` is reduced to (48).
        head_channels: ASPP and fuse channels (256).
        aspp_dropout: dropout after the ASPP projection (UniMatch: 0; torchvision DeepLabV3: 0.5).
        pretrained: ImageNet weights through timm (downloads; never the default).

    The timm backbone is the "backbone" (base lr); ASPP, reduce, fuse and classifier are the "head"
    (lr × lr_multi; UniMatch uses 10 on VOC/Cityscapes).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str | nn.Module = "resnet101",
        output_stride: int = 16,
        aspp_rates: Sequence[int] = (6, 12, 18),
        low_level_channels: int = 48,
        head_channels: int = 256,
        aspp_dropout: float = 0.0,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        if isinstance(backbone, str):
            backbone = create_timm_backbone(backbone, in_channels, output_stride, pretrained)
        self.backbone = backbone
        channels = backbone.feature_info.channels()
        low_channels, high_channels = channels[0], channels[-1]
        self.aspp = ASPP(high_channels, aspp_rates, head_channels, aspp_dropout)
        self.reduce = conv_bn_relu(low_channels, low_level_channels, 1)
        self.fuse = nn.Sequential(
            conv_bn_relu(head_channels + low_level_channels, head_channels, 3),
            conv_bn_relu(head_channels, head_channels, 3),
        )
        self.classifier = nn.Conv2d(head_channels, num_classes, kernel_size=1, bias=True)

    def backbone_module(self) -> nn.Module:
        return self.backbone

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def encode(self, x: Tensor) -> list[Tensor]:
        feats = self.backbone(x)
        return [feats[0], feats[-1]]

    def decode(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        c1, c4 = feats[0], feats[-1]
        c4 = self.aspp(c4)
        c4 = F.interpolate(c4, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        out = self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], dim=1)))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=True)


def build_deeplabv3plus(cfg: DeepLabV3PlusConfig, in_channels: int, num_classes: int) -> DeepLabV3Plus:
    """``model.name: deeplabv3plus`` from a :class:`DeepLabV3PlusConfig` (options validated
    here; timm and hub errors become one-line config errors)."""
    import timm  # slow to import: only when a DeepLabV3+ is built

    if cfg.output_stride not in (8, 16, 32):
        raise ConfigError(f"model.output_stride: must be 8, 16 or 32, got {cfg.output_stride}")
    if not cfg.aspp_rates or any(r < 1 for r in cfg.aspp_rates):
        raise ConfigError(f"model.aspp_rates: need positive dilation rates, got {cfg.aspp_rates}")
    if cfg.low_level_channels < 1:
        raise ConfigError(f"model.low_level_channels: must be >= 1, got {cfg.low_level_channels}")
    if not timm.is_model(cfg.backbone):
        raise ConfigError(f"model.backbone: unknown timm model {cfg.backbone!r} (e.g. resnet50, resnet101)")
    backbone = backbone_or_config_error(
        cfg, lambda: create_timm_backbone(cfg.backbone, in_channels, cfg.output_stride, cfg.pretrained)
    )
    return DeepLabV3Plus(
        in_channels,
        num_classes,
        backbone=backbone,
        output_stride=cfg.output_stride,
        aspp_rates=cfg.aspp_rates,
        low_level_channels=cfg.low_level_channels,
    )


build_deeplabv3plus.Config = DeepLabV3PlusConfig  # type: ignore[attr-defined]  # model.name's schema
