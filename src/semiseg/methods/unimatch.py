"""UniMatch (Yang et al., CVPR 2023), following the official training step (``unimatch.py``).

Per iteration, with ``n_l`` labeled and ``n_u`` unlabeled images::

    ŷ_mix, c_mix   = f_eval(x_w.flip(0))                       mix source: partner weak view, eval, no grad
    p_l, p_w, p_fp = f(cat(x_l, x_w), fp_from=n_l)             one pass; feature perturbation on x_w only
    ŷ_w, c_w       = pseudo-label policy of p_w                 detached (default: argmax / max softmax)
    x̃_sj, ỹ_j, c̃_j, ĩ_j = mix(x_sj, ŷ_w, c_w, ignore)          j = 1, 2: inside the CutMix box (or
                                                                ClassMix / SupMix mask) from the partner
    p_s1, p_s2     = f(cat(x̃_s1, x̃_s2))
    loss_x  = CE(p_l, y_l)                                     (or (CE + w·Dice)/(1 + w), medical)
    loss_sj = Σ CE(p_sj, ỹ_j)·[c̃_j ≥ τ]·[ĩ_j ≠ 255] / #(ĩ_j ≠ 255)
    loss_fp = Σ CE(p_fp, ŷ_w)·[c_w ≥ τ]·[ignore ≠ 255] / #(ignore ≠ 255)
    total   = (loss_x + 0.25·loss_s1 + 0.25·loss_s2 + 0.5·loss_fp) / 2,   τ = 0.95

Unlike the official code, the labeled half is not feature-perturbed (its perturbed logits were
computed and discarded there). ``mix: supmix`` replaces CutMix by SupMix with probability
``supmix_p`` per sample and strong view (SupMix paper eq. 7–11), ``mix: classmix`` by ClassMix.
Plug-ins (e.g. SUFD, eq. 12) add their terms to ``total`` after the ``/2``. The unlabeled-loss
recipe (pseudo-label policy, warm-up, ramp-up, ``labeled_weight``, CE / Dice / balanced CE, the
medical variant's Dice terms) is :mod:`semiseg.methods.semi`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..step import StepResult
from .base import Batch, StepInfo, register_method
from .weak_strong import ConsistencyConfig, WeakStrongMethod


@dataclass
class UniMatchConfig(ConsistencyConfig):
    name: str = "unimatch"
    weight_s1: float = 0.25  # weight of loss_s1 (strong view 1)
    weight_s2: float = 0.25  # weight of loss_s2 (strong view 2)
    weight_fp: float = 0.5  # weight of loss_fp (feature perturbation)


@register_method("unimatch")
class UniMatch(WeakStrongMethod):
    """UniMatch: dual strong views + feature perturbation (see the module docstring)."""

    Config = UniMatchConfig
    cfg: UniMatchConfig
    unlabeled_terms = ("loss_s1", "loss_s2", "loss_fp")

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        warm = self.warmup_step(batch, info)
        if warm is not None:
            return warm
        cfg = self.cfg
        x_l, y_l, x_w, x_s1, x_s2 = batch.x_l, batch.y_l, batch.x_w, batch.x_s1, batch.x_s2
        assert x_w is not None and x_s1 is not None and x_s2 is not None, "unimatch needs x_w, x_s1, x_s2"
        ignore = self.unlabeled_ignore(batch)
        n_l = x_l.shape[0]

        # Mix source: the partner's (flipped batch) weak prediction, eval mode, no grad.
        partner = self.partner_prediction(x_w) if self.mixer.uses_partner([batch.box1, batch.box2]) else None

        # One forward of cat(x_l, x_w); feature perturbation only on the unlabeled half.
        out = self.net(torch.cat((x_l, x_w)), fp_from=n_l, return_features=self.plugins_need_features)
        logits_fp = out.logits_fp
        ctx, pl = self.weak_context(batch, info, out.logits, out.features, ignore)
        weights = self.mix_weights(ctx, partner)
        weight = weights[0]

        # Two strong views, each mixed with its own mask; targets assembled under the same masks.
        t1 = self.strong_target(x_s1, batch.box1, ctx, weights, partner)
        t2 = self.strong_target(x_s2, batch.box2, ctx, weights, partner)
        logits_s1, logits_s2 = self.strong_forward(ctx, [t1, t2])

        tau = pl.threshold
        loss_x = cfg.labeled_loss(ctx.logits_l, y_l)
        loss_s1 = self.unlabeled_loss(logits_s1, t1, tau)
        loss_s2 = self.unlabeled_loss(logits_s2, t2, tau)
        loss_fp = self.recipe.loss(logits_fp, ctx.pseudo_w, ctx.conf_w, ignore, tau, weight)
        losses = {"loss_x": loss_x, "loss_s1": loss_s1, "loss_s2": loss_s2, "loss_fp": loss_fp}
        terms = [cfg.weight_s1 * loss_s1, cfg.weight_s2 * loss_s2, cfg.weight_fp * loss_fp]
        return self.finish(ctx, pl, losses, loss_x, terms)
