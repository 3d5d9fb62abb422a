"""FixMatch for segmentation (Sohn et al. 2020, as in UniMatch's ``fixmatch.py``; DESIGN §3.2).

One strong view per unlabeled image, mixed by the configured mixer (``mix: cutmix`` by default)::

    ŷ_w, c_w  = argmax / max softmax f(x_w)                     (detached weak prediction)
    loss_x    = CE(f(x_l), y_l)                                  (or (CE + w·Dice)/(1 + w))
    loss_s    = Σ CE(f(x̃_s), ỹ)·[c̃ ≥ τ]·[not ignored] / #not-ignored   (x̃_s, ỹ, c̃: mixed, see below)
    total     = scale·(loss_x + λ_u·loss_s),   scale = ½, λ_u = 1, τ = 0.95

The mix partner of sample ``i`` is sample ``N−1−i`` (the batch flipped, DESIGN §2); its label and
confidence inside the mixed region come from a prediction on its weak view made in ``eval`` mode
without gradient (UniMatch's ``pred_u_w_mix``). This module also holds what UniMatch shares with
FixMatch: :class:`ConsistencyConfig` and :class:`WeakStrongMethod`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.base import IGNORE_INDEX
from ..errors import ConfigError
from ..losses import masked_pseudo_ce, pseudo_label
from ..mixers import MixConfig, MixSample, StrongMixer, labeled_source
from ..models.base import Segmenter
from ..plugins.base import PluginHost, StepContext
from .base import Batch, Method, StepInfo, register_method
from .supervised import SupervisedConfig, labeled_loss


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode inside the block, restoring its previous mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@dataclass
class ConsistencyConfig(MixConfig, SupervisedConfig):
    """Options shared by the weak-to-strong consistency methods (FixMatch, UniMatch)."""

    threshold: float = 0.95  # τ: pseudo-labels with confidence ≥ τ are used
    scale: float = 0.5  # total = scale·(loss_x + weighted unlabeled losses)  (UniMatch's "/2")

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in [0, 1], got {self.threshold}")
        if self.scale <= 0:
            raise ConfigError(f"{prefix}.scale: must be > 0, got {self.scale}")
        if self.dice_weight < 0:
            raise ConfigError(f"{prefix}.dice_weight: must be >= 0, got {self.dice_weight}")
        for name, value in vars(self).items():
            if name.startswith("weight_") and value < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {value}")
        self.validate_mix(prefix)


class WeakStrongMethod(PluginHost, Method):
    """Machinery shared by FixMatch and UniMatch: mix-source prediction, strong-view targets."""

    uses_unlabeled = True
    cfg: ConsistencyConfig

    def __init__(self, model: Segmenter, cfg: ConsistencyConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.mixer = StrongMixer(cfg, num_classes)

    @property
    def needs_labeled_strong(self) -> bool:
        return self.cfg.mix == "supmix" and self.cfg.supmix_source == "strong"

    @staticmethod
    def unlabeled_ignore(batch: Batch) -> Tensor:
        """The unlabeled ignore map (255 = padding), zeros when the batch has none."""
        assert batch.x_w is not None, "this method needs unlabeled data (x_w, x_s1, x_s2)"
        if batch.ignore is not None:
            return batch.ignore
        n, _, h, w = batch.x_w.shape
        return torch.zeros(n, h, w, dtype=torch.uint8, device=batch.x_w.device)

    def partner_prediction(self, x_w: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo-label and confidence of each sample's mix partner, predicted on the partner's weak
        image ``x_w.flip(0)`` in eval mode without gradient (UniMatch's ``pred_u_w_mix``)."""
        with torch.no_grad(), eval_mode(self.model):
            return pseudo_label(self.model(x_w.flip(0)))

    def strong_target(
        self,
        x_s: Tensor,
        box: Tensor | None,
        ctx: StepContext,
        weight: Tensor | None,
        partner: tuple[Tensor, Tensor] | None,
    ) -> MixSample:
        """Mixed strong view with its target: own weak pseudo-label outside the mixed region; inside
        it, the partner's (CutMix / ClassMix) or the labeled ground truth (SupMix, eq. 10–11)."""
        own = MixSample(x_s, ctx.pseudo_w, ctx.conf_w, ctx.ignore, weight)
        partner_sample = None
        if partner is not None:
            partner_sample = MixSample(
                x_s.flip(0),
                partner[0],
                partner[1],
                ctx.ignore.flip(0),
                None if weight is None else weight.flip(0),
            )
        labeled = None
        if self.cfg.mix == "supmix":
            x_src = ctx.batch.x_ls if self.cfg.supmix_source == "strong" else ctx.batch.x_l
            assert x_src is not None, "supmix_source=strong needs the labeled strong view (batch.x_ls)"
            labeled = labeled_source(x_src, ctx.batch.y_l, x_s.shape[0], weight is not None)
        return self.mixer(own, partner_sample, labeled, box)

    def mask_ratio(self, ctx: StepContext) -> Tensor:
        """Fraction of non-ignored weak pixels whose pseudo-label passes the threshold (logged)."""
        used = ctx.ignore != IGNORE_INDEX
        return ((ctx.conf_w >= self.cfg.threshold) & used).sum() / used.sum().clamp_min(1)


@dataclass
class FixMatchConfig(ConsistencyConfig):
    name: str = "fixmatch"
    weight_s: float = 1.0  # λ_u: weight of the strong-view loss


@register_method("fixmatch")
class FixMatch(WeakStrongMethod):
    """FixMatch: ``total = ½(loss_x + loss_s)`` with one mixed strong view (see module docstring)."""

    Config = FixMatchConfig
    cfg: FixMatchConfig

    def training_step(self, batch: Batch, info: StepInfo) -> dict[str, Tensor]:
        cfg = self.cfg
        x_l, y_l, x_w, x_s = batch.x_l, batch.y_l, batch.x_w, batch.x_s1
        assert x_w is not None and x_s is not None, "fixmatch needs x_w and x_s1"
        ignore = self.unlabeled_ignore(batch)
        n_l = x_l.shape[0]

        # Mix source: the partner's weak prediction (eval, no grad).
        partner = self.partner_prediction(x_w) if self.mixer.uses_partner([batch.box1]) else None

        # f(cat(x_l, x_w)) once; pseudo-labels from the weak prediction, detached.
        out = self.net(torch.cat((x_l, x_w)), return_features=self.plugins_need_features)
        logits, feats = (out.logits, out.features) if self.plugins_need_features else (out, None)
        ctx = StepContext.from_joint_pass(batch, info, logits, feats, n_l, ignore)
        weight = self.plugin_pixel_weights(ctx)

        # Strong view, mixed; its target assembled under the same mask.
        target = self.strong_target(x_s, batch.box1, ctx, weight, partner)
        logits_s = self.net(target.image)

        logits_l, pseudo_w, conf_w = ctx.logits_l, ctx.pseudo_w, ctx.conf_w
        loss_x = labeled_loss(logits_l, y_l, cfg.dice_weight)
        loss_s = masked_pseudo_ce(
            logits_s, target.label, target.confidence, target.ignore, cfg.threshold, target.weight
        )
        total = cfg.scale * (loss_x + cfg.weight_s * loss_s)
        self.mixer.observe(logits_l, y_l, pseudo_w, conf_w, ignore)
        losses = {"loss_x": loss_x, "loss_s": loss_s, "mask_ratio": self.mask_ratio(ctx), "total": total}
        return self.add_plugin_losses(ctx, losses)
