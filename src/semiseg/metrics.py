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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .types import IGNORE_INDEX


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


# ------------------------------------------------------------------------------------------------
# Surface distances (HD95, ASD, ASSD): see the module docstring for the definitions
# ------------------------------------------------------------------------------------------------

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
    (2-D, same shape; definitions and empty cases in the module docstring).

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
    The last rows give mIoU / mDice and pixel accuracy. When ``results`` holds surface distances
    (``hd95``), two more columns give HD95 and ASD in pixels (``–`` for the background, which is
    not scored, and ``n/a`` for a class no image was scored on), their foreground means on the
    mIoU row. A volume evaluation (``evaluation: volume``) labels its Dice mean as the foreground
    mean per volume and its distances in voxels.
    """
    names = list(class_names) if class_names is not None else list(results["iou"])
    surface = "hd95" in results

    def missing(v: float | None) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    def pct(v: float | None) -> str:
        return "n/a" if missing(v) else f"{100.0 * v:.2f}"

    def px(key: str, name: str) -> str:
        counts = results.get("surface_counts", {})
        if name not in counts:
            return "–"
        v = results[key].get(name)
        return "n/a" if missing(v) else f"{v:.2f}"

    def mean_px(key: str) -> str:
        v = results.get(key)
        return "n/a" if missing(v) else f"{v:.2f}"

    rows = [[n, pct(results["iou"].get(n)), pct(results["dice"].get(n))] for n in names]
    volume = results.get("evaluation") == "volume"  # Dice and distances per volume in 3-D, foreground mean
    mean_label = "mIoU / fg mean Dice" if volume else "mIoU / mDice"
    rows_tail = [[mean_label, pct(results.get("miou")), pct(results.get("mdice"))]]
    if "accuracy" in results:
        rows_tail.append(["pixel accuracy", pct(results["accuracy"]), ""])
    header = ["class", "IoU", "Dice"]
    if surface:
        header += ["HD95 vox", "ASD vox"] if volume else ["HD95 px", "ASD px"]
        for row in rows:
            row += [px("hd95", row[0]), px("asd", row[0])]
        rows_tail[0] += [mean_px("mhd95"), mean_px("masd")]
        for row in rows_tail[1:]:
            row += ["", ""]
    width = max(len("class"), *(len(r[0]) for r in rows + rows_tail))
    col = 7

    def line(cells: list[str]) -> str:
        return f"| {cells[0]:<{width}} | " + " | ".join(f"{c:>{col}}" for c in cells[1:]) + " |"

    sep = f"|{'-' * (width + 2)}|" + f"{'-' * (col + 1)}:|" * (len(header) - 1)
    out = [line(header), sep, *(line(r) for r in rows)]
    out += [line(r) for r in rows_tail]
    empty = {
        n: c["empty_prediction"] for n, c in results.get("volume_counts", {}).items() if c["empty_prediction"]
    }
    if empty and surface:
        listed = ", ".join(f"{n} {k}" for n, k in empty.items())
        out.append(
            f"(volumes with an empty prediction, scored Dice 0 and HD95/ASD 0 as in SSL4MIS: {listed})"
        )
    return "\n".join(out)
