"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), for segmentation as in SSL4MIS.

The teacher is an exponential moving average of the student's weights; the student is trained on
the labeled loss plus a consistency loss towards the teacher on the unlabeled batch::

    θ'_t   = m·θ'_{t−1} + (1 − m)·θ_t                 after every step (m_t = min(m, 1 − 1/(t+1))
                                                       while ``ema_warmup``, the original code's warm-up)
    p_t    = softmax f_θ'(x_w)                        teacher, eval mode, no grad
    p_s    = softmax f_θ(x_u)                         student, x_u = strong view x_s1 (or x_w)
    loss_u = Σ_pixels mean_c (p_s − p_t)²·[c_t ≥ τ]·[not ignored] / #not-ignored     (``mse``)
             or Σ CE(f_θ(x_u), argmax p_t)·[c_t ≥ τ]·[not ignored] / #not-ignored   (``ce``)
    total  = loss_x + w(t)·λ·loss_u,   w(t) = exp(−5(1 − min(1, step / (rampup·T)))²)

The unlabeled-loss recipe of :mod:`semiseg.methods.semi` applies: the teacher's prediction goes
through the pseudo-label policy (distribution alignment also reshapes the MSE target; the mask
replaces ``[c_t ≥ τ]``), ``warmup_iters`` labeled-only steps come first (the ramp starts after
them), ``rampup_iters`` (when > 0) replaces the ``rampup`` fraction, ``labeled_weight`` scales
``loss_x`` and ``unlabeled_loss`` applies to the ``ce`` consistency.

BatchNorm running statistics (float buffers) are averaged like the weights; integer buffers are
copied: the update is :func:`semiseg.ema.ema_update`, the EMA shared with weight-averaged evaluation.
The network evaluated and saved as the run's result is the teacher (``eval_teacher``) or the
student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..ema import decay_at, ema_update
from ..errors import ConfigError
from ..losses import masked_softmax_mse
from ..models.base import Segmenter
from ..plugins.base import PluginHost, StepContext
from ..step import StepResult
from .base import Batch, Method, StepInfo, register_method
from .semi import SemiSupervisedConfig, UnlabeledRecipe, sigmoid_rampup
from .weak_strong import eval_mode, labeled_only_step

__all__ = ["MeanTeacher", "MeanTeacherConfig", "ema_update", "sigmoid_rampup"]


@dataclass
class MeanTeacherConfig(SemiSupervisedConfig):
    name: str = "mean_teacher"
    ema_momentum: float = 0.99  # m (SSL4MIS)
    ema_warmup: bool = True  # m_t = min(m, 1 − 1/(t+1)): a fast-moving teacher at the start
    consistency: Literal["mse", "ce"] = "mse"
    consistency_weight: float = 0.1  # λ (SSL4MIS)
    rampup: float = 0.3  # fraction of training over which w(t) ramps from exp(−5) to 1 (0: no ramp)
    threshold: float = 0.0  # τ on the teacher's confidence (0: every pixel, the original method)
    student_view: Literal["strong", "weak"] = "strong"  # what the student sees of the unlabeled batch
    eval_teacher: bool = True  # evaluate / export the teacher (else the student)

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"{prefix}.ema_momentum: must be in [0, 1], got {self.ema_momentum}")
        if not 0.0 <= self.rampup <= 1.0:
            raise ConfigError(f"{prefix}.rampup: must be in [0, 1], got {self.rampup}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in [0, 1], got {self.threshold}")
        if self.consistency_weight < 0:
            raise ConfigError(f"{prefix}.consistency_weight: must be >= 0, got {self.consistency_weight}")
        self.validate_semi(prefix)


