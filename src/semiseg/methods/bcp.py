"""Bidirectional Copy-Paste (BCP; Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical
Image Segmentation", CVPR 2023, arXiv 2305.00673), following the released ACDC training script
(DeepMed-Lab-ECNU/BCP ``code/ACDC_BCP_train.py``). docs/methods/bcp.md holds the derivation, the
pairing of batches, how policies and plug-ins compose with it, and the eight places where the
released code, the paper and semiseg differ.

One run, two stages: ``stage1_iters`` steps, then ``train.iters − stage1_iters``. Each step draws
one box of ``⌊β·H⌋ × ⌊β·W⌋`` (β = ``box_ratio`` = 2/3) and the zero-one mask ``M`` (0 inside the
box); a copy-paste keeps ``a`` outside the box and pastes ``b`` inside (:mod:`semiseg.mix_ops`)::

    a ⊕ b = a ⊙ M + b ⊙ (1 − M)                                  (images and label maps alike)

Stage 1, copy-paste pre-training on the labeled halves ``a``, ``b``::

    X_ll = x_l^a ⊕ x_l^b,    Y_ll = y_l^a ⊕ y_l^b,    loss = L_mix(f(X_ll), Y_ll; 1, 1)

Stage 2, bidirectional copy-paste with an EMA teacher ``f_t`` copied from the student at the
boundary; ``ŷ_u = LCC(argmax f_t(x_w))`` keeps each foreground class's largest 8-connected
component (:func:`semiseg.pseudo_labels.largest_component`)::

    X_ul = x_u^a ⊕ x_l^a,   Y_ul = ŷ_u^a ⊕ y_l^a      an unlabeled image with a labeled crop pasted in
    X_lu = x_l^b ⊕ x_u^b,   Y_lu = y_l^b ⊕ ŷ_u^b      a labeled image with an unlabeled crop pasted in
    loss = L_mix(f(X_ul), Y_ul; α, 1) + L_mix(f(X_lu), Y_lu; 1, α)                      α = u_weight
    θ_t ← λ·θ_t + (1 − λ)·θ                            after every stage-2 step, λ = ema_decay = 0.99

``L_mix(P, Y; w_out, w_in)`` (:func:`semiseg.losses.mix_loss`, the released ``mix_loss``) scores the
region outside the box and the box apart, each with ``(CE + Dice)/2``: pseudo-labeled pixels weigh
α = 0.5, ground-truth pixels 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from ..ema import ModelEma
from ..errors import ConfigError
from ..losses import mix_loss
from ..mix_ops import (
    Box,
    CopyPaste,
    bidirectional_copy_paste,
    box_mask,
    box_side,
    copy_paste,
    draw_box,
    labeled_copy_paste,
)
from ..models.base import Segmenter
from ..modes import module_mode
from ..plugins.base import PluginHost, StepContext
from ..pseudo_labels import PseudoLabels, largest_component
from ..step import StepResult
from ..types import IGNORE_INDEX, Batch
from .base import Method, StepInfo, register_method
from .semi import SemiSupervisedConfig, UnlabeledRecipe, sigmoid_rampup

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = [
    "BCP",
    "BCPConfig",
    "Box",
    "CopyPaste",
    "bidirectional_copy_paste",
    "box_mask",
    "box_side",
    "copy_paste",
    "draw_box",
    "largest_component",
    "mix_loss",
]


@dataclass
class BCPConfig(SemiSupervisedConfig):
    """``method`` options of BCP (module docstring); defaults: the released ACDC script."""

    name: str = "bcp"
    # Stage 1 (labeled copy-paste pre-training): a fraction of train.iters (float in [0, 1],
    # rounded half up) or a number of steps (int); stage 2 takes the rest. 0: stage 2 only
    # (start it from train.init_from). The released ACDC script: 10 000 + 30 000 steps.
    stage1_iters: float | int = 0.25
    box_ratio: float = 2.0 / 3.0  # β: the box is ⌊β·H⌋ × ⌊β·W⌋
    u_weight: float = 0.5  # α: weight of the pseudo-labeled region's loss (ground truth: 1)
    ema_decay: float = 0.99  # λ: teacher ← λ·teacher + (1 − λ)·student after every stage-2 step
    teacher_mode: Literal["train", "eval"] = "train"  # the released code predicts in train mode
    largest_cc: bool = True  # keep each foreground class's largest connected component
    threshold: float = 0.0  # τ of the pseudo-label policy (0: every pseudo-labeled pixel teaches)
    eval_teacher: bool = False  # evaluate / export the teacher (stage 2) instead of the student
    dice_weight: float = 1.0  # L_seg = (CE + w·Dice)/(1 + w): (CE + Dice)/2
    dice_squared: bool = True  # Σp² + Σt² (DiceLoss)

    def validate(self, prefix: str) -> None:
        s = self.stage1_iters
        if isinstance(s, float) and not 0.0 <= s <= 1.0:
            raise ConfigError(f"{prefix}.stage1_iters: a fraction must be in [0, 1], got {s}")
        if isinstance(s, int) and s < 0:
            raise ConfigError(f"{prefix}.stage1_iters: a number of steps must be >= 0, got {s}")
        if not 0.0 < self.box_ratio < 1.0:
            raise ConfigError(f"{prefix}.box_ratio: must be in (0, 1), got {self.box_ratio}")
        if self.u_weight < 0:
            raise ConfigError(f"{prefix}.u_weight: must be >= 0, got {self.u_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"{prefix}.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in [0, 1], got {self.threshold}")
        if self.warmup_iters != 0:
            raise ConfigError(
                f"{prefix}.warmup_iters: bcp's labeled-only phase is stage 1 (stage1_iters); must be 0, "
                f"got {self.warmup_iters}"
            )
        if self.labeled_weight is not None:
            raise ConfigError(f"{prefix}.labeled_weight: bcp has no separate labeled term; must be null")
        if self.unlabeled_loss != "ce":
            raise ConfigError(
                f"{prefix}.unlabeled_loss: bcp scores every region with (CE + w·Dice)/(1 + w) "
                f"(dice_weight); must be ce, got {self.unlabeled_loss}"
            )
        self.validate_semi(prefix)

    def stage1_steps(self, total: int) -> int:
        """Steps of stage 1 in a run of ``total`` steps."""
        s = self.stage1_iters
        if isinstance(s, float):
            return int(math.floor(s * total + 0.5))
        return s


@register_method("bcp")
class BCP(PluginHost, Method):
    """Bidirectional Copy-Paste: labeled copy-paste pre-training, then bidirectional copy-paste
    self-training with an EMA teacher, in one run (module docstring)."""

    Config = BCPConfig
    cfg: BCPConfig
    uses_unlabeled = True
    started: Tensor

    def __init__(self, model: Segmenter, cfg: BCPConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.teacher = ModelEma(model, cfg.ema_decay, warmup=False)
        self.recipe = UnlabeledRecipe(cfg, num_classes, cfg.threshold)
        self.register_buffer("started", torch.zeros((), dtype=torch.long))  # 1 once stage 2 began

    @classmethod
    def check_run(cls, cfg: RunConfig) -> None:
        """Pairs need equal, even labeled and unlabeled batches; stage 1 fits in the run."""
        d = cfg.data
        if d.batch_size != d.unlabeled_batch_size or d.batch_size % 2:
            raise ConfigError(
                "data.unlabeled_batch_size: bcp pastes labeled sample i with unlabeled sample i of each "
                "half batch, so data.batch_size and data.unlabeled_batch_size must be equal and even, "
                f"got {d.batch_size} and {d.unlabeled_batch_size}"
            )
        s = cfg.method.stage1_iters
        if isinstance(s, int) and s > cfg.train.iters:
            raise ConfigError(f"method.stage1_iters: {s} steps exceed train.iters ({cfg.train.iters})")

    # -- stages ---------------------------------------------------------------------------------

    def stage1_steps(self, info: StepInfo) -> int:
        return self.cfg.stage1_steps(info.total_steps)

    def in_stage1(self, info: StepInfo) -> bool:
        return info.step < self.stage1_steps(info)

    @torch.no_grad()
    def start_teacher(self) -> None:
        """Stage boundary: the teacher becomes an exact copy of the student (weights and buffers)."""
        for t, s in zip(
            self.teacher.module.state_dict().values(), self.model.state_dict().values(), strict=True
        ):
            t.copy_(s)
        self.teacher.updates.zero_()
        self.started.fill_(1)

    def draw_mask(self, like: Tensor) -> Tensor:
        """This step's mask ``M`` (H×W, 1 outside the box) for images like ``like``."""
        h, w = like.shape[-2:]
        return box_mask(h, w, draw_box(h, w, self.cfg.box_ratio), like.device)

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        if self.in_stage1(info):
            return self.pretrain_step(batch, info)
        if info.step == self.stage1_steps(info):
            self.start_teacher()
        return self.self_train_step(batch, info)

    # -- stage 1 --------------------------------------------------------------------------------

    def pretrain_step(self, batch: Batch, info: StepInfo) -> StepResult:
        """Labeled copy-paste: ``L_mix(f(x_l^a ⊕ x_l^b), y_l^a ⊕ y_l^b; 1, 1)``."""
        mask = self.draw_mask(batch.x_l)
        mix = labeled_copy_paste(batch.x_l, batch.y_l, mask)
        features = self.plugins_train_in_warmup and self.plugins_need_features
        out = self.net(mix.image, return_features=features)
        logits = out.logits if features else out
        loss, ce, dice = mix_loss(logits, mix, mask, self.cfg.dice_weight, self.cfg.dice_squared)
        result = StepResult(loss=loss, logs={"loss_ce": ce, "loss_dice": dice})
        if not self.plugins_train_in_warmup:
            return result
        mixed = Batch(mix.image, mix.target)  # a fully labeled batch: the mixed ground truth
        ctx = StepContext.labeled_only(mixed, info, logits, out.features if features else None)
        return self.add_plugin_losses(ctx, result)

    # -- stage 2 --------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_predict(self, x_u: Tensor, features: bool) -> tuple[Tensor, list[Tensor] | None]:
        """Teacher logits (and encoder features) of the weak views: in train mode one pass per half
        batch (the released code), in eval mode one pass."""
        net = self.teacher.module
        train = self.cfg.teacher_mode == "train"
        k = x_u.shape[0] // 2
        parts = [x_u[:k], x_u[k:]] if train and k > 0 else [x_u]
        with module_mode(net, train):
            outs = [net(p, return_features=features) for p in parts]
        if not features:
            return torch.cat(outs), None
        logits = torch.cat([o.logits for o in outs])
        feats = [torch.cat(level) for level in zip(*(o.features for o in outs))]
        return logits, feats

    def pseudo_labels(self, t_logits: Tensor, ignore: Tensor) -> PseudoLabels:
        """The policy's labels of the teacher's logits (statistics updated), filtered to each
        class's largest connected component."""
        pl = self.recipe.labeler(t_logits, ignore, update=True)
        if not self.cfg.largest_cc:
            return pl
        return pl._replace(label=largest_component(pl.label, self.num_classes, ignore))

    def self_train_step(self, batch: Batch, info: StepInfo) -> StepResult:
        """Bidirectional copy-paste with the teacher's pseudo-labels (module docstring)."""
        cfg = self.cfg
        x_l, y_l, x_w = batch.x_l, batch.y_l, batch.x_w
        assert x_w is not None, "bcp needs unlabeled data (x_w)"
        ignore = batch.ignore if batch.ignore is not None else torch.zeros_like(x_w[:, 0], dtype=torch.uint8)
        need_feats = self.plugins_need_features

        t_logits, t_feats = self.teacher_predict(x_w, need_feats)
        self.recipe.observe_labeled(y_l)
        pl = self.pseudo_labels(t_logits, ignore)
        ramp = sigmoid_rampup(info.step - self.stage1_steps(info), cfg.rampup_iters)

        ctx = None
        teach_u = (pl.score >= pl.threshold).float()
        if len(self.plugins):
            # The plug-ins' view of the step: the student on the un-mixed images (module docstring).
            n_l = x_l.shape[0]
            out = self.net(torch.cat((x_l, x_w)), return_features=need_feats)
            logits, feats = (out.logits, out.features) if need_feats else (out, None)
            ctx = StepContext(
                batch, info, logits[:n_l], logits[n_l:], pl.label, pl.score, ignore,
                features_l=None if feats is None else [f[:n_l] for f in feats],
                features_w=None if feats is None else [f[n_l:] for f in feats],
                teacher_features_w=t_feats,
                labeled_scale=1.0,
                unlabeled_scale=ramp,
            )  # fmt: skip
            weight = self.plugin_pixel_weights(ctx)
            if weight is not None:
                teach_u = teach_u * weight

        pseudo_u = pl.label.masked_fill(ignore == IGNORE_INDEX, IGNORE_INDEX)
        mask = self.draw_mask(x_l)
        u_weight = cfg.u_weight * ramp
        ul, lu = bidirectional_copy_paste(x_l, y_l, x_w, pseudo_u, teach_u, mask, u_weight)
        loss_ul, ce_ul, dice_ul = mix_loss(self.net(ul.image), ul, mask, cfg.dice_weight, cfg.dice_squared)
        loss_lu, ce_lu, dice_lu = mix_loss(self.net(lu.image), lu, mask, cfg.dice_weight, cfg.dice_squared)
        logs: dict[str, Tensor | float] = {
            "loss_ce": ce_ul + ce_lu,
            "loss_dice": dice_ul + dice_lu,
            "loss_ul": loss_ul,
            "loss_lu": loss_lu,
            "u_weight": u_weight,
        }
        logits_l = ctx.logits_l if ctx is not None else t_logits[:0]  # no labeled pass: pl_used only
        logs.update(self.recipe.diagnostics(pl, ignore, logits_l, y_l if ctx is not None else y_l[:0]))
        result = StepResult(loss=loss_ul + loss_lu, logs=logs)
        return result if ctx is None else self.add_plugin_losses(ctx, result)

    def after_step(self, info: StepInfo) -> None:
        """Stage 2: the teacher's EMA update from the student just stepped; then plug-in hooks."""
        if not self.in_stage1(info):
            self.teacher.update(self.model)
        super().after_step(info)

    def eval_model(self) -> nn.Module:
        return self.teacher.module if self.cfg.eval_teacher and bool(self.started) else self.model
