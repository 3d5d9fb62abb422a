"""Multi-scale Patch-based Multi-label Classifier (MPMC; Howlader et al., "Beyond Pixels", §3.3,
eq. 2–7), as the paper describes it, as a plug-in on any host (FixMatch, UniMatch, Mean Teacher)
and any mixer.

A small head ``g`` (:class:`MPMCHead`, eq. 2) on an early encoder feature ``z = f_τ(x)`` (``tap``)
predicts, at every location ``r`` of that feature map, which classes occur in the image patch the
location sees:

* ``L_l^M`` (eq. 3–4): the head's asymmetric loss on labeled patches, whose targets are a max-pool
  of the one-hot ground truth over each location's patch;
* ``γ_r = softmax_c`` of the teacher head's logits on the weak view: λ_s (eq. 5) weights each
  pixel's unlabeled host losses by γ at its pseudo-label class and nearest location
  (:meth:`MPMC.pixel_weights`); λ_m = γ weights ``L_u^M`` (eq. 6), the student head's BCE on the
  strong view against the teacher's ``q``;
* ``L = L_l + L_l^M + α·L_u + β·L_u^M`` (eq. 7): the plug-in adds ``s_l·weight_labeled·L_l^M +
  s_u·β·L_u^M`` to the host's ``total`` (``s_l, s_u``: the host's own multipliers at that step).

The head has its own SGD, stepped on ``total``'s gradient (``optimizer_on_total``). Patch geometry,
targets, losses and the tap probe are in :mod:`semiseg.plugins.mpmc_ops`. The full description
(head, patches, teacher and student, weights, options, differences from the released code) is
docs/methods/mpmc.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.base import Segmenter
from ..modes import eval_mode
from ..types import IGNORE_INDEX, SOURCE_LABELED, SOURCE_PARTNER, StepInfo
from .base import OwnOptimizerPlugin, PluginConfig, StepContext, register_plugin
from .mpmc_ops import (
    PROBE_SIZES,
    PatchGeometry,
    TapProbe,
    asymmetric_loss,
    labeled_patch_loss,
    location_sources,
    masked_location_mean,
    nearest_location,
    patch_geometry,
    patch_targets,
    pixel_confidence,
    pool_patches,
    probe_tap,
    unlabeled_patch_loss,
)

__all__ = [
    "MPMC",
    "PROBE_SIZES",
    "MPMCConfig",
    "MPMCHead",
    "PatchGeometry",
    "SeparableAvgPool2d",
    "TapProbe",
    "asymmetric_loss",
    "conv_bn_relu",
    "labeled_patch_loss",
    "location_sources",
    "masked_location_mean",
    "nearest_location",
    "patch_geometry",
    "patch_targets",
    "pixel_confidence",
    "pool_patches",
    "probe_tap",
    "unlabeled_patch_loss",
]


@dataclass
class MPMCConfig(PluginConfig):
    """``plugins.mpmc`` options (paper values where it gives them; see docs/methods/mpmc.md)."""

    tap: int | None = None  # encoder feature index; null: the first one with stride > 1
    pool_sizes: list[int] = field(default_factory=lambda: [7, 19])  # s_0, s_1 (odd, stride 1)
    pool_count_include_pad: bool = False  # True: the released code's nn.AvgPool2d default
    channels: list[int] | None = None  # width of each conv block; null: 3 blocks as wide as the tap
    patch_size: int | None = None  # null: the tap's receptive field (measured); the stride is the tap's
    labeled: bool = True  # MPMC-L: the labeled patch loss L_l^M (eq. 3–4)
    unlabeled: bool = True  # MPMC-UL: λ_s (eq. 5) and the unlabeled patch loss L_u^M (eq. 6)
    weight_labeled: float = 1.0  # weight of L_l^M in eq. 7
    beta: float = 0.25  # β of eq. 7 (main text; the supplement's best is 0.15)
    scale: float | None = None  # null: the host's labeled / unlabeled multipliers of the step (eq. 7)
    gamma_pos: float = 0.0  # γ+ of eq. 3
    gamma_neg: float = 1.0  # γ− of eq. 3
    confidence_from: Literal["logits", "probs"] = "logits"  # γ = softmax(logits) or softmax(σ(logits))
    # eq. 5's γ, or σ(q): the class occurs in the patch (added after cells were recorded: hash-neutral)
    lambda_s: Literal["gamma", "presence"] = "gamma"
    unlabeled_target: Literal["soft", "hard"] = "soft"  # eq. 6 target: teacher q, or [q ≥ ½]
    student_input: Literal["auto", "strong", "features", "perturbed"] = "auto"  # student MPMC input
    fp_dropout: float = 0.5  # Dropout2d of the perturbed student input
    warmup_iters: int = 0  # before this step: λ_s = 1 and no L_u^M (L_l^M trains from step 0,
    # the host's labeled-only warm-up included)
    lr: float = 0.01  # the head's SGD (set to the run's optim.lr × optim.lr_multi)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    poly_power: float = 0.9  # lr·(1 − step/total)^power, per step

    def validate(self, prefix: str) -> None:
        if any(k < 1 or k % 2 == 0 for k in self.pool_sizes):
            raise ConfigError(
                f"{prefix}.pool_sizes: need odd sizes >= 1 (same padding), got {self.pool_sizes}"
            )
        if self.channels is not None and (not self.channels or any(c < 1 for c in self.channels)):
            raise ConfigError(f"{prefix}.channels: need positive widths, got {self.channels}")
        if self.patch_size is not None and self.patch_size < 1:
            raise ConfigError(f"{prefix}.patch_size: must be >= 1, got {self.patch_size}")
        if self.scale is not None and self.scale < 0:
            raise ConfigError(f"{prefix}.scale: must be >= 0 or null, got {self.scale}")
        if not (self.labeled or self.unlabeled):
            raise ConfigError(f"{prefix}: labeled and unlabeled are both false (remove plugins.mpmc)")
        for name in ("weight_labeled", "beta", "gamma_pos", "gamma_neg", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.fp_dropout < 1.0:
            raise ConfigError(f"{prefix}.fp_dropout: must be in [0, 1), got {self.fp_dropout}")
        if self.warmup_iters < 0:
            raise ConfigError(f"{prefix}.warmup_iters: must be >= 0, got {self.warmup_iters}")
        if self.lr <= 0:
            raise ConfigError(f"{prefix}.lr: must be > 0, got {self.lr}")


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SeparableAvgPool2d(nn.Module):
    """``k×k`` average pooling, stride 1, "same" padding: equal to ``nn.AvgPool2d(k, 1, k // 2,
    count_include_pad=...)`` but computed as two 1-D box sums of cumulative sums (at least float32), a
    constant cost per output instead of ``k²`` (12× faster for ``k = 19`` on a CPU). Without
    ``count_include_pad`` the divisor is the number of real pixels in the window: the product of the
    row and column counts."""

    def __init__(self, kernel_size: int, count_include_pad: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.count_include_pad = count_include_pad

    def _box_sum(self, x: Tensor, dim: int) -> Tensor:
        k, p, n = self.kernel_size, self.kernel_size // 2, x.shape[dim]
        pad = (0, 0, p + 1, p) if dim == 2 else (p + 1, p)  # a leading 0 makes window sums differences
        c = F.pad(x, pad).cumsum(dim)
        return c.narrow(dim, k, n) - c.narrow(dim, 0, n)

    def _count(self, n: int, device: torch.device) -> Tensor:
        if self.count_include_pad:
            return torch.full((n,), float(self.kernel_size), device=device)
        i, p = torch.arange(n, device=device), self.kernel_size // 2
        return ((i + p).clamp(max=n - 1) - (i - p).clamp(min=0) + 1).float()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        total = self._box_sum(self._box_sum(x.to(torch.promote_types(x.dtype, torch.float32)), 2), 3)
        count = self._count(h, x.device)[:, None] * self._count(w, x.device)[None, :]
        return (total / count.to(total.dtype)).to(x.dtype)


class MPMCHead(nn.Module):
    """Eq. 2 up to the sigmoid: multi-scale concat → conv blocks ``M`` → 1×1 linear → C logits/location."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: list[int],
        pool_sizes: list[int],
        count_include_pad: bool = False,
    ) -> None:
        super().__init__()
        self.pools = nn.ModuleList(SeparableAvgPool2d(k, count_include_pad) for k in pool_sizes)
        blocks: list[nn.Module] = []
        width = in_channels * (1 + len(pool_sizes))
        for out in channels:  # one block: 3×3 → 3×3 → 1×1, each conv + BN + ReLU (§4.1)
            blocks += [conv_bn_relu(width, out, 3), conv_bn_relu(out, out, 3), conv_bn_relu(out, out, 1)]
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)  # W, b of eq. 2

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.blocks(torch.cat([z, *(pool(z) for pool in self.pools)], dim=1)))


