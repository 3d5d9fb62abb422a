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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .data.base import IGNORE_INDEX


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN when there are none (without numpy's warning)."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


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

    # ---------------------------------------------------------------- accumulation

    def reset(self) -> None:
        self.mat.zero_()

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
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.mat.device)
        out.mat = self.mat.clone()
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
        rows = ground truth)."""
        names = _names(class_names, self.num_classes)
        iou, dice = self.iou(), self.dice()
        return {
            "miou": _json_float(self.miou()),
            "mdice": _json_float(self.mdice()),
            "accuracy": _json_float(self.accuracy()),
            "iou": {n: _json_float(v) for n, v in zip(names, iou)},
            "dice": {n: _json_float(v) for n, v in zip(names, dice)},
            "confusion": self.numpy().tolist(),
        }

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.mat.sum())})"


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]


def format_table(results: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class table (Markdown pipes, readable in a terminal) in percent with 2 decimals.

    ``results`` is the dict of :meth:`ConfusionMatrix.results`; ``class_names`` picks and orders
    the rows (default: every class of ``results``). Absent classes (``None``/NaN) show ``n/a``.
    The last rows give mIoU / mDice and pixel accuracy.
    """
    names = list(class_names) if class_names is not None else list(results["iou"])

    def pct(v: float | None) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100.0 * v:.2f}"

    rows = [(n, pct(results["iou"].get(n)), pct(results["dice"].get(n))) for n in names]
    rows_tail = [("mIoU / mDice", pct(results.get("miou")), pct(results.get("mdice")))]
    if "accuracy" in results:
        rows_tail.append(("pixel accuracy", pct(results["accuracy"]), ""))
    width = max(len("class"), *(len(r[0]) for r in rows + rows_tail))
    col = 7

    def line(a: str, b: str, c: str) -> str:
        return f"| {a:<{width}} | {b:>{col}} | {c:>{col}} |"

    sep = f"|{'-' * (width + 2)}|{'-' * (col + 1)}:|{'-' * (col + 1)}:|"
    out = [line("class", "IoU", "Dice"), sep, *(line(*r) for r in rows)]
    out += [line(*r) for r in rows_tail]
    return "\n".join(out)
