"""FixMatch for segmentation (Sohn et al. 2020), as UniMatch's repository implements it (``fixmatch.py``).

One strong view per unlabeled image, mixed by the configured mixer (``mix: cutmix`` by default)::

    ŷ_w, c_w  = pseudo-label policy of f(x_w)                    (detached; default argmax / max softmax)
    loss_x    = CE(f(x_l), y_l)                                  (or (CE + w·Dice)/(1 + w))
    loss_s    = Σ CE(f(x̃_s), ỹ)·[c̃ ≥ τ]·[not ignored] / #not-ignored   (x̃_s, ỹ, c̃: mixed, see below)
    total     = scale·(loss_x + λ_u·loss_s),   scale = ½, λ_u = 1, τ = 0.95

The mix partner of sample ``i`` is sample ``N−1−i`` (the batch flipped, as UniMatch-V2); its label and
confidence inside the mixed region come from a prediction on its weak view made in ``eval`` mode
without gradient (UniMatch's ``pred_u_w_mix``). The unlabeled-loss recipe (pseudo-label policy,
warm-up, ramp-up, loss kind) is :mod:`semiseg.methods.semi`'s; the shared machinery lives in
:mod:`semiseg.methods.weak_strong`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..step import StepResult
from .base import Batch, StepInfo, register_method
from .weak_strong import ConsistencyConfig, WeakStrongMethod, eval_mode

__all__ = ["ConsistencyConfig", "FixMatch", "FixMatchConfig", "WeakStrongMethod", "eval_mode"]


@dataclass
class FixMatchConfig(ConsistencyConfig):
    name: str = "fixmatch"
    weight_s: float = 1.0  # λ_u: weight of the strong-view loss


@register_method("fixmatch")
class FixMatch(WeakStrongMethod):
    """FixMatch: ``total = ½(loss_x + loss_s)`` with one mixed strong view (see module docstring)."""

    Config = FixMatchConfig
    cfg: FixMatchConfig
    unlabeled_terms = ("loss_s",)

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        warm = self.warmup_step(batch, info)
        if warm is not None:
            return warm
        cfg = self.cfg
        x_l, y_l, x_w, x_s = batch.x_l, batch.y_l, batch.x_w, batch.x_s1
        assert x_w is not None and x_s is not None, "fixmatch needs x_w and x_s1"
        ignore = self.unlabeled_ignore(batch)

        # Mix source: the partner's weak prediction (eval, no grad).
        partner = self.partner_prediction(x_w) if self.mixer.uses_partner([batch.box1]) else None

        # f(cat(x_l, x_w)) once; pseudo-labels from the weak prediction, detached.
        out = self.net(torch.cat((x_l, x_w)), return_features=self.plugins_need_features)
        logits, feats = (out.logits, out.features) if self.plugins_need_features else (out, None)
        ctx, pl = self.weak_context(batch, info, logits, feats, ignore)
        weights = self.mix_weights(ctx, partner)

        # Strong view, mixed; its target assembled under the same mask.
        target = self.strong_target(x_s, batch.box1, ctx, weights, partner)
        (logits_s,) = self.strong_forward(ctx, [target])

        loss_x = cfg.labeled_loss(ctx.logits_l, y_l)
        loss_s = self.unlabeled_loss(logits_s, target, pl.threshold)
        losses = {"loss_x": loss_x, "loss_s": loss_s}
        return self.finish(ctx, pl, losses, loss_x, [cfg.weight_s * loss_s])
