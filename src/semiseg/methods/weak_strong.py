"""The pieces FixMatch and UniMatch share, each called by name from their ``training_step``: the
weak-to-strong consistency config; :func:`unlabeled_ignore` and :func:`mask_ratio`; and on
:class:`WeakStrongMethod` the labeled-only warm-up step, the mix partner's prediction
(:meth:`~WeakStrongMethod.partner_prediction`, the batch flipped), the weak view's pseudo-labels
(:meth:`~WeakStrongMethod.weak_pseudo_labels`), the plug-in context
(:meth:`~WeakStrongMethod.plugin_context`), a strong view mixed with its :class:`PixelTargets`
(:meth:`~WeakStrongMethod.mix_strong_view`: CutMix, ClassMix or SupMix) and the strong forward.

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

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

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
    teacher: Literal["self", "ema"] = "self"
    teacher_decay: float = 0.99  # d of the ema teacher

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


class PixelTargets(NamedTuple):
    """A strong view's per-pixel target before mixing: ``label`` N×H×W, the ``confidence`` that is
    thresholded, the ``ignore`` map (255 = ignored) and a plug-in ``weight`` (``None`` = ones)."""

    label: Tensor
    confidence: Tensor
    ignore: Tensor
    weight: Tensor | None


def mix_targets(
    pl: PseudoLabels,
    ignore: Tensor,
    weights: tuple[Tensor | None, Tensor | None],
    partner: PseudoLabels | None,
) -> tuple[PixelTargets, PixelTargets | None]:
    """The targets a strong view is mixed with: its own weak view's pseudo-labels, and the mix
    partner's (flipped order, like its image ``x_s.flip(0)``; ``None`` without a partner).
    ``weights``: the plug-ins' pixel weights of each (:meth:`PluginHost.plugin_mix_weights`)."""
    own = PixelTargets(pl.label, pl.score, ignore, weights[0])
    if partner is None:
        return own, None
    return own, PixelTargets(partner.label, partner.score, ignore.flip(0), weights[1])


def unlabeled_ignore(batch: Batch) -> Tensor:
    """The unlabeled ignore map (255 = padding), zeros when the batch has none."""
    assert batch.x_w is not None, "this method needs unlabeled data (x_w, x_s1, x_s2)"
    if batch.ignore is not None:
        return batch.ignore
    n, _, h, w = batch.x_w.shape
    return torch.zeros(n, h, w, dtype=torch.uint8, device=batch.x_w.device)


