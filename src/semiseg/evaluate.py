"""The one evaluation path: whole-image or sliding-window inference, confusion-matrix metrics, DDP.

Inference (:func:`predict_logits`) takes a normalised ``N×C×H×W`` image batch and returns
``N×K×H×W`` logits at the input size:

* ``whole``: the image is padded on the bottom/right to a multiple of ``eval.size_divisor``, run
  once, and the logits are cropped back. Padding uses ``pad_value`` (per channel, in normalised
  space); :func:`evaluate` and :func:`semiseg.predict.predict_folder` pass the normalised value of a
  **black** pixel, which is what training pads crops with (image padded with 0 before
  normalisation, as UniMatch pads), so the network sees at test time the same border it learnt on.
* ``sliding``: square windows of ``eval.window`` with stride ``window·(1−overlap)`` (at least 1);
  the last window of each row/column is aligned to the image border so every pixel is covered; an
  image smaller than the window is padded up to it first. Softmax probabilities are averaged over
  the overlapping windows (a count map divides the sum), and the result is returned as
  ``log(mean probability)`` — valid logits whose softmax is the averaged probabilities.

:func:`evaluate` runs a model over records and returns a :class:`~semiseg.metrics.ConfusionMatrix`.
Under DDP each rank takes ``records[rank::world_size]`` — a partition, so no record is counted twice
(unlike ``DistributedSampler``'s padding) — and the matrices are summed with ``all_reduce``.
With ``eval.surface_metrics`` (the default) each image's prediction is also scored with HD95 / ASD /
ASSD per foreground class (:class:`~semiseg.metrics.SurfaceDistances`, per image at the evaluated
resolution, in pixels); their per-class sums and counts are reduced the same way and attached to the
matrix (``cm.surface``), so ``cm.results()`` carries them. The IoU / Dice path is unchanged.
Every image's confusion counts are kept too (``per_image``: name, per-class ``tp`` / ``fp`` /
``fn``), so reports can bootstrap over test images.

**By volume** (``unit="volume"``, ACDC's default through ``eval.unit: auto``): records that are
slices of one volume file are evaluated together. Each slice is read at its **original** size,
resized to the training input size (``data.size`` / ``data.resize`` / ``data.long_side``, the same
resampling training reads use), predicted, and its argmax resized back to the original in-plane
size with nearest-neighbour zoom (``scipy.ndimage.zoom(order=0)``, as SSL4MIS's
``test_single_volume``); the stacked ``D×H×W`` prediction is then scored in 3-D per volume
(:mod:`semiseg.volume_metrics`: Dice, HD95, ASD per class, averaged over volumes). The confusion
matrix (pooled IoU) is filled from the same full-size volumes. Under DDP ranks take whole volumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DataConfig, EvalConfig, RunConfig
from .data.base import Record
from .data.io import image_to_tensor, normalization, read_record, resize_pair, target_size
from .errors import DataError
from .metrics import ConfusionMatrix, SurfaceDistances
from .modes import eval_mode
from .volume_metrics import VolumeMetrics, confusion_counts

EVAL_UNITS = ("image", "volume")


def effective_eval_every(cfg: RunConfig, num_val: int) -> int:
    """Validation interval in steps (0: never). ``train.eval_every: 0`` (the default) means auto:
    every ``ceil(iters / 10)`` steps when the run has a validation split, never without one; ``-1``:
    never."""
    if not num_val or cfg.train.eval_every < 0:
        return 0
    return cfg.train.eval_every or max(1, math.ceil(cfg.train.iters / 10))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (else ``model``).

    Evaluation calls the bare module: ranks evaluate different numbers of images, and a DDP forward
    may run collectives (buffer broadcast) that would then deadlock.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def pad_value_for(data_cfg: DataConfig, channels: int) -> list[float]:
    """Normalised value of a black pixel per channel (``(0 − mean) / std``): the training pad value."""
    mean, std = normalization(data_cfg, channels)
    return [-m / s for m, s in zip(mean, std)]


def _pad(x: Tensor, pad_h: int, pad_w: int, value: float | Sequence[float]) -> Tensor:
    """Pad ``N×C×H×W`` on the bottom/right with a scalar or per-channel constant."""
    if pad_h <= 0 and pad_w <= 0:
        return x
    pad_h, pad_w = max(pad_h, 0), max(pad_w, 0)
    if isinstance(value, (int, float)):
        return F.pad(x, (0, pad_w, 0, pad_h), value=float(value))
    n, c, h, w = x.shape
    if len(value) != c:
        raise ValueError(f"pad_value has {len(value)} entries for a {c}-channel image")
    fill = torch.tensor(list(value), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    out = fill.expand(n, c, h + pad_h, w + pad_w).clone()
    out[:, :, :h, :w] = x
    return out


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    logits = getattr(out, "logits", out)  # a SegOutput, or the logits tensor
    if logits.shape[-2:] != x.shape[-2:]:
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits.float()


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` and a last one aligned to the end.

    ``length >= window`` is assumed (smaller inputs are padded up to the window first).
    """
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def sliding_windows(height: int, width: int, window: int, overlap: float) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of the sliding windows over a ``height × width`` image.

    The stride is ``max(1, int(window · (1 − overlap)))``; together the windows cover every pixel.
    """
    stride = max(1, int(window * (1.0 - overlap)))
    ys = window_starts(max(height, window), window, stride)
    xs = window_starts(max(width, window), window, stride)
    return [(y, x) for y in ys for x in xs]


def predict_logits(
    model: nn.Module,
    image: Tensor,
    cfg: EvalConfig,
    pad_value: float | Sequence[float] = 0.0,
    window_batch: int = 4,
) -> Tensor:
    """Logits ``N×K×H×W`` for a normalised image batch ``N×C×H×W`` (see the module docstring).

    The caller puts the model in eval mode and disables autograd (as :func:`evaluate` does).
    ``pad_value`` is the padding constant in normalised space (a scalar or one value per channel);
    ``window_batch`` is how many sliding windows go through the model at once.
    """
    if image.dim() != 4:
        raise ValueError(f"expected an N×C×H×W image batch, got shape {tuple(image.shape)}")
    n, _, h, w = image.shape
    if cfg.mode == "whole":
        div = max(1, cfg.size_divisor)
        ph, pw = (-h) % div, (-w) % div
        logits = _forward(model, _pad(image, ph, pw, pad_value))
        return logits[:, :, :h, :w]
    if cfg.mode != "sliding":
        raise ValueError(f"eval.mode: unknown inference mode {cfg.mode!r} (whole | sliding)")

    win = cfg.window
    x = _pad(image, win - h, win - w, pad_value)  # only pads when smaller than the window
    hp, wp = x.shape[-2:]
    corners = sliding_windows(hp, wp, win, cfg.overlap)
    probs: Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=image.device, dtype=torch.float32)
    for i in range(0, len(corners), max(1, window_batch)):
        chunk = corners[i : i + max(1, window_batch)]
        crops = torch.cat([x[:, :, y : y + win, xx : xx + win] for y, xx in chunk])
        out = _forward(model, crops).softmax(1)
        if probs is None:
            probs = torch.zeros(n, out.shape[1], hp, wp, device=image.device, dtype=torch.float32)
        for j, (y, xx) in enumerate(chunk):
            probs[:, :, y : y + win, xx : xx + win] += out[j * n : (j + 1) * n]
            count[:, :, y : y + win, xx : xx + win] += 1
    assert probs is not None
    mean = (probs / count)[:, :, :h, :w]
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()


def _check_masks(records: Sequence[Record]) -> None:
    for r in records:
        if r.mask is None:
            where = r.image if r.index is None else f"{r.image}[{r.index}]"
            raise DataError(f"{where}: evaluation needs a ground-truth mask but record {r.name!r} has none")


def volume_groups(records: Sequence[Record]) -> list[tuple[str, list[Record]]]:
    """Records grouped into volumes: the slices (``index``) of one file, in slice order, named by the
    file's stem, in the order volumes first appear. A record that is not a slice is a DataError."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        if r.index is None:
            raise DataError(
                f"{r.image}: eval.unit=volume needs slices of volume files, but record {r.name!r} is a "
                "whole image (set eval.unit: image)"
            )
        groups.setdefault(r.image, []).append(r)
    return [(Path(path).stem, sorted(group, key=lambda r: r.index)) for path, group in groups.items()]


