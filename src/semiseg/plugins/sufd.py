"""Sup-Unsup Feature Discriminator (SUFD; SupMix paper §3.2, eq. 12).

A discriminator ``D`` learns to tell the model's output on labeled images (``1``) from its output on
weakly augmented unlabeled images (``0``); the segmenter, acting as generator, learns to make its
unlabeled outputs look labeled. Eq. 12, split into the two players' terms::

    L_SUFD = B(o_u, 1)  +  ½·(B(o_u, 0) + B(o_l, 1)),      o = D(p),  B = BCE with logits (mean)
             └ generator ┘   └──── discriminator ────┘

* generator term ``λ_adv · B(D(p_w), 1)`` with ``p_w`` the weak unlabeled prediction **with**
  gradient ("without fixing"): added to the segmenter's ``total``. ``D``'s parameters are frozen
  while it is computed, so only the segmenter receives its gradient;
* discriminator term ``½(B(D(p_w.detach()), 0) + B(D(p_l.detach()), 1))``: returned as
  ``total/sufd`` and stepped by the plug-in's own Adam optimizer (poly lr decay per step).

``input: probs`` (default): ``p = softmax(logits)``, C channels. ``input: features``: ``p`` is the
encoder feature ``features[feature_index]`` that :meth:`Segmenter.encode` returns (default ``-1``,
the deepest — the input of the decoder's last stage for the U-Net, the ASPP input for DeepLabV3+);
its channel count is found with one probe forward at construction.

``input_scale`` (default 1, the paper): ``D`` looks at ``p`` area-down-sampled by this factor, both
players alike; 0.5 makes ``D`` 4× cheaper (D dominates SUFD's cost at cpu-small). Not the paper's: an option,
off by default. Checked on 3 seeds (grid sufd_input_scale_cpu_small, CHASE_DB1 1/8): +0.50 mIoU
against the full input, 95 % interval [−3.34, +4.34], no difference beyond seed noise.

``D`` (Hung et al., BMVC 2018): 4×4 stride-2 padding-1 convolutions ``in→64→128→256→512→1`` with
LeakyReLU 0.2 between them, output map ``o``. Each such conv halves the size (``⌊s/2⌋``); to keep
tiny inputs working, a map smaller than 2 pixels on a side is replicate-padded to 2 before a conv,
so the output is at least 1×1 for any input size (a 128² input gives a 4×4 map).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.base import Segmenter
from ..modes import eval_mode
from .base import OwnOptimizerPlugin, PluginConfig, StepContext, register_plugin


@dataclass
class SUFDConfig(PluginConfig):
    """``plugins.sufd`` options. The paper is silent on all of them; the defaults follow Hung et al.'s
    adversarial segmentation (BMVC 2018): λ_adv 0.01, Adam 1e-4 with β = (0.9, 0.99), poly decay."""

    input: Literal["probs", "features"] = "probs"
    feature_index: int = -1  # input: features — which encoder feature (shallow to deep)
    lambda_adv: float = 0.01  # weight of the generator term
    lr: float = 1e-4  # Adam
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    poly_power: float = 0.9  # lr = lr·(1 − step/total)^power, per step
    warmup_iters: int = 0  # generator term off before this step (D trains from step 0)
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # hidden widths of D
    negative_slope: float = 0.2  # LeakyReLU
    input_scale: float = 1.0  # D sees p down-sampled ×this
    # false (default): Adam's multi-tensor update, bit-identical to the per-parameter loop; true: its
    # fused kernel, the same update up to float rounding (volatile, like ``train.threads``). The fused
    # optimizer step alone is ≈ 5× faster on CPU, a whole step was not measurably (docs/studies/step-cost.md).
    fused: bool = False

    def validate(self, prefix: str) -> None:
        if self.lambda_adv < 0:
            raise ConfigError(f"{prefix}.lambda_adv: must be >= 0, got {self.lambda_adv}")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr: must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: expected two values in [0, 1), got {self.betas}")
        if self.warmup_iters < 0:
            raise ConfigError(f"{prefix}.warmup_iters: must be >= 0, got {self.warmup_iters}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"{prefix}.channels: need positive widths, got {self.channels}")
        if not 0.0 < self.input_scale <= 1.0:
            raise ConfigError(f"{prefix}.input_scale: must be in (0, 1], got {self.input_scale}")


class Discriminator(nn.Module):
    """Fully convolutional discriminator (Hung et al. 2018): 4×4/2 convs, LeakyReLU, 1-channel map.

    Works for any input size ≥ 1×1: before each conv a map smaller than 2 on a side is
    replicate-padded to 2, so every conv yields at least 1×1."""

    def __init__(self, in_channels: int, channels: list[int], negative_slope: float = 0.2) -> None:
        super().__init__()
        widths = [in_channels, *channels, 1]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=4, stride=2, padding=1) for a, b in zip(widths[:-1], widths[1:])
        )
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        for i, conv in enumerate(self.convs):
            h, w = x.shape[-2:]
            if h < 2 or w < 2:
                x = F.pad(x, (0, max(0, 2 - w), 0, max(0, 2 - h)), mode="replicate")
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.leaky_relu(x, self.negative_slope)
        return x


@register_plugin("sufd")
class SUFD(OwnOptimizerPlugin):
    """SUFD plug-in: adversarial alignment of unlabeled to labeled predictions (eq. 12)."""

    Config = SUFDConfig
    needs_unlabeled = True

    def __init__(self, cfg: SUFDConfig, num_classes: int, model: Segmenter, total_steps: int) -> None:
        super().__init__(cfg, num_classes, model, total_steps)
        self.needs_features = cfg.input == "features"
        in_channels = num_classes if cfg.input == "probs" else _feature_channels(model, cfg.feature_index)
        self.disc = Discriminator(in_channels, list(cfg.channels), cfg.negative_slope)

    # -- inputs of D --------------------------------------------------------------------------

    def _inputs(self, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """``(p_l, p_w)``: labeled and weak unlabeled model outputs D looks at (both with grad)."""
        if self.cfg.input == "probs":
            p_l, p_w = ctx.logits_l.float().softmax(1), ctx.logits_w.float().softmax(1)
        elif ctx.features_l is None or ctx.features_w is None:
            raise RuntimeError("sufd: input 'features' needs the host method to pass encoder features")
        else:
            i = self.cfg.feature_index
            p_l, p_w = ctx.features_l[i].float(), ctx.features_w[i].float()
        return self._scaled(p_l), self._scaled(p_w)

    def _scaled(self, p: Tensor) -> Tensor:
        if self.cfg.input_scale == 1.0:
            return p
        return F.interpolate(p, scale_factor=self.cfg.input_scale, mode="area")

    # -- the two players ----------------------------------------------------------------------

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        """Generator term ``λ_adv·B(D(p_w), 1)`` (eq. 12, first term); zero during warm-up."""
        _, p_w = self._inputs(ctx)
        if ctx.info.step < self.cfg.warmup_iters or self.cfg.lambda_adv == 0:
            return {"loss_adv": p_w.sum() * 0.0}
        frozen = [p for p in self.disc.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            o_u = self.disc(p_w)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return {
            "loss_adv": self.cfg.lambda_adv * F.binary_cross_entropy_with_logits(o_u, torch.ones_like(o_u))
        }

    def optimizer_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        """Discriminator term ``½(B(D(p_w), 0) + B(D(p_l), 1))`` on detached inputs (eq. 12)."""
        p_l, p_w = self._inputs(ctx)
        p_l, p_w = p_l.detach(), p_w.detach()
        if p_l.shape[-2:] != p_w.shape[-2:]:  # labeled / unlabeled crops of different sizes
            p_l = F.interpolate(p_l, size=p_w.shape[-2:], mode="bilinear", align_corners=False)
        o = self.disc(torch.cat((p_w, p_l)))
        o_u, o_l = o[: p_w.shape[0]], o[p_w.shape[0] :]
        fake = F.binary_cross_entropy_with_logits(o_u, torch.zeros_like(o_u))
        real = F.binary_cross_entropy_with_logits(o_l, torch.ones_like(o_l))
        return {self.name: 0.5 * (fake + real)}

    # -- D's optimizer ------------------------------------------------------------------------

    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam over D's parameters (created on first use, after the trainer moved the method)."""
        b1, b2 = self.cfg.betas
        fused = {"fused": True} if self.cfg.fused else {"foreach": True}
        return torch.optim.Adam(
            self.disc.parameters(),
            lr=self.cfg.lr,
            betas=(b1, b2),
            weight_decay=self.cfg.weight_decay,
            **fused,
        )


def _feature_channels(model: Segmenter, index: int) -> int:
    """Channel count of ``model.encode(x)[index]``, from one small probe forward (eval, no grad)."""
    with eval_mode(model), torch.no_grad():
        param = next(model.parameters())
        probe = torch.zeros(1, model.in_channels, 64, 64, device=param.device, dtype=param.dtype)
        feats = model.encode(probe)
    try:
        return int(feats[index].shape[1])
    except IndexError:
        raise ConfigError(
            f"plugins.sufd.feature_index: {index} is out of range (the model has {len(feats)} features)"
        ) from None
