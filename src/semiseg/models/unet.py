"""2-D U-Net of the medical UniMatch / SSL4MIS code bases.

Ronneberger et al., "U-Net: Convolutional Networks for Biomedical Image Segmentation" (MICCAI 2015),
in the variant used by SSL4MIS (``code/networks/unet.py``, Luo et al.) and by UniMatch's medical
experiments (``more-scenarios/medical/model/unet.py``, Yang et al., CVPR 2023):

* every level is two ``3×3 conv → BN → LeakyReLU`` with a (element-wise) dropout between them;
  encoder dropout ``0.05, 0.1, 0.2, 0.3, 0.5`` from the shallowest to the deepest level, none in
  the decoder;
* ``2×2`` max-pooling down; up-sampling by a ``1×1`` convolution then bilinear ×2 interpolation
  (``align_corners=True``) — the official code's path: UniMatch's medical ``Decoder`` never passes
  ``bilinear``, whose default in ``UpBlock`` is ``True`` (``model.upsample: bilinear``, the default);
  ``model.upsample: transpose`` uses a ``2×2`` stride-2 transposed convolution instead (semiseg's
  default of semiseg's first version; the committed paper-recipe tables ran with it). Skip connections by
  concatenation, a ``3×3`` output convolution;
* widths ``16-32-64-128-256`` by default: 1,813,764 parameters (one input channel, 4 classes) with
  the bilinear up-path, the official count.

:meth:`UNet.encode` returns the output of every encoder level (shallow to deep) and
:meth:`UNet.decode` reads all of them, so UniMatch's feature perturbation is Dropout2d on every
encoder level, as in the official medical UniMatch (``more-scenarios/medical/unimatch.py``).

Sizes that are not multiples of ``2**(levels-1)`` work: max-pooling floors, and every up-sampling
produces exactly the size of its skip connection (the transposed convolution's ``output_size``),
so the logits always have the input's size (the bilinear path interpolates to the skip's size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from .base import Dropout, Segmenter


@dataclass
class UNetConfig(ModelConfig):
    """``model`` options of ``name: unet`` (with :class:`~semiseg.config.ModelConfig`'s)."""

    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # one per level
    # encoder dropout per level; null = SSL4MIS/UniMatch's 0.05, 0.1, 0.2, 0.3, 0.5
    dropout: list[float] | None = None
    # up-path: "bilinear" = 1×1 conv + bilinear ×2, the official medical UniMatch / SSL4MIS default;
    # "transpose" = 2×2 stride-2 transposed conv (semiseg's earlier default).
    upsample: Literal["transpose", "bilinear"] = "bilinear"


#: SSL4MIS / UniMatch encoder dropout for the five levels 16-32-64-128-256.
SSL4MIS_DROPOUT: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)


def default_dropout(levels: int) -> list[float]:
    """SSL4MIS's encoder dropout schedule, resampled (linearly in depth) to ``levels`` levels."""
    if levels == len(SSL4MIS_DROPOUT):
        return list(SSL4MIS_DROPOUT)
    if levels == 1:
        return [SSL4MIS_DROPOUT[0]]
    src = np.linspace(0.0, 1.0, len(SSL4MIS_DROPOUT))
    dst = np.linspace(0.0, 1.0, levels)
    return [round(float(v), 4) for v in np.interp(dst, src, SSL4MIS_DROPOUT)]


class ConvBlock(nn.Sequential):
    """``conv3×3 → BN → LeakyReLU → Dropout → conv3×3 → BN → LeakyReLU`` (SSL4MIS ``ConvBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
            Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    """Up-sample the deeper feature to the skip's size, concatenate ``[skip, up]``, ConvBlock.

    ``bilinear=False`` (SSL4MIS's and UniMatch's choice): ``ConvTranspose2d(k=2, s=2)``; when the skip
    has an odd size the transposed convolution is asked for exactly that size (one extra row/column
    that receives only the bias). ``bilinear=True``: ``1×1`` conv then bilinear interpolation.
    """

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int, bilinear: bool = False):
        super().__init__()
        self.bilinear = bilinear
        if bilinear:
            self.up: nn.Module = nn.Conv2d(deep_channels, skip_channels, kernel_size=1)
        else:
            self.up = nn.ConvTranspose2d(deep_channels, skip_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * skip_channels, out_channels, dropout=0.0)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        size = skip.shape[-2:]
        if self.bilinear:
            up = F.interpolate(self.up(deep), size=size, mode="bilinear", align_corners=True)
        else:
            up = self.up(deep, output_size=size)
        return self.conv(torch.cat([skip, up], dim=1))


class UNetEncoder(nn.Module):
    """Contracting path: level 0 is a ConvBlock at full resolution, level ``i > 0`` is
    ``MaxPool2d(2) → ConvBlock``. Returns every level's output, shallow to deep."""

    def __init__(self, in_channels: int, widths: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        levels: list[nn.Module] = [ConvBlock(in_channels, widths[0], dropout[0])]
        for i in range(1, len(widths)):
            levels.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[i - 1], widths[i], dropout[i])))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class UNetDecoder(nn.Module):
    """Expanding path over all encoder levels, then the ``3×3`` output convolution (SSL4MIS)."""

    def __init__(self, widths: Sequence[int], num_classes: int, bilinear: bool = False) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            UpBlock(widths[i], widths[i - 1], widths[i - 1], bilinear) for i in range(len(widths) - 1, 0, -1)
        )
        self.classifier = nn.Conv2d(widths[0], num_classes, kernel_size=3, padding=1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip)
        return self.classifier(x)


class UNet(Segmenter):
    """U-Net (SSL4MIS / UniMatch medical) behind the :class:`Segmenter` interface.

    Args:
        in_channels: input channels (1 for CT/MR slices, 3 for fundus photographs).
        num_classes: output classes (logit channels).
        widths: channels per level, shallow to deep (at least two levels).
        dropout: encoder dropout per level; ``None`` = SSL4MIS's ``0.05…0.5`` (see
            :func:`default_dropout`).
        bilinear: bilinear up-sampling instead of transposed convolutions.

    The encoder is the "backbone" (base lr); decoder and classifier are the "head" (lr × lr_multi).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        dropout: Sequence[float] | None = None,
        bilinear: bool = False,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise ValueError(f"U-Net needs at least two positive widths, got {widths}")
        dropout = default_dropout(len(widths)) if dropout is None else [float(p) for p in dropout]
        if len(dropout) != len(widths):
            raise ValueError(f"U-Net: {len(dropout)} dropout values for {len(widths)} levels")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.widths = widths
        self.encoder = UNetEncoder(in_channels, widths, dropout)
        self.decoder = UNetDecoder(widths, num_classes, bilinear)

    @property
    def min_size(self) -> int:
        """Smallest input side: every level must keep at least one pixel."""
        return 2 ** (len(self.widths) - 1)

    def backbone_module(self) -> nn.Module:
        return self.encoder

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def encode(self, x: Tensor) -> list[Tensor]:
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"U-Net with {len(self.widths)} levels needs inputs of at least "
                f"{self.min_size}×{self.min_size}, got {tuple(x.shape[-2:])}"
            )
        return self.encoder(x)

    def decode(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        logits = self.decoder(feats)
        if tuple(logits.shape[-2:]) != tuple(size):  # only when decode is handed foreign features
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def build_unet(cfg: UNetConfig, in_channels: int, num_classes: int) -> UNet:
    """``model.name: unet`` from a :class:`UNetConfig` (options validated here)."""
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


build_unet.Config = UNetConfig  # type: ignore[attr-defined]  # the schema of model.name: unet