def resolve_unit(eval_cfg: EvalConfig, dataset_unit: str) -> str:
    """``eval.unit``, with ``auto`` meaning the dataset's own unit (ACDC: volume; others: image)."""
    unit = dataset_unit if eval_cfg.unit == "auto" else eval_cfg.unit
    if unit not in EVAL_UNITS:
        raise ValueError(f"eval.unit: unknown unit {unit!r} (auto | image | volume)")
    return unit


def primary_metric(results: dict[str, Any]) -> tuple[str, float]:
    """The number a run is selected and summarised by: mean foreground Dice per volume for volume
    evaluation (what ACDC papers quote), mIoU otherwise."""
    key = "mdice" if results.get("evaluation") == "volume" else "miou"
    value = results.get(key)
    return key, (math.nan if value is None else float(value))


def _zoom_nearest(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour zoom of an ``h×w`` label map to ``size`` (``scipy.ndimage.zoom(order=0)``)."""
    if pred.shape == size:
        return pred
    from scipy import ndimage

    out = ndimage.zoom(pred, (size[0] / pred.shape[0], size[1] / pred.shape[1]), order=0)
    if out.shape != size:  # float rounding of the zoomed shape: fall back to an exact-size resize
        from PIL import Image

        out = np.asarray(Image.fromarray(pred.astype(np.uint8)).resize(size[::-1], Image.NEAREST))
    return out


class SlicePredictor:
    """Argmax prediction of one normalised image at the model's input, with AMP on CUDA."""

    def __init__(
        self, net: nn.Module, data_cfg: DataConfig, eval_cfg: EvalConfig, in_channels: int, device, amp
    ):
        self.net, self.data_cfg, self.eval_cfg, self.device = net, data_cfg, eval_cfg, device
        self.in_channels = in_channels
        self.amp = amp and device.type == "cuda"
        self.pad_value = pad_value_for(data_cfg, in_channels)

    def __call__(self, image: np.ndarray) -> Tensor:
        x = image_to_tensor(image, self.data_cfg).unsqueeze(0).to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=self.amp):
            logits = predict_logits(self.net, x, self.eval_cfg, self.pad_value)
        return logits.argmax(1)[0]

    def at_original_size(self, image: np.ndarray) -> np.ndarray:
        """uint8 class map of an ``H×W×C`` slice read at its original size: resized to the model's
        input size (``data.size`` / ``resize`` / ``long_side``), predicted, and zoomed back to
        ``H×W`` by nearest neighbour, as per-volume evaluation scores it."""
        size = target_size(image.shape[0], image.shape[1], self.data_cfg)
        model_input, _ = resize_pair(image, None, size)
        pred = self(model_input).cpu().numpy().astype(np.uint8)
        return _zoom_nearest(pred, image.shape[:2])


