"""Multi-scale Patch-based Multi-label Classifier (MPMC; Howlader et al., "Beyond Pixels", §3.3, eq. 2–7;
implemented as the paper describes it, not as the released code does) — on any host (FixMatch,
UniMatch, Mean Teacher) and any mixer.

A small head ``g`` on an early encoder feature ``z = f_τ(x)`` (``tap``) predicts, at every location
``r`` of that feature map, which classes occur in the image patch the location sees::

    q_r   = σ(W·M(concat(z, AvgPool_7(z), AvgPool_19(z))) + b)                             (eq. 2)
    l_r^M = −1/C Σ_c [y_rc·(1 − q_rc)^γ+·log q_rc + (1 − y_rc)·q_rc^γ−·log(1 − q_rc)]      (eq. 3)
    L_l^M = mean over labeled images and locations of l_r^M                                (eq. 4)

    γ_r   = softmax_c(teacher head logits on the weak view)     (λ_m = γ; teacher = weak pass / EMA)
    λ_s(p) = γ_{r(p), ŷ(p)}   r(p): the location whose patch is centred nearest to pixel p,
                              ŷ(p): p's pseudo-label → multiplies the host's unlabeled losses   (eq. 5)
    L_u^M = mean over unlabeled images and locations of 1/C Σ_c γ_rc·BCE(q̂_rc, q_rc)        (eq. 6)
    L     = L_l + L_l^M + α·L_u + β·L_u^M                                                    (eq. 7)

**Head** (eq. 2, §4.1): ``concat(z, AvgPool_k(z) for k in pool_sizes)`` (stride 1, "same" padding,
``count_include_pad=False`` so border locations average real values only; the released code counts
the zero padding), then ``len(channels)`` blocks (paper: three) of ``3×3 → 3×3 → 1×1`` convolutions,
each followed by BatchNorm + ReLU, then a ``1×1`` linear layer to ``C`` logits per location. The
head is a submodule of the plug-in (saved with the method, moved with it); it is *not* part of the
segmenter, so inference and exported networks never contain it.

**Patches** (eq. 3 targets): location ``i`` of the tap sees pixels ``[s·i + o, s·i + o + k)`` per axis,
with stride ``s``, size ``k`` (the tap's receptive field) and offset ``o`` measured once at
construction by back-propagating from one tap location to a random input (eval mode, a private RNG,
nothing trained); ``patch_size`` overrides the size (the window stays centred on the location; the
stride is always the tap's, since location ``i`` of the feature map *is* at ``s·i``). Class ``c``
is positive at ``r`` when some pixel of the patch has ground truth ``c``: a max-pool of the one-hot
mask; ignore pixels (255) belong to no class and patches made only of
ignore pixels (padding) are left out of every mean. ``tap: null`` picks the first encoder feature
with stride > 1: U-Net level index 1 (stride 2), DeepLabV3+ index 0 (ResNet layer1, stride 4).

**Teacher and student** (§3.3, "teacher g and student ĝ share the same parameters"): the teacher
MPMC is this head in eval mode, without gradient, on ``ctx.teacher_features_w`` — the weak forward
for UniMatch / FixMatch, the EMA network for Mean Teacher. The student MPMC sees the strong view,
``q̂ = ĝ(f̂_τ(A^s(x)))``: with ``student_input: auto`` (or ``strong``) on UniMatch / FixMatch it reads
the encoder features of the mixed strong views (``ctx.features_s``; UniMatch's two views are pooled
into one mean), and each location's target, γ and validity come from the teacher at the image the
location's centre pixel was taken from (``ctx.sources_s``): its own weak view, or the mix partner's
(the flipped batch); locations whose centre is a pasted SupMix ground-truth pixel are left out (the
labeled loss already sees those images' patches). A patch straddling a mix boundary keeps its
centre's target — an approximation the released code shares (it max-pools the mixed pseudo-label).
On Mean Teacher ``auto`` reads ``ctx.features_w`` (its student view is the strong view).
``perturbed`` instead feeds Dropout2d (``fp_dropout``) of the weak features, as the released code's
``c1s_u_w_fp`` term does (that input is kept out of the head's BatchNorm running statistics, which
the eval-mode teacher uses); ``features`` feeds the weak features unperturbed (on UniMatch /
FixMatch a student equal to its teacher, up to BatchNorm's train/eval difference: almost no
gradient). Eq. 6's target is the teacher's probability ``q`` (``soft``) or ``[q ≥ ½]`` (``hard``).
γ is the softmax of the teacher head's *logits*: the paper writes ``softmax(q)`` of the sigmoid
outputs, which would bound every weight to ``[1/(1+(C−1)e), e/(e+C−1)]``
(0.27–0.73 for two classes) and never reach 1; ``confidence_from: probs`` is that literal reading.
λ_s of eq. 5 is biased against thin classes: a class that never fills a patch shares γ with the
patch's other classes, so even an ideal teacher gives a vessel pixel ≤ ½ while background in
background-only patches gets 1 (measured: benchmarks/mpmc_confidence.py). ``lambda_s: presence``
(ours, not the paper; eq. 6's λ_m stays γ) reads σ(q) of the pixel's class instead — the teacher's
belief that the class occurs in the patch at all, which an ideal teacher gives 1 for every class
present.

**Weights** (eq. 7): the plug-in adds ``s_l·weight_labeled·L_l^M + s_u·β·L_u^M`` to the host's
``total``, where ``(s_l, s_u)`` are what the host multiplies its own labeled and unlabeled losses by
at that step (``ctx.labeled_scale`` / ``ctx.unlabeled_scale``: UniMatch / FixMatch ``½`` and
``½·w(t)`` with the recipe's ramp-up ``w``, ``1`` and ``0`` in a labeled-only warm-up step; Mean
Teacher ``1`` and its ramp), so eq. 7's ratios ``L_l : L_l^M : α·L_u : β·L_u^M`` hold at every step;
``scale: <number>`` fixes ``s_l = s_u`` instead. α is the host's own unlabeled weight relative to its
labeled loss: UniMatch ``weight_s1 + weight_s2 + weight_fp`` (1 by default, the released code's α;
the paper's main text says α = 0.1 and its supplement 0.25), FixMatch ``weight_s``, Mean Teacher
``consistency_weight``. β = 0.25 is the main text's value (the supplement's best is 0.15), so α and β
come from different sources. ``λ_s`` reaches the host through :meth:`MPMC.pixel_weights` and the
mixers carry it: pasted partner pixels get the partner's γ *at the label the mix pastes* (the
partner's eval-mode pseudo-label, :meth:`MPMC.partner_pixel_weights`), SupMix's ground-truth pixels
weight 1. L_l^M also trains in the host's labeled-only warm-up (as the released code's first,
labeled-only epoch trains ``(L_x + L_l^M)/2``); λ_s and L_u^M start after it (and after
``warmup_iters`` of the plug-in's own).

**Training the head**: the trainer's SGD holds only the segmenter's parameters, so the head has its
own SGD (``lr``, momentum, weight decay, poly decay — set them to the run's ``optim`` values; the
defaults are the cpu-small protocol's). The MPMC terms are computed once per step, in
:meth:`MPMC.losses`, and added to ``total``; the head appears in ``total`` only through them, so
``total``'s backward gives every parameter — encoder and head — exactly eq. 7's gradient, and the
trainer steps the head's SGD on it (``optimizer_on_total``; ``total/mpmc`` is only logged).

**Differences from the released code** (github.com/cvlab-stonybrook/Beyond-Pixels, ``unimatch.py``,
``model/semseg/deeplabv3plus.py``, ``util/new_multilabel.py``), where we follow the paper:

* labeled loss: plain BCE, re-weighted by a softmax of the patch class frequencies — not eq. 3's
  asymmetric loss;
* no γ-based λ_s / λ_m at all: a "large-loss rejection" zeroes the losses of (and ignores the
  pixels under) entries above the top-``⌈n·δ⌉`` loss, with ``δ = 1e-5`` and its update commented out,
  so it keeps only entries strictly above the maximum — none: it never fires;
* unlabeled MPMC targets are max-pooled thresholded pseudo-labels on the CutMix-ed weak view, the
  student sees the two strong views and the feature-perturbed weak view (three BCE terms × 0.1);
  total ``(L_x + L_l^M + 0.25·s1 + 0.25·s2 + 0.5·fp + 0.1·Σ L_u^M)/3.3`` (α = 1) and the first epoch is
  labeled-only with ``(L_x + L_l^M)/2`` (the host's ``warmup_iters`` here: L_l^M trains in it);
* head: ten convolutions 768→256→128→64 plus a two-layer MLP with dropout, fed both clean and
  Dropout2d-perturbed features; AvgPool counts padding;
* 19 classes, 801-pixel crops / 201×201 maps and layer1's 39-pixel receptive field are hard-coded,
  and ``torch.squeeze`` makes it batch-size-1 only. Here: any ``C``, crop, batch size, channel count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HASH_NEUTRAL
from ..errors import ConfigError
from ..models.base import Segmenter
from ..types import IGNORE_INDEX, SOURCE_LABELED, SOURCE_PARTNER, StepInfo
from .base import OwnOptimizerPlugin, PluginConfig, StepContext, register_plugin

#: Probe sizes (pixels) tried in turn until the tap's receptive field fits inside the probe.
PROBE_SIZES: tuple[int, ...] = (64, 128, 256, 512)


@dataclass
class MPMCConfig(PluginConfig):
    """``plugins.mpmc`` options (paper values where it gives them; see the module docstring)."""

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
    lambda_s: Literal["gamma", "presence"] = field(default="gamma", metadata={HASH_NEUTRAL: True})
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
# Patch geometry and targets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchGeometry:
    """Per axis, tap location ``i`` sees input pixels ``[stride·i + offset, stride·i + offset + size)``."""

    size: int
    stride: int
    offset: int

    @property
    def center(self) -> float:
        """Centre (in pixels) of location 0's patch; location ``i``'s is ``center + stride·i``."""
        return self.offset + (self.size - 1) / 2


def pool_patches(x: Tensor, geom: PatchGeometry, out_size: tuple[int, int]) -> Tensor:
    """Max of ``x`` (N×C×H×W) over every location's patch → N×C×h×w (``out_size``); pixels outside
    the image count as 0 (the padding / cropping of F.pad makes window ``i`` start at ``s·i``)."""
    k, s, o = geom.size, geom.stride, geom.offset
    (h, w), (H, W) = out_size, x.shape[-2:]
    pad = (-o, s * (w - 1) + o + k - W, -o, s * (h - 1) + o + k - H)  # negative = crop
    return F.max_pool2d(F.pad(x, pad), kernel_size=k, stride=s)


def patch_targets(
    labels: Tensor, num_classes: int, geom: PatchGeometry, out_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Multi-label patch targets of eq. 3: ``(y N×C×h×w in {0,1}, valid N×h×w bool)``.

    ``y[n, c, i, j] = 1`` when class ``c`` occurs in location ``(i, j)``'s patch of ``labels[n]``
    (N×H×W, 255 = ignore: no class); ``valid`` is False where the patch holds only ignore pixels."""
    ignored = labels == IGNORE_INDEX
    index = labels.long().masked_fill(ignored, num_classes).clamp(0, num_classes).unsqueeze(1)
    n, h, w = labels.shape
    one_hot = torch.zeros(n, num_classes + 2, h, w, device=labels.device).scatter_(1, index, 1.0)
    one_hot[:, num_classes + 1] = (~ignored).float()  # channel C: ignore (dropped); C + 1: "present"
    pooled = pool_patches(one_hot, geom, out_size)
    return pooled[:, :num_classes], pooled[:, num_classes + 1] > 0


