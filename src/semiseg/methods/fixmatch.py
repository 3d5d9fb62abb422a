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
from .weak_strong import (
    ConsistencyConfig,
    WeakStrongMethod,
    eval_mode,
    mask_ratio,
    mix_targets,
    unlabeled_ignore,
)

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
        cfg = self.cfg
        if self.recipe.in_warmup(info.step):
            return self.warmup_step(batch, info)
        x_l, y_l, x_w, x_s = batch.x_l, batch.y_l, batch.x_w, batch.x_s1
        assert x_w is not None and x_s is not None, "fixmatch needs x_w and x_s1"
        ignore = unlabeled_ignore(batch)
        n_l = x_l.shape[0]

        # ŷ_mix, c_mix: the mix partner x_w.flip(0), eval mode, no grad; only when this step pastes it.
        partner = self.partner_prediction(x_w) if self.mixer.uses_partner([batch.box1]) else None

        # p_l, p_w: one forward of cat(x_l, x_w) (with encoder features when a plug-in reads them).
        out = self.net(torch.cat((x_l, x_w)), return_features=self.plugins_need_features)
        logits, features = (out.logits, out.features) if self.plugins_need_features else (out, None)
        logits_l, logits_w = logits[:n_l], logits[n_l:]

        # ŷ_w, c_w: the weak view's pseudo-labels from the policy (or the EMA teacher), detached.
        pl, teacher_features = self.weak_pseudo_labels(batch, logits_w, features, ignore)
        pseudo_w, conf_w, tau = pl.label, pl.score, pl.threshold

        # Plug-ins see the step from here; their pixel weights (MPMC's λ_s) are mixed with the target.
        ctx = self.plugin_context(batch, info, logits_l, logits_w, features, ignore, pl, teacher_features)
        weights = self.plugin_mix_weights(ctx, None if partner is None else partner.label)

        # mix = (x̃_s, ỹ, c̃, ĩ): the strong view mixed by the configured mixer, its target alike.
        own, pasted = mix_targets(pl, ignore, weights, partner)
        mix = self.mix_strong_view(x_s, batch.box1, own, pasted, batch)
        (logits_s,) = self.strong_forward([mix], ctx)

        # loss_x, loss_s (a pixel teaches iff its confidence ≥ τ) and total = ½(loss_x + λ_u·loss_s).
        loss_x = cfg.labeled_loss(logits_l, y_l)
        loss_s = self.recipe.loss(logits_s, mix.label, mix.confidence, mix.ignore, tau, mix.weight)
        total = self.recipe.total(loss_x, [cfg.weight_s * loss_s], cfg.scale, info.step)

        # Running statistics of the mixer, logs, then the plug-ins' terms added to the total.
        self.mixer.observe(logits_l, y_l, pseudo_w, conf_w, ignore)
        logs = {"loss_x": loss_x, "loss_s": loss_s, "mask_ratio": mask_ratio(conf_w, ignore, tau)}
        logs.update(self.recipe.diagnostics(pl, ignore, logits_l, y_l))
        return self.add_plugin_losses(ctx, StepResult(loss=total, logs=logs))