# ----------------------------------------------------------------------------------------------
# The plug-in
# ----------------------------------------------------------------------------------------------


@dataclass
class _StepState:
    """What one training step's hooks share (kept in ``ctx.extras['mpmc']``)."""

    labeled: bool
    unlabeled: bool
    targets_l: Tensor | None = None  # N_l×C×h×w patch targets
    valid_l: Tensor | None = None  # N_l×h×w
    teacher_logits: Tensor | None = None  # N_u×C×h×w, detached (weak view)
    gamma: Tensor | None = None  # N_u×C×h×w: γ = λ_m (weak view)
    valid_u: Tensor | None = None  # N_u×h×w (weak view)
    students: list[Tensor] | None = None  # student inputs (one per strong view, or one)
    student_targets: tuple[Tensor, Tensor, Tensor] | None = None  # (teacher logits, γ, valid) per location
    dropout: Tensor | None = None  # N_u×C×1×1 multiplier of a perturbed student input
    logged: Tensor | None = None  # detached sum of the terms :meth:`MPMC.losses` returned
    lambda_s: Tensor | None = None  # detached λ_s of the weak view's pixels (N_u×H×W)


def _by_source(own: Tensor, where_partner: Tensor) -> Tensor:
    """``own`` (N×…×h×w) with the flipped batch's values where ``where_partner`` (N×h×w) is set."""
    mask = where_partner if own.dim() == where_partner.dim() else where_partner.unsqueeze(1)
    return torch.where(mask, own.flip(0), own)