def mask_ratio(confidence: Tensor, ignore: Tensor, threshold: float) -> Tensor:
    """Fraction of non-ignored pixels whose confidence reaches ``threshold`` (logged)."""
    used = ignore != IGNORE_INDEX
    return ((confidence >= threshold) & used).sum() / used.sum().clamp_min(1)


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
    """What FixMatch and UniMatch share: the labeled-only warm-up, the weak view's pseudo-labels,
    the mix partner's prediction, the plug-in context, the mixing of a strong view with its target
    and the strong forward. Each method's ``training_step`` calls them in order."""

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

    def warmup_step(self, batch: Batch, info: StepInfo) -> StepResult:
        """A step inside ``warmup_iters``: the supervised step (labeled pass only), plus the labeled
        terms of plug-ins that train in the warm-up (MPMC's L_l^M)."""
        self.recipe.observe_labeled(batch.y_l)
        return labeled_only_step(self, self.recipe, batch, info, [*self.unlabeled_terms, "mask_ratio"])

    def partner_prediction(self, x_w: Tensor) -> PseudoLabels:
        """Pseudo-labels of each sample's mix partner, predicted on the partner's weak image
        ``x_w.flip(0)`` in eval mode without gradient (UniMatch's ``pred_u_w_mix``), through the
        same policy (statistics not updated: it is the same batch). With ``teacher: ema`` the EMA
        teacher predicts it."""
        if self.teacher is not None:
            with torch.no_grad():
                return self.recipe.labeler(self.teacher(x_w.flip(0)))
        with torch.no_grad(), eval_mode(self.model):
            return self.recipe.labeler(self.model(x_w.flip(0)))

    def weak_pseudo_labels(
        self, batch: Batch, logits_w: Tensor, features: list[Tensor] | None, ignore: Tensor
    ) -> tuple[PseudoLabels, list[Tensor] | None]:
        """The weak view's pseudo-labels (detached) from the policy, whose running statistics first
        see this step's labeled truth and then the labelling prediction: the student's weak logits
        ``logits_w``, or with ``teacher: ema`` the teacher's prediction of ``x_w`` (no gradient).
        Also the teacher's encoder features when ``features`` were asked for (else ``None``)."""
        self.recipe.observe_labeled(batch.y_l)
        if self.teacher is None:
            return self.recipe.labeler(logits_w, ignore, update=True), None
        assert batch.x_w is not None
        with torch.no_grad():
            out = self.teacher(batch.x_w, return_features=features is not None)
        logits_t, features_t = (out.logits, out.features) if features is not None else (out, None)
        return self.recipe.labeler(logits_t, ignore, update=True), features_t

    def plugin_context(
        self,
        batch: Batch,
        info: StepInfo,
        logits_l: Tensor,
        logits_w: Tensor,
        features: list[Tensor] | None,
        ignore: Tensor,
        pl: PseudoLabels,
        teacher_features: list[Tensor] | None,
    ) -> StepContext:
        """What plug-ins see of this step: the joint pass of ``cat(x_l, x_w)`` (its two halves'
        logits, its ``features`` split alike), the weak view's pseudo-labels ``pl`` and ``ignore``
        map, the labelling network's features (``teacher_features`` with ``teacher: ema``, else the
        weak half's, detached), the host's loss multipliers, and whether the strong views' features
        follow (``has_strong_views``)."""
        n_l = logits_l.shape[0]
        features_l = features_w = labelling_features = None
        if features is not None:
            features_l, features_w = [f[:n_l] for f in features], [f[n_l:] for f in features]
            labelling_features = [f[n_l:].detach() for f in features]
        if self.teacher is not None:
            labelling_features = teacher_features
        labeled_scale, unlabeled_scale = self.recipe.scales(info.step, self.cfg.scale)
        return StepContext(
            batch, info, logits_l, logits_w, pl.label, pl.score, ignore,
            features_l=features_l,
            features_w=features_w,
            teacher_features_w=labelling_features,
            has_strong_views=self.plugins_need_strong_features,
            labeled_scale=labeled_scale,
            unlabeled_scale=unlabeled_scale,
        )  # fmt: skip

    def after_step(self, info: StepInfo) -> None:
        """The EMA teacher's update from the student just stepped (``teacher: ema``), then plug-in
        hooks."""
        if self.teacher is not None:
            self.teacher.update(self.model)
        super().after_step(info)

    def mix_strong_view(
        self, x_s: Tensor, box: Tensor | None, own: PixelTargets, partner: PixelTargets | None, batch: Batch
    ) -> MixSample:
        """Strong view ``x_s`` mixed by the configured mixer, with its target mixed alike: ``own``
        (the weak pseudo-labels) outside the mixed region; inside it the partner's (``partner``,
        already in flipped order, pasted with the image ``x_s.flip(0)``: CutMix in ``box`` /
        ClassMix) or the labeled ground truth (SupMix, eq. 10–11, weight 1). With a plug-in that
        reads strong-view features, the result carries a provenance map (``source``)."""
        track = self.plugins_need_strong_features

        def origin(like: Tensor, value: int) -> Tensor | None:
            return torch.full(like.shape, value, dtype=torch.uint8, device=like.device) if track else None

        own_sample = MixSample(x_s, *own, origin(own.label, SOURCE_OWN))
        partner_sample = None
        if partner is not None:
            partner_sample = MixSample(x_s.flip(0), *partner, origin(partner.label, SOURCE_PARTNER))
        labeled = None
        if self.mixer.needs_labeled:
            x_src = batch.x_ls if self.mixer.labeled_strong else batch.x_l
            assert x_src is not None, "mixer.source=strong needs the labeled strong view (batch.x_ls)"
            labeled = labeled_source(x_src, batch.y_l, x_s.shape[0], own.weight is not None)
            labeled = labeled._replace(source=origin(labeled.label, SOURCE_LABELED))
        return self.mixer(own_sample, partner_sample, labeled, box)

    def strong_forward(self, views: list[MixSample], ctx: StepContext) -> list[Tensor]:
        """Logits of the mixed strong ``views``, one forward of their concatenation. When
        ``ctx.has_strong_views`` (a plug-in reads them), also their encoder features and provenance
        maps, handed to plug-ins as ``ctx.features_s`` / ``ctx.sources_s``."""
        images = views[0].image if len(views) == 1 else torch.cat([v.image for v in views])
        if not ctx.has_strong_views:
            logits = self.net(images)
            return [logits] if len(views) == 1 else list(logits.chunk(len(views)))
        out = self.net(images, return_features=True)
        per_level = [feat.chunk(len(views)) for feat in out.features]
        ctx.features_s = [[chunks[v] for chunks in per_level] for v in range(len(views))]
        ctx.sources_s = [v.source for v in views]  # type: ignore[misc]
        return list(out.logits.chunk(len(views)))
