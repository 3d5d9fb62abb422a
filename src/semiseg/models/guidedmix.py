"""GuidedMix-Net's segmentation network (Tu et al., "GuidedMix-Net: Learning to Improve Pseudo Masks
Using Labeled Images as Reference", §3.2 and §4.2) behind the :class:`Segmenter` interface.

* **Encoder** ``Γ_enc``: a timm ResNet (``features_only``, the stem and the four stages, strides
  2, 4, 8, 16, 32 at ``output_stride`` 32) followed by the **PSP module** (Zhao et al., PSPNet):
  adaptive average pooling to ``b×b`` for every bin ``b`` (1, 2, 3, 6), a ``1×1`` conv-BN-ReLU to
  ``C/len(bins)`` channels per bin, bilinear up-sampling, concatenation with the input and a
  ``3×3`` conv-BN-ReLU to ``psp_channels``. :meth:`GuidedMixNet.encode` returns
  ``[stem, layer1, layer2, layer3, psp(layer4)]``, shallow to deep.
* **Decoder**, U-Net style (paper §4.2): one block per encoder level, from the deepest. Block ``j``
  takes ``v_j`` (the PSP output or the previous block's output) and the skip ``v_{j−1}`` whose
  spatial size is ``s`` times larger (``s = 2``; ``1`` where a dilated stage keeps the size)::

      up_j  = PixelShuffle_s(conv3×3-BN-ReLU(v_j) → s²·c_j channels)       (Shi et al. 2016)
      out_j = conv3×3-BN-ReLU(conv3×3-BN-ReLU(cat(up_j, v_{j−1})))       (c_j channels)

  The last block has no skip and restores the input resolution. Any size mismatch (odd input
  sizes) is resolved by bilinear resizing to the skip's size.
* **MITrans** (eq. 4–5, Fig. 4) at the decoder levels ``mitrans_levels`` (0 = the deepest block): a
  non-local block on ``v_j`` before the block's up-sampling and fusion::

      Q = W_q v_j,  K = W_k v_j         (1×1 convs, C/2 channels)
      A = softmax_m(Q_nᵀ K_m)           (affinity of every position n to all positions m; the
                                         softmax is the normalisation 1/C(x) of eq. 5)
      V = W_v v_j                        (1×1 conv, C channels)
      v'_{j,n} = Σ_m A_{nm} V_m + v_{j,n}                                          (eq. 5)

  then the "convs + PixelShuffle fusing the low-level features" are the block above.
  ``mitrans_zero_init`` zero-initialises ``W_v`` so that the block starts as the identity (the
  non-local networks' initialisation; the paper is silent, default off).
* **Image-level classifier** (§3.1.1, ``L_cla`` of eq. 11): a fully connected layer on the global
  average pooled encoder output (the PSP features). Its logits come back with
  ``forward(x, return_features=True)`` as :attr:`GuidedMixOutput.image_logits` (computed inside
  ``forward``, so DDP synchronises its gradients) and from :meth:`GuidedMixNet.classify`. In
  training, the classifier's parameters are tied into the logits with weight 0, so that methods
  that never use it still give every parameter a gradient (DDP without ``find_unused_parameters``).

``forward(x)`` returns the segmentation logits; ``fp_from`` (UniMatch's feature perturbation) and
``return_features`` behave as for every other model. The timm backbone is the "backbone" (base lr);
PSP, decoder, MITrans and both classifiers are the "head" (lr × ``lr_multi``).

``backbone_widths`` replaces the four stage widths of a timm ResNet (``channels=``): the cpu-small
variant is ``resnet18`` with widths 16-32-64-128 (≈ U-Net sized), the paper's is ``resnet101``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .base import Segmenter, SegOutput
from .deeplabv3plus import TimmBackboneConfig, backbone_or_config_error, conv_bn_relu, timm_features


@dataclass
class GuidedMixConfig(TimmBackboneConfig):
    """``model`` options of ``name: guidedmix`` (module docstring)."""

    backbone_widths: list[int] | None = None  # the four ResNet stage widths; null: the backbone's own
    psp_bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    psp_channels: int = 512
    # one per decoder block, deepest first
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    mitrans: bool = True  # false: no MITrans block
    mitrans_levels: list[int] = field(default_factory=lambda: [0, 1])
    mitrans_zero_init: bool = False  # V = 0: identity at start


#: timm ``features_only`` indices: the stem and the four ResNet stages.
OUT_INDICES: tuple[int, ...] = (0, 1, 2, 3, 4)


@dataclass
class GuidedMixOutput(SegOutput):
    """:class:`SegOutput` plus the image-level multi-label logits (N×C) of the classifier."""

    image_logits: Tensor | None = None


class PyramidPooling(nn.Module):
    """PSP module (Zhao et al., CVPR 2017): pyramid of pooled context concatenated with the input.

    Its BatchNorm in the 1×1 bin sees one value per channel and sample, so training needs a batch of
    at least two images (as DeepLabV3+'s image-pooling branch).
    """

    def __init__(self, in_channels: int, bins: Sequence[int], out_channels: int) -> None:
        super().__init__()
        branch = max(1, in_channels // len(bins))
        self.bins = [int(b) for b in bins]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, branch, 1)) for b in self.bins
        )
        self.bottleneck = conv_bn_relu(in_channels + len(self.bins) * branch, out_channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pyramid = [F.interpolate(s(x), size=size, mode="bilinear", align_corners=False) for s in self.stages]
        return self.bottleneck(torch.cat([x, *pyramid], dim=1))


class NonLocalTransfer(nn.Module):
    """MITrans's non-local block (paper eq. 5): ``v' = softmax(QᵀK)·V + v``.

    ``Q``, ``K``: 1×1 convs to ``max(1, C/2)`` channels; ``V``: 1×1 conv keeping ``C``; the affinity
    of each position to every position is normalised by a softmax over the positions attended to.
    ``zero_init`` zero-initialises ``V`` (then the block is exactly the identity).
    """

    def __init__(self, channels: int, zero_init: bool = False) -> None:
        super().__init__()
        inner = max(1, channels // 2)
        self.query = nn.Conv2d(channels, inner, kernel_size=1)
        self.key = nn.Conv2d(channels, inner, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        if zero_init:
            nn.init.zeros_(self.value.weight)
            nn.init.zeros_(self.value.bias)

    def affinity(self, x: Tensor) -> Tensor:
        """``A`` (N × HW × HW): row ``n`` is the softmax over ``m`` of ``Q_n·K_m``."""
        q = self.query(x).flatten(2).transpose(1, 2)  # N × HW × C/2
        k = self.key(x).flatten(2)  # N × C/2 × HW
        return torch.bmm(q, k).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        v = self.value(x).flatten(2).transpose(1, 2)  # N × HW × C
        out = torch.bmm(self.affinity(x), v).transpose(1, 2).reshape(n, c, h, w)
        return out + x


class DecoderBlock(nn.Module):
    """U-Net decoder block with PixelShuffle up-sampling (module docstring); ``skip_channels = 0``
    for the last block (no skip). :class:`MITrans` adds the non-local block in front."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        if scale < 1:
            raise ValueError(f"decoder up-sampling factor must be >= 1, got {scale}")
        self.attention: NonLocalTransfer | None = None
        self.up = nn.Sequential(
            conv_bn_relu(in_channels, out_channels * scale * scale, 3), nn.PixelShuffle(scale)
        )
        self.fuse = nn.Sequential(
            conv_bn_relu(out_channels + skip_channels, out_channels, 3),
            conv_bn_relu(out_channels, out_channels, 3),
        )

    def forward(self, x: Tensor, skip: Tensor | None, size: tuple[int, int] | None = None) -> Tensor:
        """Up-sample ``x`` to the size of ``skip`` (or ``size`` for the last block), fuse."""
        if self.attention is not None:
            x = self.attention(x)
        x = self.up(x)
        target = tuple(skip.shape[-2:]) if skip is not None else size
        if target is not None and tuple(x.shape[-2:]) != tuple(target):
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.fuse(x)


class MITrans(DecoderBlock):
    """Mutual information transfer (paper §3.2, Fig. 4): non-local block on ``v_j`` (eq. 5), then
    convs + PixelShuffle fusing the low-level feature ``v_{j−1}``."""

    def __init__(
        self, in_channels: int, skip_channels: int, out_channels: int, scale: int, zero_init: bool = False
    ) -> None:
        super().__init__(in_channels, skip_channels, out_channels, scale)
        self.attention = NonLocalTransfer(in_channels, zero_init)


def create_resnet_encoder(
    name: str,
    in_channels: int,
    output_stride: int = 32,
    pretrained: bool = False,
    widths: Sequence[int] | None = None,
) -> nn.Module:
    """A timm backbone returning the stem and the four stage outputs (``features_only``).

    ``widths`` overrides a timm ResNet's four stage widths (random init only). timm ResNets are
    built without ``zero_init_last`` (as :func:`~semiseg.models.deeplabv3plus.create_timm_backbone`).
    """
    extra = {} if widths is None else {"channels": tuple(int(w) for w in widths)}
    return timm_features(name, in_channels, OUT_INDICES, output_stride, pretrained, **extra)


class GuidedMixNet(Segmenter):
    """GuidedMix-Net's network (module docstring).

    Args:
        in_channels: input channels (timm adapts the stem).
        num_classes: segmentation classes (also the classifier's labels).
        backbone: a timm model name (a ResNet) or a built module returning five features with
            ``feature_info.channels()`` / ``feature_info.reduction()`` (as timm ``features_only``).
        backbone_widths: the four ResNet stage widths (``None``: the model's own).
        output_stride: 8, 16 or 32 (32: no dilation, every decoder block doubles the size).
        psp_bins: PSP pooling sizes.
        psp_channels: PSP output channels (the classifier's and pairing's feature size).
        decoder_channels: output channels of each decoder block, deepest first (one per level).
        mitrans_levels: decoder blocks (0 = deepest) that are :class:`MITrans` blocks.
        mitrans_zero_init: zero-initialise MITrans's ``V`` (identity at start).
        pretrained: ImageNet weights through timm (downloads; never the default).

    ``channels_last_safe = False``: with torch 2.14.1+cu130 on CPU a GuidedMix training step in
    channels-last memory aborts the process in backward ("corrupted double-linked list", heap
    corruption inside torch; the forward and backward of the network alone do not, the full method
    step does), so ``train.channels_last`` keeps this network contiguous (rounding-level only).
    """

    channels_last_safe = False

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        backbone: str | nn.Module = "resnet101",
        backbone_widths: Sequence[int] | None = None,
        output_stride: int = 32,
        psp_bins: Sequence[int] = (1, 2, 3, 6),
        psp_channels: int = 512,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        mitrans_levels: Sequence[int] = (0, 1),
        mitrans_zero_init: bool = False,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        if isinstance(backbone, str):
            backbone = create_resnet_encoder(
                backbone, in_channels, output_stride, pretrained, backbone_widths
            )
        self.backbone = backbone
        channels = list(backbone.feature_info.channels())
        reductions = list(backbone.feature_info.reduction())
        levels = len(channels)
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != levels:
            raise ValueError(
                f"decoder_channels: need {levels} values (one per encoder level), got {decoder_channels}"
            )
        bad = [j for j in mitrans_levels if not 0 <= j < levels]
        if bad:
            raise ValueError(
                f"mitrans_levels: decoder levels are 0..{levels - 1}, got {list(mitrans_levels)}"
            )
        self.mitrans_levels = sorted({int(j) for j in mitrans_levels})
        self.psp = PyramidPooling(channels[-1], psp_bins, psp_channels)
        blocks: list[nn.Module] = []
        in_ch = psp_channels
        for j in range(levels):
            last = j == levels - 1
            skip = 0 if last else channels[-2 - j]
            scale = reductions[0] if last else reductions[-1 - j] // reductions[-2 - j]
            if j in self.mitrans_levels:
                blocks.append(MITrans(in_ch, skip, decoder_channels[j], scale, mitrans_zero_init))
            else:
                blocks.append(DecoderBlock(in_ch, skip, decoder_channels[j], scale))
            in_ch = decoder_channels[j]
        self.decoder = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(in_ch, num_classes, kernel_size=1)
        self.image_classifier = nn.Linear(psp_channels, num_classes)

    def backbone_module(self) -> nn.Module:
        return self.backbone

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def encode(self, x: Tensor) -> list[Tensor]:
        feats = list(self.backbone(x))
        return [*feats[:-1], self.psp(feats[-1])]

    def decode(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        x = feats[-1]
        skips = list(reversed(feats[:-1]))  # deepest skip first
        for j, block in enumerate(self.decoder):
            skip = skips[j] if j < len(skips) else None
            x = block(x, skip, size)
        logits = self.classifier(x)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    @staticmethod
    def pooled(feats: list[Tensor]) -> Tensor:
        """Global average pooled encoder output (N × psp_channels): the classifier's input."""
        return F.adaptive_avg_pool2d(feats[-1], 1).flatten(1)

    def classify(self, feats: list[Tensor]) -> Tensor:
        """Image-level multi-label logits (N × num_classes) from :meth:`encode`'s features."""
        return self.image_classifier(self.pooled(feats))

    def forward(
        self, x: Tensor, fp_from: int | None = None, return_features: bool = False
    ) -> Tensor | SegOutput:
        out = super().forward(x, fp_from=fp_from, return_features=return_features)
        if self.training and torch.is_grad_enabled():
            out = self._tie_classifier(out)
        if not return_features:
            return out
        assert isinstance(out, SegOutput) and out.features is not None
        return GuidedMixOutput(out.logits, out.logits_fp, out.features, self.classify(out.features))

    def _tie_classifier(self, out: Tensor | SegOutput) -> Tensor | SegOutput:
        """Add ``0·Σ θ_cla`` to the logits: the image-level classifier's parameters then receive a (zero)
        gradient from every loss, so DistributedDataParallel (``find_unused_parameters=False``) accepts
        methods that never use the classifier (supervised on this network, ``cla_weight: 0``). The
        logits' values are unchanged."""
        tie = sum(p.sum() for p in self.image_classifier.parameters()) * 0.0
        if isinstance(out, Tensor):
            return out + tie
        return SegOutput(out.logits + tie, out.logits_fp, out.features)


def build_guidedmix(cfg: GuidedMixConfig, in_channels: int, num_classes: int) -> GuidedMixNet:
    """``model.name: guidedmix`` from a :class:`GuidedMixConfig` (options validated here,
    each error naming its ``model.<key>``)."""
    import timm  # slow to import: only when the network is built

    if cfg.output_stride not in (8, 16, 32):
        raise ConfigError(f"model.output_stride: must be 8, 16 or 32, got {cfg.output_stride}")
    if not timm.is_model(cfg.backbone):
        raise ConfigError(f"model.backbone: unknown timm model {cfg.backbone!r} (e.g. resnet18, resnet101)")
    if cfg.backbone_widths is not None:
        if len(cfg.backbone_widths) != 4 or any(w < 1 for w in cfg.backbone_widths):
            raise ConfigError(
                f"model.backbone_widths: need four positive stage widths, got {cfg.backbone_widths}"
            )
        if cfg.pretrained:
            raise ConfigError("model.backbone_widths: pretrained weights need the backbone's own widths")
    if not cfg.psp_bins or any(b < 1 for b in cfg.psp_bins):
        raise ConfigError(f"model.psp_bins: need positive pooling sizes, got {cfg.psp_bins}")
    if cfg.psp_channels < 1:
        raise ConfigError(f"model.psp_channels: must be >= 1, got {cfg.psp_channels}")
    if len(cfg.decoder_channels) != len(OUT_INDICES) or any(c < 1 for c in cfg.decoder_channels):
        raise ConfigError(
            f"model.decoder_channels: need {len(OUT_INDICES)} positive widths (deepest first), "
            f"got {cfg.decoder_channels}"
        )
    levels = cfg.mitrans_levels if cfg.mitrans else []
    if any(not 0 <= j < len(OUT_INDICES) for j in levels):
        raise ConfigError(
            f"model.mitrans_levels: decoder levels are 0..{len(OUT_INDICES) - 1} (0 = deepest), got {levels}"
        )
    backbone = backbone_or_config_error(
        cfg,
        lambda: create_resnet_encoder(
            cfg.backbone, in_channels, cfg.output_stride, cfg.pretrained, cfg.backbone_widths
        ),
    )
    if len(backbone.feature_info.channels()) != len(OUT_INDICES):
        raise ConfigError(f"model.backbone: {cfg.backbone!r} does not give {len(OUT_INDICES)} feature levels")
    return GuidedMixNet(
        in_channels,
        num_classes,
        backbone=backbone,
        psp_bins=cfg.psp_bins,
        psp_channels=cfg.psp_channels,
        decoder_channels=cfg.decoder_channels,
        mitrans_levels=levels,
        mitrans_zero_init=cfg.mitrans_zero_init,
    )


build_guidedmix.Config = GuidedMixConfig  # type: ignore[attr-defined]  # model.name's schema