@register_plugin("mpmc")
class MPMC(OwnOptimizerPlugin):
    """MPMC plug-in: patch multi-label head, asymmetric loss, adaptive λ_s / λ_m (module docstring)."""

    Config = MPMCConfig
    cfg: MPMCConfig
    needs_unlabeled = True
    needs_features = True
    optimizer_on_total = True  # the head appears in total only through L_l^M and L_u^M

    def __init__(self, cfg: MPMCConfig, num_classes: int, model: Segmenter, total_steps: int) -> None:
        super().__init__(cfg, num_classes, model, total_steps)
        probe = probe_tap(model, cfg.tap)
        self.tap = probe.index
        self.geometry = patch_geometry(probe, cfg.patch_size)
        widths = list(cfg.channels) if cfg.channels is not None else [probe.channels] * 3
        self.head = MPMCHead(
            probe.channels, num_classes, widths, list(cfg.pool_sizes), cfg.pool_count_include_pad
        )

    @property
    def needs_strong_features(self) -> bool:
        return self.cfg.unlabeled and self.cfg.student_input in ("auto", "strong")

    @property
    def trains_in_warmup(self) -> bool:
        return self.cfg.labeled

    # -- shared per-step state ----------------------------------------------------------------

    def state(self, ctx: StepContext) -> _StepState:
        """Targets, teacher output and student inputs of this step, computed once (``ctx.extras``;
        the student part once the host has filled the strong views' features)."""
        cached = ctx.extras.get(self.name)
        st = cached if isinstance(cached, _StepState) else self._weak_state(ctx)
        ctx.extras[self.name] = st
        if st.unlabeled and st.students is None and not self._awaits_strong(ctx):
            self._student_state(ctx, st)
        return st

    def _weak_state(self, ctx: StepContext) -> _StepState:
        """Labeled patch targets and the teacher's output on the weak view."""
        if ctx.features_l is None or (not ctx.warmup and ctx.teacher_features_w is None):
            raise RuntimeError("mpmc: the host method must pass encoder features (needs_features)")
        cfg = self.cfg
        unlabeled = cfg.unlabeled and not ctx.warmup and ctx.info.step >= cfg.warmup_iters
        st = _StepState(labeled=cfg.labeled, unlabeled=unlabeled)
        if st.labeled:
            size = tuple(ctx.features_l[self.tap].shape[-2:])
            st.targets_l, st.valid_l = patch_targets(ctx.batch.y_l, self.num_classes, self.geometry, size)
        if st.unlabeled:
            assert ctx.teacher_features_w is not None
            z_t = ctx.teacher_features_w[self.tap]
            st.teacher_logits = self.teacher(z_t)
            st.gamma = self.confidence(st.teacher_logits)
            used = (ctx.ignore != IGNORE_INDEX).unsqueeze(1).float()
            st.valid_u = pool_patches(used, self.geometry, tuple(z_t.shape[-2:]))[:, 0] > 0
        return st

    def _awaits_strong(self, ctx: StepContext) -> bool:
        """Whether the student input is the strong views' features, not yet in ``ctx`` (λ_s is asked
        for before the strong forward)."""
        return self._student_mode(ctx) == "strong" and ctx.has_strong_views and ctx.features_s is None

    def _student_mode(self, ctx: StepContext) -> str:
        mode = self.cfg.student_input
        if mode != "auto":
            return mode
        if ctx.has_strong_views:  # the host passes them (after its strong forward)
            return "strong"
        assert ctx.features_w is not None and ctx.teacher_features_w is not None
        same = ctx.features_w[self.tap].data_ptr() == ctx.teacher_features_w[self.tap].data_ptr()
        return "perturbed" if same else "features"  # Mean Teacher: its student view is the strong one

    def _student_state(self, ctx: StepContext, st: _StepState) -> None:
        """The student MPMC's inputs and, per location, the teacher's target, γ and validity."""
        assert st.teacher_logits is not None and st.gamma is not None and st.valid_u is not None
        mode = self._student_mode(ctx)
        if mode == "strong":
            if not ctx.features_s:
                raise RuntimeError("mpmc.student_input: strong needs a host that passes strong-view "
                                   "features (FixMatch, UniMatch)")  # fmt: skip
            size = tuple(st.teacher_logits.shape[-2:])
            views, targets = [], []
            for feats, sources in zip(ctx.features_s, ctx.sources_s or [None] * len(ctx.features_s)):
                z = feats[self.tap]
                if tuple(z.shape[-2:]) != size:
                    got = tuple(z.shape[-2:])
                    raise RuntimeError(f"mpmc: strong-view features {got} != the weak view's {size}")
                views.append(z)
                if sources is None:
                    targets.append((st.teacher_logits, st.gamma, st.valid_u))
                    continue
                origin = location_sources(sources, self.geometry, size)
                partner = origin == SOURCE_PARTNER
                valid = _by_source(st.valid_u, partner) & (origin != SOURCE_LABELED)
                targets.append((_by_source(st.teacher_logits, partner), _by_source(st.gamma, partner), valid))
            st.students = [torch.cat(views)] if len(views) > 1 else views
            t_logits, gamma, valid = (torch.cat(parts) for parts in zip(*targets))
            st.student_targets = (t_logits, gamma, valid)
            return
        assert ctx.features_w is not None
        z_s = ctx.features_w[self.tap]
        st.students = [z_s]
        st.student_targets = (st.teacher_logits, st.gamma, st.valid_u)
        if mode == "perturbed":
            keep = 1.0 - self.cfg.fp_dropout
            mask = torch.rand(z_s.shape[0], z_s.shape[1], 1, 1, device=z_s.device) < keep
            st.dropout = mask.to(z_s.dtype) / keep

    @torch.no_grad()
    def teacher(self, z: Tensor) -> Tensor:
        """Teacher MPMC logits (eval mode, no gradient, float32) on a teacher feature."""
        with eval_mode(self.head):
            return self.head(z.detach()).float()

    def confidence(self, teacher_logits: Tensor) -> Tensor:
        """γ = softmax over classes of the teacher's logits (or of its probabilities: ``probs``)."""
        scores = teacher_logits if self.cfg.confidence_from == "logits" else torch.sigmoid(teacher_logits)
        return scores.float().softmax(dim=1)

    # -- hooks ----------------------------------------------------------------------------------

    def pixel_weights(self, ctx: StepContext) -> Tensor | None:
        """λ_s (eq. 5), N_u×H×W in the weak view's geometry; None while MPMC-UL is off."""
        st = self.state(ctx)
        if not st.unlabeled:
            return None
        assert st.gamma is not None
        weights = pixel_confidence(self.pixel_scores(st), ctx.pseudo_w, self.geometry)
        st.lambda_s = weights.detach()
        return weights

    def pixel_scores(self, st: _StepState) -> Tensor:
        """Per class and location, what λ_s reads at a pixel's pseudo-label class: eq. 5's γ, or
        (``lambda_s: presence``, not the paper) σ(q), the teacher's probability that the class occurs
        in the patch — an ideal teacher gives every pixel's true class 1 there, thin classes included."""
        assert st.gamma is not None and st.teacher_logits is not None
        return st.gamma if self.cfg.lambda_s == "gamma" else torch.sigmoid(st.teacher_logits)

    def diagnostics(self, ctx: StepContext) -> dict[str, Tensor]:
        """``lambda_s/<c>``: mean λ_s of this step's weak-view pixels pseudo-labelled ``c`` (classes
        that occur), so a class whose unlabeled loss eq. 5 down-weights shows while training."""
        st = ctx.extras.get(self.name)
        if not isinstance(st, _StepState) or st.lambda_s is None or ctx.pseudo_w is None:
            return {}
        classes = ctx.pseudo_w.long().flatten()
        keep = (classes >= 0) & (classes < self.num_classes)
        classes, lam = classes[keep], st.lambda_s.flatten()[keep].float()
        counts = torch.bincount(classes, minlength=self.num_classes)
        sums = torch.bincount(classes, weights=lam, minlength=self.num_classes)
        return {f"lambda_s/{c}": sums[c] / counts[c] for c in range(self.num_classes) if counts[c] > 0}

    def partner_pixel_weights(self, ctx: StepContext, labels: Tensor, own: Tensor) -> Tensor:
        """λ_s of the flipped batch's pixels for the labels the mix pastes (the partner's eval-mode
        pseudo-labels): the partner's γ (or presence) at those classes (eq. 5)."""
        return pixel_confidence(self.pixel_scores(self.state(ctx)).flip(0), labels, self.geometry)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        """``s_l·weight_labeled·L_l^M`` and ``s_u·β·L_u^M``, added to ``total``: their gradient
        reaches the encoder and the head (``optimizer_on_total``: the head's SGD steps on it)."""
        terms = self._terms(ctx)
        st = self.state(ctx)
        st.logged = sum(t.detach() for t in terms.values()) if terms else None  # type: ignore[assignment]
        return terms

    def optimizer_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        """The MPMC terms of this step (``optimizer_on_total``: the host logs them as
        ``total/mpmc`` and steps the head, whose gradient came from the segmenter's loss); nothing
        when no term trains it."""
        st = self.state(ctx)
        return {} if st.logged is None else {self.name: st.logged}

    def scales(self, ctx: StepContext) -> tuple[float, float]:
        """``(s_l, s_u)`` of eq. 7's MPMC terms: the host's multipliers, or ``scale`` for both."""
        if self.cfg.scale is not None:
            return self.cfg.scale, self.cfg.scale
        return ctx.labeled_scale, ctx.unlabeled_scale

    def _terms(self, ctx: StepContext) -> dict[str, Tensor]:
        st, cfg = self.state(ctx), self.cfg
        s_l, s_u = self.scales(ctx)
        inputs: list[Tensor] = []
        if st.labeled:
            assert ctx.features_l is not None
            inputs.append(ctx.features_l[self.tap])
        if st.unlabeled:
            assert st.students is not None
            inputs += st.students
        outputs = self._student(inputs, st.dropout)
        terms: dict[str, Tensor] = {}
        if st.labeled:
            assert st.targets_l is not None and st.valid_l is not None
            loss = labeled_patch_loss(outputs[0], st.targets_l, st.valid_l, cfg.gamma_pos, cfg.gamma_neg)
            terms["loss_l"] = s_l * cfg.weight_labeled * loss
        if st.unlabeled:
            assert st.student_targets is not None
            t_logits, gamma, valid = st.student_targets
            hard = cfg.unlabeled_target == "hard"
            terms["loss_u"] = s_u * cfg.beta * unlabeled_patch_loss(outputs[-1], t_logits, gamma, valid, hard)
        return terms

    def _student(self, inputs: list[Tensor], dropout: Tensor | None) -> list[Tensor]:
        """Head logits of each input: one batch (shared BatchNorm statistics) when sizes agree; a
        Dropout2d-perturbed last input (``dropout``) runs on its own, out of the running statistics."""
        if dropout is not None:
            with self._frozen_statistics():
                perturbed = self.head(inputs[-1] * dropout)
            return [*self._student(inputs[:-1], None), perturbed]
        if len(inputs) > 1 and all(z.shape[1:] == inputs[0].shape[1:] for z in inputs):
            return list(self.head(torch.cat(inputs)).split([z.shape[0] for z in inputs]))
        return [self.head(z) for z in inputs]

    @contextmanager
    def _frozen_statistics(self) -> Iterator[None]:
        """BatchNorm running statistics (and batch counts) of the head left untouched inside."""
        norms = [m for m in self.head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [
            (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
            for m in norms
        ]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, tracked) in zip(norms, saved):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    # -- the head's optimizer -------------------------------------------------------------------

    def make_optimizer(self) -> torch.optim.Optimizer:
        """SGD over the head (created on first use, after the trainer moved the method)."""
        cfg = self.cfg
        return torch.optim.SGD(
            self.head.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
            foreach=True,  # bit-identical to the per-parameter loop (see optim.build_optimizer)
        )

    def after_step(self, info: StepInfo) -> None:
        """Under torchrun, average the head's BatchNorm statistics over ranks (the head is outside
        DDP; its parameters are kept equal by the trainer's gradient averaging)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for buf in self.head.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf /= dist.get_world_size()
