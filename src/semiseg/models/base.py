"""One interface for every segmentation network.

``encode(x) -> list of features`` (shallow to deep), ``decode(features, size) -> logits``,
``forward(x) = decode(encode(x))``. Methods that need more than logits ask ``forward`` for it, so
that every pass goes through ``forward`` (DistributedDataParallel only synchronises gradients of
work done inside ``forward``):

* ``forward(x, fp_from=k)`` also returns the logits of UniMatch's feature perturbation
  (``decode([dropout2d(f) for f in feats])``) for the samples ``x[k:]`` only;
* ``forward(x, return_features=True)`` also returns the encoder features (MPMC taps an early one,
  GuidedMix-Net pools the last one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class SegOutput:
    logits: Tensor
    logits_fp: Tensor | None = None
    features: list[Tensor] | None = None


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask does not depend on the input's memory format.

    Native dropout draws its random mask in memory order, so the same network with channels-last
    weights (``train.channels_last``) would drop different elements. A channels-last input is
    dropped with the mask the contiguous network draws, on every device: on CPU by the native
    kernel's own steps (``noise = bernoulli(1 − p) / (1 − p)`` drawn in NCHW order, then ``x·noise``),
    elsewhere through a contiguous copy. A contiguous input takes the native path unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.dim() != 4 or x.is_contiguous():
            return super().forward(x)
        if x.device.type == "cpu" and 0 < self.p < 1 and not self.inplace:
            noise = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
            return x * noise.div_(1 - self.p)
        out = F.dropout(x.contiguous(), self.p, True, self.inplace)
        return out.contiguous(memory_format=torch.channels_last)


class Segmenter(nn.Module):
    """Base class: subclasses implement :meth:`encode`, :meth:`decode` and :meth:`backbone_parameters`."""

    in_channels: int
    num_classes: int
    fp_dropout: float = 0.5
    # False: ``train.channels_last`` leaves this model contiguous (see GuidedMixNet for why).
    channels_last_safe: bool = True

    def encode(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def decode(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at the base lr (the rest get ``lr × lr_multi``)."""
        return list(self.parameters())

    def perturb(self, feats: list[Tensor]) -> list[Tensor]:
        """UniMatch feature perturbation: channel dropout on every feature the decoder reads."""
        return [F.dropout2d(f, p=self.fp_dropout, training=True) for f in feats]

    def forward(
        self, x: Tensor, fp_from: int | None = None, return_features: bool = False
    ) -> Tensor | SegOutput:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels but the model expects {self.in_channels}")
        size = (x.shape[-2], x.shape[-1])
        feats = self.encode(x)
        if fp_from is None:
            logits = self.decode(feats, size)
            return SegOutput(logits, None, feats) if return_features else logits
        n = x.shape[0]
        # One decoder pass over [all clean features ; perturbed features of x[fp_from:]].
        perturbed = self.perturb([f[fp_from:] for f in feats])
        both = self.decode([torch.cat((f, p)) for f, p in zip(feats, perturbed)], size)
        return SegOutput(both[:n], both[n:], feats if return_features else None)