def nearest_location(length: int, geom: PatchGeometry, n_locations: int, device: torch.device) -> Tensor:
    """For each pixel ``0..length−1`` along one axis, the location whose patch is centred nearest."""
    pixels = torch.arange(length, device=device, dtype=torch.float32)
    return torch.floor((pixels - geom.center) / geom.stride + 0.5).long().clamp(0, n_locations - 1)


def pixel_confidence(gamma: Tensor, pseudo: Tensor, geom: PatchGeometry) -> Tensor:
    """λ_s of eq. 5: ``gamma`` N×C×h×w, ``pseudo`` N×H×W class indices → N×H×W, the confidence of the
    pixel's pseudo-label class at the location covering it (the nearest patch centre)."""
    (h, w), (H, W) = gamma.shape[-2:], pseudo.shape[-2:]
    rows = nearest_location(H, geom, h, gamma.device)
    cols = nearest_location(W, geom, w, gamma.device)
    images = torch.arange(gamma.shape[0], device=gamma.device)[:, None, None]
    classes = pseudo.long().clamp(0, gamma.shape[1] - 1)
    return gamma[images, classes, rows[None, :, None], cols[None, None, :]]  # N×H×W, no N×C×H×W copy


def location_sources(sources: Tensor, geom: PatchGeometry, out_size: tuple[int, int]) -> Tensor:
    """Provenance (``SOURCE_*``) of each location's centre pixel: ``sources`` N×H×W → N×h×w."""
    (h, w), (H, W) = out_size, sources.shape[-2:]

    def centres(n: int, size: int) -> Tensor:  # rounded half up, as nearest_location
        positions = geom.center + geom.stride * torch.arange(n, device=sources.device, dtype=torch.float32)
        return torch.floor(positions + 0.5).long().clamp(0, size - 1)

    rows, cols = centres(h, H), centres(w, W)
    return sources[:, rows][:, :, cols]


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def asymmetric_loss(
    logits: Tensor, targets: Tensor, gamma_pos: float = 0.0, gamma_neg: float = 1.0
) -> Tensor:
    """Element-wise asymmetric focal loss (eq. 3, Ridnik et al. 2021), as a positive loss:
    ``−(1 − q)^γ+·log q`` where the target is 1, ``−q^γ−·log(1 − q)`` where it is 0, ``q = σ(logits)``.

    Powers are computed as ``exp(γ·log σ(·))``, finite with finite gradients for saturated logits."""
    logits = logits.float()
    log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = torch.exp(gamma_pos * log_not_q) * log_q
    neg = torch.exp(gamma_neg * log_q) * log_not_q
    return -(targets * pos + (1.0 - targets) * neg)


