"""Confusion-matrix segmentation metrics: per-class IoU and Dice, mIoU, mean Dice, pixel accuracy.

The matrix is ``C×C`` int64 with **rows = ground truth** and **columns = prediction**; pixels whose
target is :data:`~semiseg.data.base.IGNORE_INDEX` (255) are not counted. For class ``c`` with
``tp = M[c, c]``, ``fp = Σ_r M[r, c] − tp`` and ``fn = Σ_k M[c, k] − tp``:

* ``IoU_c = tp / (tp + fp + fn)`` and ``Dice_c = 2tp / (2tp + fp + fn)``;
* a class absent from both the ground truth and the prediction has ``0 / 0``: its IoU and Dice are
  NaN and it is left out of the means (``nanmean``);
* ``mIoU`` / ``mDice`` average over classes **including background** (as the SupMix paper reports);
* pixel accuracy is ``trace(M) / ΣM`` over non-ignored pixels.

Under DistributedDataParallel each rank accumulates its own shard and :meth:`ConfusionMatrix.all_reduce`
sums the matrices, so the metrics are those of the whole set (no sample counted twice).

**Surface distances** (:class:`SurfaceDistances`, medical-imaging metrics as SSL4MIS reports them
with medpy, re-implemented here without medpy or scipy). Per image and per foreground class
``c ≥ 1`` (class 0 is the background and is not scored), on the binary masks ``P = (pred == c)`` and
``R = (target == c)`` with ignored pixels (255) removed from both:

* the **surface** of a mask is the mask minus its binary erosion by the 4-connected cross
  (medpy: ``generate_binary_structure(2, 1)``, outside the image counts as background, so a mask
  touching the image border has a surface along it);
* ``d(P→R)``: for every surface pixel of ``P``, the exact Euclidean distance to the nearest surface
  pixel of ``R`` (and ``d(R→P)`` the other way), in **pixels** (spacing 1 along both axes) at the
  evaluated resolution, i.e. after ``data.resize`` / ``data.long_side``;
* ``HD95 = percentile₉₅(d(P→R) ∪ d(R→P))`` (numpy's linear interpolation) — medpy's ``hd95``;
* ``ASD = mean d(P→R)``, the directed prediction-to-reference mean — medpy's ``asd``, the "ASD" of
  SSL4MIS' tables; ``ASSD = (mean d(P→R) + mean d(R→P)) / 2`` (medpy's ``assd``, symmetric) is
  reported alongside in the results dict.

Empty masks: ``P`` and ``R`` both empty → the image is **skipped** for that class (not counted);
exactly one empty → HD95 = ASD = ASSD = the **image diagonal** ``√(H² + W²)`` pixels, larger than
any distance inside the image (the worst-case convention of the BraTS challenge), and the image is
counted in ``one_empty``. (SSL4MIS' ``calculate_metric_percase`` returns 0 — the best value — for an
empty prediction, which rewards missing a structure; we do not follow it.) Per class, the reported
value is the mean over the images counted; ``mhd95`` / ``masd`` / ``massd`` average it over the
foreground classes that have a value. Accumulation is per image, so sums and counts reduce over
DDP ranks exactly (:meth:`SurfaceDistances.all_reduce`).

The surface distances live in :mod:`semiseg.surface_metrics` and the per-class table
(:func:`format_table`) in :mod:`semiseg.metrics_format`; both are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .metrics_format import _json_float, _names, _nanmean, format_table
from .surface_metrics import (
    SURFACE_METRICS,
    SurfaceDistances,
    binary_surface_metrics,
    directed_distances,
    mask_surface,
)
from .types import IGNORE_INDEX

__all__ = [
    "SURFACE_METRICS",
    "ConfusionMatrix",
    "SurfaceDistances",
    "binary_surface_metrics",
    "directed_distances",
    "format_table",
    "mask_surface",
]


class ConfusionMatrix:
    """Accumulates a ``num_classes × num_classes`` int64 confusion matrix (rows GT, columns prediction).

    The matrix lives on the device of the tensors passed to :meth:`update` (counting uses
    ``torch.bincount``, so it runs on the GPU without copying predictions to the host).
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = IGNORE_INDEX
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        # Per-image surface distances of the same images, when the evaluation computed them
        # (:func:`semiseg.evaluate.evaluate` with ``eval.surface_metrics``); merged into :meth:`results`.
        self.surface: SurfaceDistances | None = None
        # Per-image confusion counts (``{"name", "tp", "fp", "fn"}``) of a whole-image evaluation,
        # and the per-volume metrics of a volume evaluation (:class:`semiseg.volume_metrics.VolumeMetrics`).
        self.per_image: list[dict[str, Any]] | None = None
        self.volumes: Any = None

    # ---------------------------------------------------------------- accumulation

    def reset(self) -> None:
        self.mat.zero_()
        if self.surface is not None:
            self.surface.reset()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Count one batch.

        ``pred``: class indices of the same shape as ``target`` (any shape, e.g. ``N×H×W``), or
        logits/probabilities ``N×C×H×W`` for a ``N×H×W`` target (reduced with ``argmax(1)``).
        ``target``: class indices, :data:`IGNORE_INDEX` = not counted. A target value that is neither
        a class index nor 255 raises ``ValueError`` (it is a data bug, not something to skip).
        """
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}"
            )
        c = self.num_classes
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).to(pred.device).long()
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        if target.numel() == 0:
            return
        bad_t = (target < 0) | (target >= c)
        bad_p = (pred < 0) | (pred >= c)
        if bool((bad_t | bad_p).any()):
            which, values = ("target", target[bad_t]) if bool(bad_t.any()) else ("prediction", pred[bad_p])
            raise ValueError(
                f"{which} value {int(values[0])} is not a class index "
                f"(num_classes={c}; {IGNORE_INDEX} = ignore)"
            )
        counts = torch.bincount(target * c + pred, minlength=c * c).view(c, c)
        if self.mat.device != counts.device:
            self.mat = self.mat.to(counts.device)
        self.mat += counts

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"cannot add a {other.num_classes}-class matrix to a {self.num_classes}-class one"
            )
        self.mat += other.mat.to(self.mat.device)
        if self.surface is not None and other.surface is not None:
            self.surface += other.surface
        else:  # surface distances of only some of the images would misreport the whole set
            self.surface = None
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.mat.device)
        out.mat = self.mat.clone()
        if self.surface is not None:
            out.surface = self.surface + SurfaceDistances(self.num_classes)
        out += other
        return out

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over all ranks (in place) when ``torch.distributed`` is initialised.

        A no-op otherwise. Every rank must call it (it is a collective). With the NCCL backend a CPU
        matrix is moved to the current CUDA device for the reduction and back.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        mat = self.mat
        if dist.get_backend() == "nccl" and mat.device.type != "cuda":
            buf = mat.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf)
            self.mat = buf.to(mat.device)
        else:
            dist.all_reduce(mat)
        return self

    # ---------------------------------------------------------------- metrics

    def numpy(self) -> np.ndarray:
        """The matrix as a host int64 array (rows GT, columns prediction)."""
        return self.mat.detach().cpu().numpy().astype(np.int64)

    def _tp_fp_fn(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m = self.numpy().astype(np.float64)
        tp = np.diag(m)
        return tp, m.sum(0) - tp, m.sum(1) - tp

    def iou(self) -> np.ndarray:
        """Per-class IoU ``tp / (tp + fp + fn)``; NaN for a class absent from GT and prediction."""
        tp, fp, fn = self._tp_fp_fn()
        denom = tp + fp + fn
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom > 0, tp / denom, np.nan)

    def dice(self) -> np.ndarray:
        """Per-class Dice ``2tp / (2tp + fp + fn)``; NaN for a class absent from GT and prediction."""
        tp, fp, fn = self._tp_fp_fn()
        denom = 2 * tp + fp + fn
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom > 0, 2 * tp / denom, np.nan)

    def miou(self) -> float:
        """Mean IoU over the classes that occur (background included); NaN when nothing was counted."""
        return _nanmean(self.iou())

    def mdice(self) -> float:
        """Mean Dice over the classes that occur (background included)."""
        return _nanmean(self.dice())

    def accuracy(self) -> float:
        """Pixel accuracy over non-ignored pixels; NaN when nothing was counted."""
        m = self.numpy()
        total = m.sum()
        return float(np.trace(m) / total) if total else math.nan

    def results(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able summary, fractions in [0, 1] and NaN as ``None``: keys ``miou``, ``mdice``,
        ``accuracy``, ``iou`` and ``dice`` (``{class name: value}``) and ``confusion`` (nested lists,
        rows = ground truth); plus the keys of :meth:`SurfaceDistances.results` (``hd95``, ``asd``,
        ``assd``, ``mhd95``, ``masd``, ``massd``, ``surface_counts``) when :attr:`surface` is set;
        ``per_image`` when the evaluation kept it; for a volume evaluation (:attr:`volumes`), the
        per-volume means of :meth:`semiseg.volume_metrics.VolumeMetrics.results` replace ``dice`` /
        ``mdice`` (foreground classes, per volume) and add the 3-D distances."""
        names = _names(class_names, self.num_classes)
        iou, dice = self.iou(), self.dice()
        out = {
            "miou": _json_float(self.miou()),
            "mdice": _json_float(self.mdice()),
            "accuracy": _json_float(self.accuracy()),
            "iou": {n: _json_float(v) for n, v in zip(names, iou)},
            "dice": {n: _json_float(v) for n, v in zip(names, dice)},
            "confusion": self.numpy().tolist(),
        }
        if self.surface is not None:
            out.update(self.surface.results(names))
        if self.volumes is not None:  # 3-D per-volume Dice / distances replace the pooled Dice
            out.update(self.volumes.results(names))
        elif self.per_image is not None:
            out["per_image"] = self.per_image
        return out

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.mat.sum())})"