@register_method("mean_teacher")
class MeanTeacher(PluginHost, Method):
    """Mean Teacher with an EMA teacher, ramped consistency and plug-in hooks (module docstring)."""

    Config = MeanTeacherConfig
    cfg: MeanTeacherConfig
    uses_unlabeled = True

    def __init__(self, model: Segmenter, cfg: MeanTeacherConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.teacher = copy.deepcopy(model)
        self.recipe = UnlabeledRecipe(cfg, num_classes, cfg.threshold)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def momentum_at(self, step: int) -> float:
        """``m_t = min(m, 1 − 1/(t+1))`` while ``ema_warmup``, else ``m``."""
        return decay_at(self.cfg.ema_momentum, step, self.cfg.ema_warmup)

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        cfg = self.cfg
        x_l, y_l, x_w = batch.x_l, batch.y_l, batch.x_w
        assert x_w is not None, "mean_teacher needs unlabeled data"
        if self.recipe.in_warmup(info.step):  # labeled-only: the supervised step
            self.recipe.observe_labeled(y_l)
            return labeled_only_step(self, self.recipe, batch, info, ["loss_u", "consistency_weight"])
        x_u = batch.x_s1 if cfg.student_view == "strong" and batch.x_s1 is not None else x_w
        ignore = batch.ignore if batch.ignore is not None else torch.zeros_like(x_w[:, 0], dtype=torch.uint8)
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        need_feats = self.plugins_need_features

        # Teacher on the weak view (eval mode, no grad); pseudo-labels through the policy, whose
        # alignment (if any) also shapes the soft MSE target.
        with torch.no_grad(), eval_mode(self.teacher):
            t_out = self.teacher(x_w, return_features=need_feats)
        t_logits = t_out.logits if need_feats else t_out
        self.recipe.observe_labeled(y_l)
        pl = self.recipe.labeler(t_logits, ignore, update=True)
        pseudo_w, conf_w, probs_t = pl.label, pl.score, pl.probs

        # Student on cat(x_l, x_u), one pass.
        out = self.net(torch.cat((x_l, x_u)), return_features=need_feats)
        logits, feats = (out.logits, out.features) if need_feats else (out, None)
        logits_l, logits_u = logits.split([n_l, n_u])
        ramp_length = cfg.rampup_iters if cfg.rampup_iters > 0 else cfg.rampup * info.total_steps
        ramp = sigmoid_rampup(info.step - cfg.warmup_iters, ramp_length)
        ctx = StepContext(
            batch, info, logits_l, logits_u, pseudo_w, conf_w, ignore,
            features_l=None if feats is None else [f[:n_l] for f in feats],
            features_w=None if feats is None else [f[n_l:] for f in feats],
            teacher_features_w=t_out.features if need_feats else None,
            labeled_scale=1.0 if cfg.labeled_weight is None else cfg.labeled_weight,
            unlabeled_scale=ramp,
        )  # fmt: skip
        weight = self.plugin_pixel_weights(ctx)

        loss_x = cfg.labeled_loss(logits_l, y_l)
        if cfg.consistency == "mse":
            loss_u = masked_softmax_mse(logits_u, probs_t, conf_w, ignore, pl.threshold, weight)
        else:
            loss_u = self.recipe.loss(logits_u, pseudo_w, conf_w, ignore, pl.threshold, weight)
        ramp = cfg.consistency_weight * ramp
        labeled = loss_x if cfg.labeled_weight is None else cfg.labeled_weight * loss_x
        total = labeled + ramp * loss_u
        losses = {
            "loss_x": loss_x,
            "loss_u": loss_u,
            "consistency_weight": torch.tensor(ramp, device=loss_x.device),
        }
        losses.update(self.recipe.diagnostics(pl, ignore, logits_l, y_l))
        return self.add_plugin_losses(ctx, StepResult(loss=total, logs=losses))

    def after_step(self, info: StepInfo) -> None:
        """EMA update of the teacher from the student just stepped, then plug-in hooks."""
        ema_update(self.teacher, self.model, self.momentum_at(info.step))
        super().after_step(info)

    def eval_model(self) -> nn.Module:
        return self.teacher if self.cfg.eval_teacher else self.model
