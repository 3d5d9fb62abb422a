"""UniMatch (Yang et al., CVPR 2023), following the official training step (``unimatch.py``).

Per iteration, with ``n_l`` labeled and ``n_u`` unlabeled images, :meth:`UniMatch.training_step`
runs, in this order::

    (warm-up)      inside warmup_iters: the supervised step on x_l alone
    ŷ_mix, c_mix   = f_eval(x_w.flip(0))                       mix partner: eval mode, no grad
    p_l, p_w, p_fp = f(cat(x_l, x_w), fp_from=n_l)             one pass; feature perturbation on x_w only
    ŷ_w, c_w       = pseudo-label policy of p_w                 detached (default: argmax / max softmax)
    x̃_sj, ỹ_j, c̃_j, ĩ_j = mix(x_sj, ŷ_w, c_w, ignore)          j = 1, 2: inside the CutMix box (or
                                                                ClassMix / SupMix mask) from the partner
    p_s1, p_s2     = f(cat(x̃_s1, x̃_s2))
    loss_x  = CE(p_l, y_l)                                     (or (CE + w·Dice)/(1 + w), medical)
    loss_sj = Σ CE(p_sj, ỹ_j)·[c̃_j ≥ τ]·[ĩ_j ≠ 255] / #(ĩ_j ≠ 255)
    loss_fp = Σ CE(p_fp, ŷ_w)·[c_w ≥ τ]·[ignore ≠ 255] / #(ignore ≠ 255)
    total   = (loss_x + 0.25·loss_s1 + 0.25·loss_s2 + 0.5·loss_fp) / 2,   τ = 0.95
    total  += plug-in terms (e.g. SUFD, eq. 12), after the /2

**The mix partner** of sample ``i`` is sample ``n_u−1−i`` of the same unlabeled batch: the batch
reversed, ``x_w.flip(0)`` (as UniMatch-V2), predicted in eval mode without gradient, which gives
the label and confidence inside the pasted region. The official UniMatch code instead draws a
second, independent unlabeled batch as the mix source. semiseg keeps the flip: no second loader is
needed and every image is both a target and a source within one step; the price is that the
partner is not independent of the batch (samples ``i`` and ``n_u−1−i`` always paste into each
other). docs/methods/index.md ("The mix partner", under Mixers) explains it for every mixer.

Also unlike the official code, the labeled half is not feature-perturbed (its perturbed logits were
computed and discarded there). ``mix: supmix`` replaces CutMix by SupMix with probability
``mixer.p`` per sample and strong view (SupMix paper eq. 7–11), ``mix: classmix`` by ClassMix.
The unlabeled-loss recipe (pseudo-label policy, warm-up, ramp-up, ``labeled_weight``, CE / Dice /
balanced CE, the medical variant's Dice terms) is :mod:`semiseg.methods.semi`'s; the pieces
FixMatch shares (partner prediction, pseudo-labels, plug-in context, mixing a strong view with its
target, the strong forward) are in :mod:`semiseg.methods.weak_strong`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..step import StepResult
from .base import Batch, StepInfo, register_method
from .weak_strong import ConsistencyConfig, WeakStrongMethod, mask_ratio, mix_targets, unlabeled_ignore


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
        cfg = self.cfg
        if self.recipe.in_warmup(info.step):
            return self.warmup_step(batch, info)
        x_l, y_l, x_w, x_s1, x_s2 = batch.x_l, batch.y_l, batch.x_w, batch.x_s1, batch.x_s2
        assert x_w is not None and x_s1 is not None and x_s2 is not None, "unimatch needs x_w, x_s1, x_s2"
        ignore = unlabeled_ignore(batch)
        n_l = x_l.shape[0]

        # ŷ_mix, c_mix: the mix partner x_w.flip(0), eval mode, no grad; only when this step pastes it.
        partner = self.partner_prediction(x_w) if self.mixer.uses_partner([batch.box1, batch.box2]) else None

        # p_l, p_w, p_fp: one forward of cat(x_l, x_w), feature perturbation on the unlabeled half.
        out = self.net(torch.cat((x_l, x_w)), fp_from=n_l, return_features=self.plugins_need_features)
        logits_l, logits_w, logits_fp = out.logits[:n_l], out.logits[n_l:], out.logits_fp

        # ŷ_w, c_w: the weak view's pseudo-labels from the policy (or the EMA teacher), detached.
        pl, teacher_features = self.weak_pseudo_labels(batch, logits_w, out.features, ignore)
        pseudo_w, conf_w, tau = pl.label, pl.score, pl.threshold

        # Plug-ins see the step from here; their pixel weights (MPMC's λ_s) are mixed with the targets.
        ctx = self.plugin_context(batch, info, logits_l, logits_w, out.features, ignore, pl, teacher_features)
        weights = self.plugin_mix_weights(ctx, None if partner is None else partner.label)

        # mix_j = (x̃_sj, ỹ_j, c̃_j, ĩ_j): each strong view mixed under its own mask, its target alike.
        own, pasted = mix_targets(pl, ignore, weights, partner)
        mix1 = self.mix_strong_view(x_s1, batch.box1, own, pasted, batch)
        mix2 = self.mix_strong_view(x_s2, batch.box2, own, pasted, batch)

        # p_s1, p_s2: one forward of both mixed strong views.
        logits_s1, logits_s2 = self.strong_forward([mix1, mix2], ctx)

        # The four losses (a pixel teaches iff its confidence ≥ τ) and the weighted total.
        loss_x = cfg.labeled_loss(logits_l, y_l)
        loss_s1 = self.recipe.loss(logits_s1, mix1.label, mix1.confidence, mix1.ignore, tau, mix1.weight)
        loss_s2 = self.recipe.loss(logits_s2, mix2.label, mix2.confidence, mix2.ignore, tau, mix2.weight)
        loss_fp = self.recipe.loss(logits_fp, pseudo_w, conf_w, ignore, tau, own.weight)
        terms = [cfg.weight_s1 * loss_s1, cfg.weight_s2 * loss_s2, cfg.weight_fp * loss_fp]
        total = self.recipe.total(loss_x, terms, cfg.scale, info.step)

        # Running statistics of the mixer, logs, then the plug-ins' terms added to the total.
        self.mixer.observe(logits_l, y_l, pseudo_w, conf_w, ignore)
        logs = {"loss_x": loss_x, "loss_s1": loss_s1, "loss_s2": loss_s2, "loss_fp": loss_fp}
        logs["mask_ratio"] = mask_ratio(conf_w, ignore, tau)
        logs.update(self.recipe.diagnostics(pl, ignore, logits_l, y_l))
        return self.add_plugin_losses(ctx, StepResult(loss=total, logs=logs))
