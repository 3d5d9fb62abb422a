"""Surface distances HD95, ASD, ASSD per foreground class (:class:`SurfaceDistances`), exact and
without medpy or scipy; re-exported by :mod:`semiseg.metrics`, whose module docstring defines them
(surfaces, distances in pixels, the empty-mask conventions, the per-class means)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .metrics_format import _json_float, _names, _nanmean
from .types import IGNORE_INDEX

_CHUNK = 1 << 22  # elements of one (surface pixels × columns) block in the exact distance search
_WINDOW = 8  # columns each side searched first (exact for surface distances up to this many pixels)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two 2-D masks of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mask_surface(mask: Tensor) -> Tensor:
    """The surface of a 2-D boolean mask: ``mask`` minus its erosion by the 4-connected cross.

    As medpy's ``result ^ binary_erosion(result, generate_binary_structure(2, 1))``: a pixel is
    interior when it and its four neighbours are in the mask; pixels outside the image count as
    background, so mask pixels on the image border are surface.
    """
    if mask.dim() != 2:
        raise ValueError(f"expected a 2-D mask, got shape {tuple(mask.shape)}")
    mask = mask.bool()
    interior = mask.clone()
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[0, :] = False
    interior[-1, :] = False
    interior[:, 0] = False
    interior[:, -1] = False
    return mask & ~interior


def _min_over_columns(g2: Tensor, ys: Tensor, xs: Tensor, offsets: Tensor) -> Tensor:
    """``min over o in offsets of g2[y, x + o] + o²`` for every ``(y, x)``; ``g2`` is padded so
    that every ``x + o`` is a column of it (``xs`` already shifted by the left padding)."""
    sq = offsets.square().to(g2.dtype).view(1, -1)
    out = torch.empty(ys.numel(), dtype=g2.dtype, device=g2.device)
    step = max(1, _CHUNK // offsets.numel())
    for i in range(0, ys.numel(), step):
        y, x = ys[i : i + step], xs[i : i + step]
        out[i : i + step] = (g2[y.view(-1, 1), x.view(-1, 1) + offsets.view(1, -1)] + sq).min(1).values
    return out


def directed_distances(source: Tensor, target: Tensor) -> Tensor:
    """Exact Euclidean distance (pixels, float64) from every ``True`` pixel of ``source`` to the
    nearest ``True`` pixel of ``target``: one value per source pixel, in no particular order. Both
    masks 2-D boolean of one shape, ``target`` not empty.

    Separable and exact (no approximation, no scipy): along each column the offset ``g`` to the
    nearest target pixel comes from two cumulative scans; then for a source pixel ``(y, x)``,
    ``d² = min over columns x' of (x − x')² + g(y, x')²``. That minimum is first taken over the
    columns ``|x − x'| ≤ _WINDOW`` — already exact when it is ``≤ _WINDOW²``, since farther columns
    add more than that — and over the whole row (the shorter image axis) for the other pixels,
    in blocks of source pixels. Cost O(H·W + S·_WINDOW + S_far·min(H, W)). Runs on the tensors'
    device.
    """
    _check_pair(source, target)
    source, target = source.bool(), target.bool()
    if not bool(target.any()):
        raise ValueError("the target mask is empty: no distance is defined")
    if target.shape[1] > target.shape[0]:  # search along the shorter axis
        source, target = source.t(), target.t()
    h, w = target.shape
    device = target.device
    big = h + w  # larger than any in-image offset; big² > (h−1)² + (w−1)²
    dtype = torch.int32 if 2 * big * big < 2**31 else torch.int64
    rows = torch.arange(h, device=device, dtype=torch.int64).view(h, 1).expand(h, w)
    above = torch.where(target, rows, -big).cummax(0).values  # last target row at or above
    below = torch.where(target, rows, 2 * big).flip(0).cummin(0).values.flip(0)  # first at or below
    g = torch.minimum(rows - above, below - rows).clamp_max(big).to(dtype)  # h × w, big where none
    r = min(_WINDOW, w)
    fill = torch.full((h, r), big, dtype=dtype, device=device)
    g2 = torch.cat([fill, g, fill], 1).square()  # padded by r columns on each side
    ys, xs = source.nonzero(as_tuple=True)
    xs = xs + r
    out = _min_over_columns(g2, ys, xs, torch.arange(-r, r + 1, device=device))
    far = (out > r * r).nonzero().squeeze(1)
    if far.numel():  # the whole row: columns r … r + w − 1 of g2
        cols = torch.arange(w, device=device).view(1, -1)
        row_g2 = g2[:, r : r + w]
        step = max(1, _CHUNK // w)
        for i in range(0, far.numel(), step):
            idx = far[i : i + step]
            dx2 = (xs[idx].view(-1, 1) - r - cols).square().to(dtype)
            out[idx] = (row_g2[ys[idx]] + dx2).min(1).values
    return out.double().sqrt()


def _percentile(values: Tensor, q: float) -> float:
    """numpy's default (linear) percentile ``q`` ∈ [0, 100] of a non-empty 1-D tensor."""
    v = values.double().sort().values
    pos = (v.numel() - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    a, b = float(v[lo]), float(v[hi])
    return a + (b - a) * (pos - lo)


def binary_surface_metrics(pred: Tensor, ref: Tensor) -> tuple[float, float, float] | None:
    """``(HD95, ASD, ASSD)`` in pixels of one binary prediction against its binary reference
    (2-D, same shape; definitions and empty cases in :mod:`semiseg.metrics`).

    ``None`` when both masks are empty (the image does not count for this class); the image
    diagonal ``√(H² + W²)`` for all three when exactly one is empty.
    """
    _check_pair(pred, ref)
    pred, ref = pred.bool(), ref.bool()
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not (has_p or has_r):
        return None
    if has_p != has_r:
        diagonal = math.hypot(*pred.shape)
        return diagonal, diagonal, diagonal
    sp, sr = mask_surface(pred), mask_surface(ref)
    d_pr, d_rp = directed_distances(sp, sr), directed_distances(sr, sp)
    asd_pr, asd_rp = float(d_pr.mean()), float(d_rp.mean())
    return _percentile(torch.cat([d_pr, d_rp]), 95.0), asd_pr, (asd_pr + asd_rp) / 2


SURFACE_METRICS = ("hd95", "asd", "assd")


class SurfaceDistances:
    """Per-image HD95 / ASD / ASSD per foreground class (``1 … num_classes−1``), averaged over images.

    :meth:`update` scores one image; the state is, per class, the sums of the three distances and
    the counts of images scored (``images``, both masks non-empty or one empty) and of those that
    got the empty-mask penalty (``one_empty``), kept in float64 on the host — so :meth:`all_reduce`
    (sums over DDP ranks) and ``+`` give exactly the whole set's means.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = IGNORE_INDEX
        # columns: sum hd95, sum asd, sum assd, images scored, images with exactly one empty mask
        self.state = torch.zeros(num_classes, 5, dtype=torch.float64)

    def reset(self) -> None:
        self.state.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Score one image: ``pred`` and ``target`` are ``H×W`` class-index maps (``target`` 255 =
        ignored: removed from both masks). Class 0 is not scored."""
        if pred.shape != target.shape or pred.dim() != 2:
            raise ValueError(
                f"expected one H×W prediction and target, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        target = target.to(pred.device)
        valid = target != self.ignore_index
        for c in range(1, self.num_classes):
            p, r = (pred == c) & valid, (target == c) & valid
            scored = binary_surface_metrics(p, r)
            if scored is None:
                continue
            one_empty = bool(p.any()) != bool(r.any())
            self.state[c] += torch.tensor([*scored, 1.0, float(one_empty)], dtype=torch.float64)

    def __iadd__(self, other: SurfaceDistances) -> SurfaceDistances:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add {other.num_classes}-class surface distances to {self.num_classes}")
        self.state += other.state
        return self

    def __add__(self, other: SurfaceDistances) -> SurfaceDistances:
        out = SurfaceDistances(self.num_classes)
        out.state = self.state.clone()
        out += other
        return out

    def all_reduce(self) -> SurfaceDistances:
        """Sum over all ranks (in place) when ``torch.distributed`` is initialised; a collective,
        every rank must call it. A no-op otherwise. NCCL: reduced on the current CUDA device."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        buf = self.state
        if dist.get_backend() == "nccl":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf)
        self.state = buf.cpu()
        return self

    def means(self) -> np.ndarray:
        """``num_classes × 3`` mean HD95 / ASD / ASSD over the images scored; NaN where none (and
        for class 0)."""
        st = self.state.numpy()
        n = st[:, 3:4]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(n > 0, st[:, :3] / n, np.nan)
        out[0] = np.nan
        return out

    def results(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able, in pixels, ``None`` for no value: ``hd95`` / ``asd`` / ``assd`` as
        ``{class name: mean}`` (every class; the background, class 0, is ``None``), their means over
        the foreground classes with a value ``mhd95`` / ``masd`` / ``massd``, and
        ``surface_counts = {class name: {"images": n, "one_empty": k}}`` for the foreground classes."""
        names = _names(class_names, self.num_classes)
        means = self.means()
        out: dict[str, Any] = {}
        for j, key in enumerate(SURFACE_METRICS):
            out[key] = {n: _json_float(v) for n, v in zip(names, means[:, j])}
        for j, key in enumerate(SURFACE_METRICS):
            out[f"m{key}"] = _json_float(_nanmean(means[1:, j]))
        st = self.state.numpy()
        out["surface_counts"] = {
            n: {"images": int(st[c, 3]), "one_empty": int(st[c, 4])} for c, n in enumerate(names) if c >= 1
        }
        return out

    def __repr__(self) -> str:
        return f"SurfaceDistances(num_classes={self.num_classes}, scored={self.state[:, 3].tolist()})"
