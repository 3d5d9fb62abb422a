"""GuidedMix-Net (Tu et al., "GuidedMix-Net: Learning to Improve Pseudo Masks Using Labeled Images
as Reference"; paper §3, eq. 2–12), as the paper describes it.

Per iteration, with ``n_l`` labeled images ``x_l`` (masks ``y_l``) and ``n_u`` unlabeled ``x_u``
(the weak views), ``Γ`` the segmenter, ``M = σ(Γ(x))`` its mask (``σ`` = softmax, or the identity
with ``mask_space: logits``)::

    M_l, M_u, e   = Γ(cat(x_l, x_u))                  one pass; e = pooled encoder output (detached)
    L_ce          = CE(M_l, y_l)                      (eq. 1; or (CE + w·Dice)/(1 + w))
    L_cla         = BCE(FC(e_l), [c ∈ y_l])           image-level multi-label classifier (eq. 11)

  similar pairs (§3.1.1, eq. 3): each unlabeled image k takes the labeled image nearest in the
  pooled encoder features,  π(k) = argmin_i ‖e_l^i − e_u^k‖₂  (``pairing: random``: π(k) uniform;
  ``pair_features: map``: the distance of eq. 3 over the whole encoder map, Σ_{h,w,c});
  LUPI (§3.1, eq. 2):  λ ~ Beta(α, α),  λ ← min(λ, 1 − λ),  resampled until λ < λ_max,

    x_mix  = λ·x_l^{π(k)} + (1 − λ)·x_u^k                                             (eq. 2)
    M_mix  = σ(Γ(x_mix))
    M_u,dec = M_mix − λ·M_l^{π(k)}     soft decoupling (eq. 8, default)
              M_mix − M_l^{π(k)}       hard decoupling (eq. 7)
    L_usup = 1/(H·W) Σ_{h,w} ‖M_u,dec − M_u‖²                                         (eq. 10)

  with the decoupled mask as the (detached) target of the direct prediction ``M_u``
  (``unsup_target: decoupled``); the sum over classes is the squared norm of each pixel's
  difference, averaged over the non-ignored pixels of the batch (times plug-in pixel weights).

  labeled pairs (eq. 12): each labeled seed x_l^i takes x̂_l = its nearest *other* labeled image
  (same rule), a fresh λ, x_mix^l = λ·x_l^i + (1 − λ)·x̂_l,

    M_dec = M_mix^l − M_l^i                                                            (eq. 12)
    L_dec = 1/(H·W) Σ_{h,w} ‖M_dec − M̂_l‖²      M̂_l = M(x̂_l), the (detached) target
                                                 (``dec_target: direct``)

    L_sup = L_ce + w_dec·L_dec + w_cla·L_cla                                           (eq. 11)
    L     = L_sup + ω(t)·L_usup,    ω(t) = ω·exp(−5(1 − t/(r·T))²)  (sigmoid ramp-up)   (eq. 9)

MITrans (eq. 4–5) lives in the network (``model.name: guidedmix``, :mod:`semiseg.models.guidedmix`):
the mixed images go through the same network, whose non-local blocks relate labeled and unlabeled
positions of each mixed image. The method works with any :class:`Segmenter`; ``L_cla`` needs a model
with an image-level classifier (``classify``, GuidedMixNet) and is skipped (logged 0, warned once)
otherwise.

What the paper leaves open, and the choices made here: α (the released code uses 1.0); one λ per
batch (the released code; ``lambda_per_sample`` draws one per pair); which side of eq. 10/12 is
fixed (eq. 10: the decoupled mask is the target, as the paper's text says; eq. 12: the labeled
prediction ``M̂_l`` is the target and the decoupled mask learns, as the released code's — unused —
labeled term); masks as softmax probabilities; eq. 12 decouples hard as written (``dec_decoupling``);
pairs are chosen from the first step on (the paper trains the classifier "first" on labeled data,
without saying for how long) and in §3.1.1's direction, a labeled partner for every unlabeled image
(§4.3.1 words it the other way round).

What those choices do (analysis, not a measured result). With probabilities, eq. 6's sum
``M_l + M_u`` cannot hold (each sums to 1), and a mix of images is closer to the *convex*
``λ·M_l + (1 − λ)·M_u``. Then eq. 8's target sums to ``1 − λ`` per pixel, and the direct prediction
that minimises eq. 10 against it moves by ``λ/C`` towards uniform on top of the partner's class
being removed (two classes, λ = 0.25, ``M_mix = (0.9, 0.1)``, background partner: ``M_u`` settles at
``(0.775, 0.225)``): on a background-dominated dataset a push towards the minority class.
``unmix: true`` divides eq. 8 by ``1 − λ`` (the convex mix's exact inverse; hard decoupling has no
such inverse and is left as written). Eq. 12 as written (hard, probabilities) gives ``M_dec`` that
sums to 0 against a ``M̂_l`` that sums to 1, and since the decoupled side learns, its gradient also
reaches the seed's direct prediction ``M_l`` (pulling it away from its own confident class, at
weight 1 from step 0); ``dec_decoupling: soft`` with ``unmix: true`` makes that side a convex-mix
inverse as well. Both defaults stay the paper's equations; the variants are options to measure.

Differences from the released code (``yh-pengtu/GuidedMix-Net``, an mmsegmentation fork whose
``guidedmix_deeplabv3plus_*`` configs build mmseg's DeepLabV3 ``ASPPHead`` on a dilated ResNet-V1c,
output stride 8), with the options that reproduce each where it is cheap:

* it mixes the ASPP features of labeled and unlabeled images and decodes them with a second
  head; here images are mixed (eq. 2) and decoded by the one network (not available as an option);
* it pairs at random (a permutation of equally sized batches) — ``pairing: random`` (independent
  uniform draws, so labeled and unlabeled batch sizes may differ);
* its MITrans is switched off (``mitrans=None`` in every config) — ``model.mitrans: false``;
* its decoupling loss is a sigmoid focal loss (γ = 0.5, α = 0.5, weight 10, no ramp-up) of the
  soft-decoupled *logits* against the argmax of the detached direct prediction — ``unsup_loss:
  focal``, ``unsup_target: direct``, ``mask_space: logits``, ``unsup_weight: 10``, ``rampup: 0``;
* it has no image-level classifier and no ``L_dec`` (computed, never added) — ``cla_weight: 0``,
  ``dec_weight: 0``.

Plug-ins (SUFD, MPMC) see the joint pass of ``cat(x_l, x_u)`` as their :class:`StepContext`; their
pixel weights multiply ``L_usup``'s per-pixel terms and their losses are added to ``L``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.base import Segmenter
from ..plugins.base import PluginHost, StepContext
from ..step import StepResult
from ..types import IGNORE_INDEX
from .base import Batch, Method, StepInfo, register_method
from .mean_teacher import sigmoid_rampup
from .supervised import SupervisedConfig

if TYPE_CHECKING:
    from ..config import RunConfig

log = logging.getLogger(__name__)

#: Rejection sampling of λ (eq. 2) gives up after this many draws (a λ_max far in Beta(α, α)'s tail).
MAX_LAMBDA_DRAWS = 100_000
#: Candidates drawn per round of that rejection sampling (at least 4 per missing λ).
LAMBDA_CHUNK = 64

Target = Literal["decoupled", "direct", "none"]


@dataclass
class GuidedMixConfig(SupervisedConfig):
    """``method.*`` options of GuidedMix-Net (module docstring; equation numbers of the paper)."""

    name: str = "guidedmix"
    pairing: Literal["similar", "random"] = "similar"  # §3.1.1: nearest labeled image, or random
    pair_features: Literal["pooled", "map"] = "pooled"  # eq. 3 on pooled features or the whole map
    alpha: float = 1.0  # λ ~ Beta(α, α) (eq. 2; released code: 1.0)
    lambda_max: float = 0.5  # resample until min(λ, 1 − λ) < λ_max (Table 1: VOC 0.5, Cityscapes 0.3)
    lambda_per_sample: bool = False  # one λ per pair instead of one per batch
    decoupling: Literal["soft", "hard"] = "soft"  # M_u,dec = M_mix − λ·M_l (eq. 8) or M_mix − M_l (eq. 7)
    dec_decoupling: Literal["soft", "hard"] = "hard"  # L_dec's decoupling (eq. 12 writes M_mix − M_l)
    # soft decoupling divided by 1 − λ (ours: the convex mix's inverse; docstring); hash-neutral at False
    unmix: bool = False
    mask_space: Literal["probs", "logits"] = "probs"  # M = softmax(Γ(x)) or the logits (released code)
    unsup_loss: Literal["mse", "focal"] = "mse"  # eq. 10, or the released sigmoid focal loss on argmax
    unsup_target: Target = "decoupled"  # L_usup's detached side: decoupled (eq. 10), direct, none
    dec_target: Target = "direct"  # L_dec's detached side: the labeled prediction M̂_l (released code)
    unsup_weight: float = 1.0  # ω, the maximum of ω(t) (eq. 9)
    rampup: float = 0.3  # fraction of training over which ω(t) ramps up (0: constant ω)
    dec_weight: float = 1.0  # weight of L_dec (eq. 11: 1)
    cla_weight: float = 1.0  # weight of L_cla (eq. 11: 1)
    focal_gamma: float = 0.5  # unsup_loss: focal (released: 0.5)
    focal_alpha: float = 0.5  # unsup_loss: focal (released: 0.5)

    def validate(self, prefix: str) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha: must be > 0, got {self.alpha}")
        if not 0.0 < self.lambda_max <= 0.5:
            raise ConfigError(
                f"{prefix}.lambda_max: must be in (0, 0.5] (λ ← min(λ, 1 − λ) ≤ 0.5), got {self.lambda_max}"
            )
        if not 0.0 <= self.rampup <= 1.0:
            raise ConfigError(f"{prefix}.rampup: must be in [0, 1], got {self.rampup}")
        for key in ("unsup_weight", "dec_weight", "cla_weight", "dice_weight", "focal_gamma"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key}: must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.focal_alpha <= 1.0:
            raise ConfigError(f"{prefix}.focal_alpha: must be in [0, 1], got {self.focal_alpha}")
        if self.unsup_loss == "focal":
            for key in ("unsup_target", "dec_target"):
                target = getattr(self, key)
                if target == "none":
                    raise ConfigError(f"{prefix}.{key}: unsup_loss focal needs a target side, not 'none'")
                if target == "direct" and self.mask_space != "logits":
                    raise ConfigError(
                        f"{prefix}.{key}: with unsup_loss focal the decoupled mask is a prediction, "
                        "so it must be logits: set mask_space: logits (the released code's)"
                    )


# ----------------------------------------------------------------------------------------------
# The pieces, as pure tensor functions
# ----------------------------------------------------------------------------------------------


def pair_embedding(feature: Tensor, kind: str = "pooled") -> Tensor:
    """N×D vectors compared by eq. 3: the global average pooled encoder output, or the whole map."""
    if kind == "pooled":
        return F.adaptive_avg_pool2d(feature.float(), 1).flatten(1)
    return feature.float().flatten(1)


def nearest_pairs(queries: Tensor, keys: Tensor, exclude_self: bool = False) -> Tensor:
    """``π(k) = argmin_i ‖keys_i − queries_k‖₂`` (eq. 3); ``exclude_self`` (queries = keys) forbids
    ``π(k) = k``. Ties go to the lowest index."""
    dist = torch.cdist(queries.float(), keys.float())
    if exclude_self:
        dist.fill_diagonal_(float("inf"))
    return dist.argmin(dim=1)


def random_pairs(n_queries: int, n_keys: int, exclude_self: bool = False) -> Tensor:
    """Uniformly random partners (``pairing: random``), drawn on the CPU RNG; ``exclude_self``
    (queries = keys) draws ``j ≠ k`` uniformly."""
    if exclude_self:
        return (torch.arange(n_queries) + torch.randint(1, n_keys, (n_queries,))) % n_keys
    return torch.randint(0, n_keys, (n_queries,))


def sample_lambda(alpha: float, lambda_max: float, n: int = 1) -> Tensor:
    """``n`` mixing weights (eq. 2): ``λ ~ Beta(α, α)``, ``λ ← min(λ, 1 − λ)``, each redrawn until
    ``λ < λ_max``. Drawn on the CPU RNG (checkpointed by the trainer)."""
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    out = torch.empty(n)
    missing = torch.ones(n, dtype=torch.bool)
    drawn = 0
    while bool(missing.any()):
        if drawn >= MAX_LAMBDA_DRAWS:
            raise RuntimeError(
                f"method.lambda_max: no λ < {lambda_max} in {drawn} draws of Beta({alpha}, {alpha}); "
                "raise method.lambda_max or lower method.alpha"
            )
        need = missing.nonzero().flatten()
        draws = max(LAMBDA_CHUNK, 4 * len(need))
        lam = beta.sample((draws,))
        lam = torch.minimum(lam, 1.0 - lam)
        accepted = lam[lam < lambda_max][: len(need)]  # the first accepted draws, in order
        out[need[: len(accepted)]] = accepted
        missing[need[: len(accepted)]] = False
        drawn += draws
    return out


def lupi_mix(x_l: Tensor, x_u: Tensor, lam: Tensor) -> Tensor:
    """Eq. 2: ``x_mix = λ·x_l + (1 − λ)·x_u`` with ``λ`` a scalar or one value per sample."""
    lam = lam.to(x_u.device, x_u.dtype).reshape(-1, *([1] * (x_u.dim() - 1)))
    return lam * x_l + (1.0 - lam) * x_u


def decouple(m_mix: Tensor, m_l: Tensor, lam: Tensor, mode: str = "soft", unmix: bool = False) -> Tensor:
    """Pseudo-mask generation: ``M_mix − λ·M_l`` (soft, eq. 8) or ``M_mix − M_l`` (hard, eq. 7).

    ``unmix`` (soft only; ours, not the paper) divides by ``1 − λ``: the inverse of a convex mix
    ``M_mix = λ·M_l + (1 − λ)·M_u``, so a probability target sums to 1 again instead of ``1 − λ``."""
    if mode == "hard":
        return m_mix - m_l
    lam = lam.to(m_mix.device, m_mix.dtype).reshape(-1, *([1] * (m_mix.dim() - 1)))
    soft = m_mix - lam * m_l
    return soft / (1.0 - lam) if unmix else soft


def to_mask(logits: Tensor, space: str) -> Tensor:
    """``M`` of the paper: softmax probabilities (``probs``) or the logits themselves."""
    return logits.float().softmax(dim=1) if space == "probs" else logits.float()


def class_presence(target: Tensor, num_classes: int) -> Tensor:
    """N×C image-level labels: 1 where class c occurs in the mask (ignore pixels excluded)."""
    valid = target != IGNORE_INDEX
    onehot = F.one_hot(torch.where(valid, target, 0).long(), num_classes) * valid.unsqueeze(-1)
    return (onehot.flatten(1, 2).sum(dim=1) > 0).float()


def sigmoid_focal(logits: Tensor, target: Tensor, gamma: float, alpha: float) -> Tensor:
    """Per-pixel sigmoid focal loss (Lin et al.; mmseg's ``FocalLoss(use_sigmoid=True)``) against
    one-hot ``target`` classes, averaged over classes: N×C×H×W logits, N×H×W target → N×H×W."""
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    p = logits.sigmoid()
    one_minus_pt = (1 - p) * onehot + p * (1 - onehot)
    weight = (alpha * onehot + (1 - alpha) * (1 - onehot)) * one_minus_pt.pow(gamma)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    return (bce * weight).mean(dim=1)


def masked_mean(per_pixel: Tensor, valid: Tensor, weight: Tensor | None = None) -> Tensor:
    """``Σ loss·[valid]·w / #valid`` (UniMatch's normalisation of unlabeled losses)."""
    v = valid.to(per_pixel.dtype)
    w = v if weight is None else v * weight
    return (per_pixel * w).sum() / v.sum().clamp_min(1.0)


def decoupled_consistency(
    direct_logits: Tensor,
    decoupled: Tensor,
    valid: Tensor,
    cfg: GuidedMixConfig,
    target: str,
    weight: Tensor | None = None,
) -> Tensor:
    """``L_usup`` (eq. 10) / ``L_dec`` (eq. 12) between a direct prediction and a decoupled mask.

    ``target`` names the detached side: ``decoupled`` (the direct prediction learns), ``direct`` (the
    decoupled mask learns) or ``none`` (both). ``mse``: per pixel ``Σ_c (a − b)²``; ``focal``: the
    sigmoid focal loss of the learning side's logits against the argmax of the target side.
    """
    direct = to_mask(direct_logits, cfg.mask_space)
    if cfg.unsup_loss == "mse":
        if target == "decoupled":
            a, b = direct, decoupled.detach()
        elif target == "direct":
            a, b = decoupled, direct.detach()
        else:
            a, b = direct, decoupled
        per_pixel = (a - b).pow(2).sum(dim=1)
    elif target == "decoupled":
        per_pixel = sigmoid_focal(
            direct_logits.float(), decoupled.detach().argmax(1), cfg.focal_gamma, cfg.focal_alpha
        )
    else:  # "direct": the decoupled logits learn the argmax of the direct prediction (released code)
        per_pixel = sigmoid_focal(decoupled, direct.detach().argmax(1), cfg.focal_gamma, cfg.focal_alpha)
    return masked_mean(per_pixel, valid, weight)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register_method("guidedmix")
class GuidedMix(PluginHost, Method):
    """GuidedMix-Net's training step (module docstring, eq. 2–12)."""

    Config = GuidedMixConfig
    cfg: GuidedMixConfig
    uses_unlabeled = True

    def __init__(self, model: Segmenter, cfg: GuidedMixConfig, num_classes: int) -> None:
        super().__init__(model, cfg, num_classes)
        self.has_classifier = callable(getattr(model, "classify", None))
        if cfg.cla_weight > 0 and not self.has_classifier:
            log.warning(
                "method.cla_weight: %s has no image-level classifier (model.name: guidedmix has one); "
                "L_cla is skipped",
                type(model).__name__,
            )

    @classmethod
    def check_run(cls, cfg: RunConfig) -> None:
        """The mixed-image pass runs on the ``n_u`` mixed images alone, in training mode: with one
        image, BatchNorm of a globally pooled branch (the PSP module's 1×1 bin, ASPP's image pool)
        has one value per channel and fails — so at least two unlabeled images per step."""
        if cfg.data.unlabeled_batch_size < 2:
            raise ConfigError(
                "data.unlabeled_batch_size: guidedmix needs >= 2 (its mixed-image pass normalises "
                f"the unlabeled batch alone), got {cfg.data.unlabeled_batch_size}"
            )

    def pairs(self, emb_q: Tensor, emb_k: Tensor, exclude_self: bool) -> Tensor:
        """Partner index in ``emb_k`` of every row of ``emb_q`` (similar or random pairs)."""
        if self.cfg.pairing == "random":
            return random_pairs(emb_q.shape[0], emb_k.shape[0], exclude_self).to(emb_q.device)
        return nearest_pairs(emb_q, emb_k, exclude_self)

    def lambdas(self, n: int) -> Tensor:
        """One λ for the batch (repeated) or one per pair (``lambda_per_sample``)."""
        cfg = self.cfg
        if cfg.lambda_per_sample:
            return sample_lambda(cfg.alpha, cfg.lambda_max, n)
        return sample_lambda(cfg.alpha, cfg.lambda_max, 1).expand(n)

    def training_step(self, batch: Batch, info: StepInfo) -> StepResult:
        cfg = self.cfg
        x_l, y_l, x_u = batch.x_l, batch.y_l, batch.x_w
        assert x_u is not None, "guidedmix needs unlabeled data (x_w)"
        ignore = batch.ignore if batch.ignore is not None else torch.zeros_like(x_u[:, 0], dtype=torch.uint8)
        n_l, n_u = x_l.shape[0], x_u.shape[0]

        # Direct predictions M_l, M_u and the encoder features of cat(x_l, x_u): one pass.
        out = self.net(torch.cat((x_l, x_u)), return_features=True)
        feats = out.features
        ctx = StepContext.from_joint_pass(
            batch, info, out.logits, feats if self.plugins_need_features else None, n_l, ignore
        )
        ramp = sigmoid_rampup(info.step, cfg.rampup * info.total_steps)
        ctx.unlabeled_scale = ramp  # plug-ins' unlabeled terms follow ω(t)'s ramp (labeled scale 1)
        weight = self.plugin_pixel_weights(ctx)
        logits_l, logits_u = ctx.logits_l, ctx.logits_w
        zero = logits_l.sum() * 0.0

        # L_ce (eq. 1) and the image-level classifier L_cla (eq. 11).
        loss_x = cfg.labeled_loss(logits_l, y_l)
        image_logits = getattr(out, "image_logits", None)
        loss_cla = zero
        if cfg.cla_weight > 0 and image_logits is not None:
            presence = class_presence(y_l, image_logits.shape[1])
            loss_cla = F.binary_cross_entropy_with_logits(image_logits[:n_l].float(), presence)

        # Similar pairs (eq. 3) and LUPI (eq. 2).
        with torch.no_grad():
            emb = pair_embedding(feats[-1].detach(), cfg.pair_features)
            pair_u = self.pairs(emb[n_l:], emb[:n_l], exclude_self=False)
            lam_u = self.lambdas(n_u)
            x_mix_u = lupi_mix(x_l[pair_u], x_u, lam_u)
            use_dec = cfg.dec_weight > 0 and n_l >= 2
            if use_dec:
                pair_l = self.pairs(emb[:n_l], emb[:n_l], exclude_self=True)
                lam_l = self.lambdas(n_l)
                x_mix_l = lupi_mix(x_l, x_l[pair_l], lam_l)

        # M_mix: without gradient when it is only L_usup's target (the default).
        if cfg.unsup_target == "decoupled":
            with torch.no_grad():
                mix_u = self.net(x_mix_u)
            mix_l = self.net(x_mix_l) if use_dec else None
        elif use_dec:
            mix_u, mix_l = self.net(torch.cat((x_mix_u, x_mix_l))).split([n_u, n_l])
        else:
            mix_u, mix_l = self.net(x_mix_u), None

        # PMG (eq. 7/8) and L_usup (eq. 10).
        m_l = to_mask(logits_l, cfg.mask_space)
        dec_u = decouple(to_mask(mix_u, cfg.mask_space), m_l[pair_u], lam_u, cfg.decoupling, cfg.unmix)
        valid_u = ignore != IGNORE_INDEX
        loss_u = decoupled_consistency(logits_u, dec_u, valid_u, cfg, cfg.unsup_target, weight)

        # L_dec on labeled–labeled pairs (eq. 12): M_mix^l − M_l^i against M̂_l = M(x̂_l).
        loss_dec = zero
        if use_dec and mix_l is not None:
            dec_l = decouple(to_mask(mix_l, cfg.mask_space), m_l, lam_l, cfg.dec_decoupling, cfg.unmix)
            valid_l = (y_l[pair_l] != IGNORE_INDEX) & (y_l != IGNORE_INDEX)
            loss_dec = decoupled_consistency(logits_l[pair_l], dec_l, valid_l, cfg, cfg.dec_target)

        # L = L_ce + w_dec·L_dec + w_cla·L_cla + ω(t)·L_usup (eq. 9, 11).
        omega = cfg.unsup_weight * ramp
        total = loss_x + cfg.dec_weight * loss_dec + cfg.cla_weight * loss_cla + omega * loss_u
        losses = {
            "loss_x": loss_x,
            "loss_u": loss_u,
            "loss_dec": loss_dec,
            "loss_cla": loss_cla,
            "lambda": lam_u.mean().to(loss_x.device),
            "consistency_weight": torch.tensor(omega, device=loss_x.device),
        }
        return self.add_plugin_losses(ctx, StepResult(loss=total, logs=losses))
