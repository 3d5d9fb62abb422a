"""Machinery FixMatch and UniMatch share: the weak-to-strong consistency config, the mix-source
(partner) prediction and the assembly of each strong view's target (UniMatch's training step,
with CutMix, ClassMix or SupMix as the mixer).

Pseudo-labels come from the method's :class:`~semiseg.methods.semi.UnlabeledRecipe` (its policy:
fixed τ by default, FreeMatch / FlexMatch masks, distribution alignment): a pixel teaches iff its
``score ≥ threshold`` (for the fixed policy: confidence ≥ τ, exactly UniMatch's rule).

**Which network labels** (``method.teacher``). ``self`` (default, the methods' own): the student's
weak pass labels the weak view (train mode, in the joint ``cat(x_l, x_w)`` forward) and the student
in eval mode predicts the mix partner. ``ema``: a :class:`~semiseg.ema.ModelEma` of the student
(decay ``teacher_decay``, Mean Teacher's ``min(d, 1 − 1/(k+1))`` warm-up; eval mode, no gradient;
updated after every optimizer step in :meth:`WeakStrongMethod.after_step`, warm-up steps included;
saved in ``state_dict`` as ``teacher.*``) predicts both: the weak view's pseudo-labels, the policy's
running statistics and the partner's prediction. The student's joint pass stays, since its gradient
is needed (the labeled loss, UniMatch's feature-perturbation branch, plug-ins reading
``ctx.logits_w`` / ``features_w``); plug-ins see the teacher's encoder features as
``ctx.teacher_features_w``. Both options are hash-neutral at their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..config import HASH_NEUTRAL
from ..ema import ModelEma
from ..errors import ConfigError
from ..mixers import MixConfig, MixSample, StrongMixer, labeled_source
from ..models.base import Segmenter
from ..modes import eval_mode
from ..plugins.base import PluginHost, StepContext
from ..pseudo_labels import PseudoLabels
from ..step import StepResult
from ..types import IGNORE_INDEX, SOURCE_LABELED, SOURCE_OWN, SOURCE_PARTNER
from .base import Batch, Method, StepInfo
from .semi import SemiSupervisedConfig, UnlabeledRecipe


@dataclass
class ConsistencyConfig(MixConfig, SemiSupervisedConfig):
    """Options shared by the weak-to-strong consistency methods (FixMatch, UniMatch)."""

    threshold: float = 0.95  # τ: pseudo-labels with confidence ≥ τ are used (the `fixed` policy)
    scale: float = 0.5  # total = scale·(loss_x + weighted unlabeled losses)  (UniMatch's "/2")
    # Which network makes the pseudo-labels, the policy's statistics and the mix partner's
    # prediction: the student itself (self) or an EMA of it (ema; module docstring).
    teacher: Literal["self", "ema"] = field(default="self", metadata={HASH_NEUTRAL: True})
    teacher_decay: float = field(default=0.99, metadata={HASH_NEUTRAL: True})  # d of the ema teacher

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.teacher_decay < 1.0:
            raise ConfigError(f"{prefix}.teacher_decay: must be in [0, 1), got {self.teacher_decay}")
        if self.scale <= 0:
            raise ConfigError(f"{prefix}.scale: must be > 0, got {self.scale}")
        for name, value in vars(self).items():
            if name.startswith("weight_") and value < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {value}")
        self.validate_semi(prefix)
        self.validate_mix(prefix)


def labeled_only_step(
    host: PluginHost, recipe: UnlabeledRecipe, batch: Batch, info: StepInfo, names: list[str]
) -> StepResult:
    """A labeled-only warm-up step of ``host`` (a :class:`Method` with plug-ins): the loss is
    ``labeled_loss(f(x_l), y_l)`` with the unlabeled ``names`` logged as 0, plus the terms of the
    plug-ins that train in the warm-up (MPMC's L_l^M) on a :meth:`StepContext.labeled_only`."""
    assert isinstance(host, Method)
    features = host.plugins_train_in_warmup and host.plugins_need_features
    out = host.net(batch.x_l, return_features=features)
    logits = out.logits if features else out
    result = recipe.warmup_result(host.cfg.labeled_loss(logits, batch.y_l), names)
    if not host.plugins_train_in_warmup:
        return result
    ctx = StepContext.labeled_only(batch, info, logits, out.features if features else None)
    return host.add_plugin_losses(ctx, result)


class WeakStrongMethod(PluginHost, Method):
    """Machinery shared by FixMatch and UniMatch: pseudo-labels, mix-source prediction,
    strong-view targets, the labeled-only warm-up."""

    uses_unlabeled = True
    cfg: ConsistencyConfig
    unlabeled_terms: tuple[str, ...] = ()  # loss names logged as 0 during the warm-up

    def __init__(self, model: Segmenter, cfg: ConsistencyConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.mixer = StrongMixer(cfg, num_classes)
        self.recipe = UnlabeledRecipe(cfg, num_classes, cfg.threshold)
        # method.teacher: ema — the labelling network (module docstring); None: the student labels
        self.teacher: ModelEma | None = ModelEma(model, cfg.teacher_decay) if cfg.teacher == "ema" else None

    @property
    def needs_labeled_strong(self) -> bool:
        return self.mixer.labeled_strong

    @staticmethod
    def unlabeled_ignore(batch: Batch) -> Tensor:
        """The unlabeled ignore map (255 = padding), zeros when the batch has none."""
        assert batch.x_w is not None, "this method needs unlabeled data (x_w, x_s1, x_s2)"
        if batch.ignore is not None:
            return batch.ignore
        n, _, h, w = batch.x_w.shape
        return torch.zeros(n, h, w, dtype=torch.uint8, device=batch.x_w.device)

    def warmup_step(self, batch: Batch, info: StepInfo) -> StepResult | None:
        """During ``warmup_iters``: the supervised step (labeled pass only), plus the labeled terms
        of plug-ins that train in the warm-up (MPMC's L_l^M); else ``None``."""
        if not self.recipe.in_warmup(info.step):
            return None
        self.recipe.observe_labeled(batch.y_l)
        return labeled_only_step(self, self.recipe, batch, info, [*self.unlabeled_terms, "mask_ratio"])

    def weak_context(
        self, batch: Batch, info: StepInfo, logits: Tensor, features: list[Tensor] | None, ignore: Tensor
    ) -> tuple[StepContext, PseudoLabels]:
        """Plug-in context of the joint ``cat(x_l, x_w)`` pass, with the policy's pseudo-labels
        (its running statistics updated from this step's labeled truth and weak prediction)."""
        n_l = batch.x_l.shape[0]
        self.recipe.observe_labeled(batch.y_l)
        weak, teacher_features = logits[n_l:], None
        if self.teacher is not None:  # method.teacher: ema labels the weak view
            assert batch.x_w is not None
            with torch.no_grad():
                out = self.teacher(batch.x_w, return_features=features is not None)
            weak, teacher_features = (out.logits, out.features) if features is not None else (out, None)
        pl = self.recipe.labeler(weak, ignore, update=True)
        ctx = StepContext.from_joint_pass(batch, info, logits, features, n_l, ignore, (pl.label, pl.score))
        if self.teacher is not None:
            ctx.teacher_features_w = teacher_features
            ctx.extras["teacher_logits_w"] = weak
        ctx.extras["threshold"] = pl.threshold
        ctx.labeled_scale, ctx.unlabeled_scale = self.recipe.scales(info.step, self.cfg.scale)
        if self.plugins_need_strong_features:
            ctx.features_s = []  # filled by strong_forward
        return ctx, pl

    def partner_prediction(self, x_w: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo-label and score of each sample's mix partner, predicted on the partner's weak
        image ``x_w.flip(0)`` in eval mode without gradient (UniMatch's ``pred_u_w_mix``), through
        the same policy (statistics not updated: it is the same batch). With ``teacher: ema`` the
        EMA teacher predicts it."""
        if self.teacher is not None:
            with torch.no_grad():
                pl = self.recipe.labeler(self.teacher(x_w.flip(0)))
            return pl.label, pl.score
        with torch.no_grad(), eval_mode(self.model):
            pl = self.recipe.labeler(self.model(x_w.flip(0)))
        return pl.label, pl.score

    def after_step(self, info: StepInfo) -> None:
        """The EMA teacher's update from the student just stepped (``teacher: ema``), then plug-in
        hooks."""
        if self.teacher is not None:
            self.teacher.update(self.model)
        super().after_step(info)

    def mix_weights(
        self, ctx: StepContext, partner: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Plug-in pixel weights ``(own, partner)``: of the weak view's pixels, and of the partner's
        pixels for the pseudo-labels the mix pastes with them (see :class:`PluginHost`)."""
        return self.plugin_mix_weights(ctx, None if partner is None else partner[0])

    def strong_target(
        self,
        x_s: Tensor,
        box: Tensor | None,
        ctx: StepContext,
        weights: tuple[Tensor | None, Tensor | None],
        partner: tuple[Tensor, Tensor] | None,
    ) -> MixSample:
        """Mixed strong view with its target: own weak pseudo-label outside the mixed region; inside
        it, the partner's (CutMix / ClassMix) or the labeled ground truth (SupMix, eq. 10–11).
        ``weights``: :meth:`mix_weights`. With a plug-in that reads strong-view features, the
        result carries a provenance map (``source``)."""
        track = self.plugins_need_strong_features

        def origin(like: Tensor, value: int) -> Tensor | None:
            return torch.full(like.shape, value, dtype=torch.uint8, device=like.device) if track else None

        own_weight, partner_weight = weights
        own_origin = origin(ctx.pseudo_w, SOURCE_OWN)
        own = MixSample(x_s, ctx.pseudo_w, ctx.conf_w, ctx.ignore, own_weight, own_origin)
        partner_sample = None
        if partner is not None:
            partner_sample = MixSample(
                x_s.flip(0),
                partner[0],
                partner[1],
                ctx.ignore.flip(0),
                partner_weight,
                origin(partner[0], SOURCE_PARTNER),
            )
        labeled = None
        if self.mixer.needs_labeled:
            x_src = ctx.batch.x_ls if self.mixer.labeled_strong else ctx.batch.x_l
            assert x_src is not None, "supmix_source=strong needs the labeled strong view (batch.x_ls)"
            labeled = labeled_source(x_src, ctx.batch.y_l, x_s.shape[0], own_weight is not None)
            labeled = labeled._replace(source=origin(labeled.label, SOURCE_LABELED))
        return self.mixer(own, partner_sample, labeled, box)

    def strong_forward(self, ctx: StepContext, targets: list[MixSample]) -> list[Tensor]:
        """Logits of the mixed strong views, one forward of their concatenation; with a plug-in that
        reads strong-view features, also fills ``ctx.features_s`` / ``ctx.sources_s``."""
        images = targets[0].image if len(targets) == 1 else torch.cat([t.image for t in targets])
        if not self.plugins_need_strong_features:
            logits = self.net(images)
            return [logits] if len(targets) == 1 else list(logits.chunk(len(targets)))
        out = self.net(images, return_features=True)
        per_view = [feat.chunk(len(targets)) for feat in out.features]
        ctx.features_s = [[chunks[v] for chunks in per_view] for v in range(len(targets))]
        ctx.sources_s = [t.source for t in targets]  # type: ignore[misc]
        return list(out.logits.chunk(len(targets)))

    def unlabeled_loss(self, logits: Tensor, target: MixSample, threshold: float) -> Tensor:
        """One unlabeled term against a (mixed) target, with the recipe's loss."""
        return self.recipe.loss(
            logits, target.label, target.confidence, target.ignore, threshold, target.weight
        )

    def finish(
        self,
        ctx: StepContext,
        pl: PseudoLabels,
        losses: dict[str, Tensor],
        loss_x: Tensor,
        terms: list[Tensor],
    ) -> StepResult:
        """The step's result: the loss from ``loss_x`` and the weighted unlabeled ``terms``; logged
        ``losses``, mixer statistics, the mask ratio and pseudo-label diagnostics; plug-in terms."""
        loss = self.recipe.total(loss_x, terms, self.cfg.scale, ctx.info.step)
        self.mixer.observe(ctx.logits_l, ctx.batch.y_l, ctx.pseudo_w, ctx.conf_w, ctx.ignore)
        losses["mask_ratio"] = self.mask_ratio(ctx, pl.threshold)
        losses.update(self.recipe.diagnostics(pl, ctx.ignore, ctx.logits_l, ctx.batch.y_l))
        return self.add_plugin_losses(ctx, StepResult(loss=loss, logs=losses))

    def mask_ratio(self, ctx: StepContext, threshold: float | None = None) -> Tensor:
        """Fraction of non-ignored weak pixels whose pseudo-label passes the mask (logged)."""
        used = ctx.ignore != IGNORE_INDEX
        tau = self.cfg.threshold if threshold is None else threshold
        return ((ctx.conf_w >= tau) & used).sum() / used.sum().clamp_min(1)