def evaluate(
    model: nn.Module,
    records: Sequence[Record],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    num_classes: int,
    in_channels: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    amp: bool = False,
    surface_metrics: bool | None = None,
    unit: str = "image",
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` over ``records`` (every record must have a mask).

    Images are read with the configured resize (:func:`~semiseg.data.io.read_record`), normalised,
    and predicted one at a time (sizes vary) with :func:`predict_logits` in ``eval`` mode under
    ``torch.inference_mode``; autocast is used when ``amp`` is set and the device is CUDA. This rank
    evaluates ``records[rank::world_size]``; with ``world_size > 1`` and ``torch.distributed``
    initialised the matrices are summed over ranks, so every rank returns the full-set matrix. The
    model's train/eval state is restored afterwards. A record without a mask raises
    :class:`~semiseg.errors.DataError` naming its file (checked on all records, so every rank fails
    alike instead of hanging in the reduction).

    ``surface_metrics`` (default: ``eval_cfg.surface_metrics``) also scores every image with the
    surface distances (HD95 / ASD / ASSD, :class:`~semiseg.metrics.SurfaceDistances`), attached as
    ``cm.surface`` and reduced over ranks like the matrix (every rank must pass the same value).
    Training-time validation can pass ``False`` to keep to the confusion matrix.

    ``unit="volume"`` scores slices of a volume together in 3-D (module docstring); the per-volume
    metrics are attached as ``cm.volumes`` and ``cm.results()`` reports them.
    """
    if unit not in EVAL_UNITS:
        raise ValueError(f"unit must be one of {EVAL_UNITS}, got {unit!r}")
    device = torch.device(device)
    _check_masks(records)
    net = unwrap_model(model)
    cm = ConfusionMatrix(num_classes, device)
    if surface_metrics is None:
        surface_metrics = eval_cfg.surface_metrics
    predict = SlicePredictor(net, data_cfg, eval_cfg, in_channels, device, amp)
    with eval_mode(net), torch.inference_mode():
        if unit == "volume":
            cm.volumes = _evaluate_volumes(predict, records, cm, surface_metrics, rank, world_size)
        else:
            cm.surface, cm.per_image = _evaluate_images(
                predict, records, cm, surface_metrics, rank, world_size
            )
    if world_size > 1:
        cm.all_reduce()
        if cm.surface is not None:
            cm.surface.all_reduce()
        if cm.volumes is not None:
            cm.volumes.all_gather()
        else:
            cm.per_image = _gather_sorted(cm.per_image)
    return cm


def _evaluate_images(
    predict: SlicePredictor, records, cm: ConfusionMatrix, surface_metrics: bool, rank, world_size
):
    """Whole-image evaluation of this rank's records: fills ``cm``; returns the surface distances
    (or ``None``) and the per-image confusion counts."""
    num_classes = cm.num_classes
    surface = SurfaceDistances(num_classes) if surface_metrics else None
    per_image = []
    for record in records[rank::world_size]:
        image, mask = read_record(record, predict.data_cfg, num_classes, predict.in_channels)
        assert mask is not None
        target = torch.from_numpy(np.asarray(mask, dtype=np.int64)).to(predict.device)
        pred = predict(image)
        cm.update(pred, target)
        if surface is not None:
            surface.update(pred, target)
        counts = confusion_counts(pred.cpu().numpy(), np.asarray(mask), num_classes)
        per_image.append({"name": record.name, **counts})
    per_image.sort(key=lambda entry: entry["name"])
    return surface, per_image


def _evaluate_volumes(
    predict: SlicePredictor, records, cm: ConfusionMatrix, surface_metrics: bool, rank, world_size
) -> VolumeMetrics:
    """Volume evaluation of this rank's volumes (see the module docstring); fills ``cm``."""
    num_classes = cm.num_classes
    original = dataclasses.replace(predict.data_cfg, resize=1.0, long_side=None, size=None)
    volumes = VolumeMetrics(num_classes, distances=surface_metrics)
    for name, slices in volume_groups(records)[rank::world_size]:
        preds, labels = [], []
        for record in slices:
            image, mask = read_record(record, original, num_classes, predict.in_channels)
            assert mask is not None
            preds.append(predict.at_original_size(image))
            labels.append(np.asarray(mask))
        pred_volume, label_volume = np.stack(preds), np.stack(labels)
        as_tensor = lambda a: torch.from_numpy(a.astype(np.int64)).to(cm.mat.device)
        cm.update(as_tensor(pred_volume), as_tensor(label_volume))
        volumes.update(name, pred_volume, label_volume)
    volumes.cases.sort(key=lambda case: case["name"])
    return volumes


def _gather_sorted(entries: list[dict]) -> list[dict]:
    """Every rank's per-image entries (an all-gather), ordered by name."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, entries)
        entries = [entry for part in gathered for entry in part]
    return sorted(entries, key=lambda entry: entry["name"])


def evaluate_to_results(
    model: nn.Module,
    records: Sequence[Record],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    class_names: Sequence[str],
    in_channels: int,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    amp: bool = False,
    surface_metrics: bool | None = None,
    unit: str = "image",
) -> dict[str, Any]:
    """:func:`evaluate` followed by :meth:`ConfusionMatrix.results` (``num_classes = len(class_names)``)."""
    cm = evaluate(
        model,
        records,
        data_cfg,
        eval_cfg,
        len(class_names),
        in_channels,
        device,
        rank,
        world_size,
        amp,
        surface_metrics,
        unit,
    )
    return cm.results(class_names)