def masked_location_mean(per_location: Tensor, valid: Tensor) -> Tensor:
    """Mean of an N×h×w map over the valid locations (0 when there is none)."""
    v = valid.to(per_location.dtype)
    return (per_location * v).sum() / v.sum().clamp_min(1.0)


def labeled_patch_loss(
    logits: Tensor, targets: Tensor, valid: Tensor, gamma_pos: float, gamma_neg: float
) -> Tensor:
    """``L_l^M`` (eq. 3–4): eq. 3's class mean per location, averaged over valid locations and images
    (eq. 4 sums over locations; the mean keeps the weight independent of the crop size)."""
    return masked_location_mean(asymmetric_loss(logits, targets, gamma_pos, gamma_neg).mean(1), valid)


def unlabeled_patch_loss(
    student_logits: Tensor, teacher_logits: Tensor, gamma: Tensor, valid: Tensor, hard: bool = False
) -> Tensor:
    """``L_u^M`` (eq. 6): ``1/C Σ_c λ_m·BCE(q̂, q)`` per location, averaged over valid locations and
    images; ``λ_m = gamma`` (N×C×h×w), target ``q = σ(teacher)`` or ``[q ≥ ½]`` when ``hard``."""
    teacher = teacher_logits.detach().float()
    target = (teacher >= 0).float() if hard else torch.sigmoid(teacher)
    bce = F.binary_cross_entropy_with_logits(student_logits.float(), target, reduction="none")
    return masked_location_mean((gamma.detach() * bce).mean(1), valid)


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
# Probing the tap
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapProbe:
    """What one encoder feature is: its ``index``, ``channels``, ``stride`` and receptive ``field``
    ``(first, last)`` pixel of location 0 (relative offsets; None if larger than every probe)."""

    index: int
    channels: int
    stride: int
    field: tuple[int, int] | None


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def probe_tap(model: Segmenter, tap: int | None, sizes: tuple[int, ...] = PROBE_SIZES) -> TapProbe:
    """Find the tap's index, width, stride and receptive field: encode random ``size²`` inputs (eval
    mode, a private generator) and back-propagate from the central location to the input; the
    non-zero rows of the input gradient are the location's receptive field (rows and columns are
    assumed alike). Sizes grow until the field no longer touches the probe's border."""
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    probe: TapProbe | None = None
    smallest = int(getattr(model, "min_size", 1))  # e.g. a deep U-Net's 2^levels
    usable = tuple(size for size in sizes if size >= smallest) or (smallest, 2 * smallest)
    with _eval_mode(model), torch.enable_grad():
        for size in usable:
            x = torch.randn(2, model.in_channels, size, size, generator=gen).to(param).requires_grad_(True)
            feats = model.encode(x)
            index = _resolve_tap(tap, feats, size)
            f = feats[index]
            h, w = f.shape[-2:]
            stride = max(1, round(size / h))
            (grad,) = torch.autograd.grad(f[:, :, h // 2, w // 2].sum(), x)
            rows = (grad.abs().sum(dim=(0, 1, 3)) > 0).nonzero().flatten()
            if rows.numel() == 0:
                raise ConfigError(f"plugins.mpmc.tap: encoder feature {index} does not depend on the input")
            first, last = int(rows.min()), int(rows.max())
            inside = first > 0 and last < size - 1
            field = (first - stride * (h // 2), last - stride * (h // 2)) if inside else None
            probe = TapProbe(index, int(f.shape[1]), stride, field)
            if inside:
                break
    assert probe is not None
    return probe


def _resolve_tap(tap: int | None, feats: list[Tensor], size: int) -> int:
    """``tap`` as a non-negative index; ``None``: the first feature with stride > 1 (else 0)."""
    if tap is None:
        strides = [size / f.shape[-2] for f in feats]
        return next((i for i, s in enumerate(strides) if s > 1), 0)
    if not -len(feats) <= tap < len(feats):
        raise ConfigError(f"plugins.mpmc.tap: {tap} is out of range (the model has {len(feats)} features)")
    return tap % len(feats)


def patch_geometry(probe: TapProbe, patch_size: int | None) -> PatchGeometry:
    """Patch of each tap location: the measured receptive field, or ``patch_size`` centred on the
    field's centre (the stride cell's centre when the field is larger than every probe); the stride
    is the tap's (location ``i`` of the feature map is at ``stride·i``)."""
    stride = probe.stride
    if probe.field is None:
        if patch_size is None:
            raise ConfigError(
                f"plugins.mpmc.patch_size: the receptive field of encoder feature {probe.index} exceeds "
                f"{PROBE_SIZES[-1]} pixels; set patch_size"
            )
        center = (probe.stride - 1) / 2
    else:
        center = (probe.field[0] + probe.field[1]) / 2
    size = patch_size or probe.field[1] - probe.field[0] + 1  # type: ignore[index]
    return PatchGeometry(size, stride, math.floor(center - (size - 1) / 2))


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
        return self._student_mode(ctx) == "strong" and ctx.features_s is not None and not ctx.features_s

    def _student_mode(self, ctx: StepContext) -> str:
        mode = self.cfg.student_input
        if mode != "auto":
            return mode
        if ctx.features_s is not None:  # the host passes them (an empty list until its strong forward)
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
        with _eval_mode(self.head):
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
        """``total/mpmc``: the MPMC terms of this step, logged (and telling the trainer to step the
        head, whose gradient came from ``total``); nothing when no term trains it."""
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
            foreach=True,  # bit-identical to the per-parameter loop (see trainer.build_optimizer)
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
