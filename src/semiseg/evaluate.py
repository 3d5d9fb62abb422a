"""The one evaluation path: whole-image or sliding-window inference, confusion-matrix metrics, DDP.

Inference (:func:`predict_logits`) takes a normalised ``N×C×H×W`` image batch and returns
``N×K×H×W`` logits at the input size:

* ``whole``: the image is padded on the bottom/right to a multiple of ``eval.size_divisor``, run
  once, and the logits are cropped back. Padding uses ``pad_value`` (per channel, in normalised
  space); :func:`evaluate` and :func:`semiseg.predict.predict_folder` pass the normalised value of a
  **black** pixel, which is what training pads crops with (image padded with 0 before
  normalisation, DESIGN §3.1), so the network sees at test time the same border it learnt on.
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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DataConfig, EvalConfig
from .data.base import Record
from .data.io import image_to_tensor, normalization, read_record
from .errors import DataError
from .metrics import ConfusionMatrix, SurfaceDistances


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
    """
    device = torch.device(device)
    _check_masks(records)
    net = unwrap_model(model)
    cm = ConfusionMatrix(num_classes, device)
    if surface_metrics is None:
        surface_metrics = eval_cfg.surface_metrics
    surface = SurfaceDistances(num_classes) if surface_metrics else None
    was_training = net.training
    net.eval()
    use_amp = amp and device.type == "cuda"
    pad_value = pad_value_for(data_cfg, in_channels)
    try:
        with torch.inference_mode():
            for record in records[rank::world_size]:
                image, mask = read_record(record, data_cfg, num_classes, in_channels)
                assert mask is not None
                x = image_to_tensor(image, data_cfg).unsqueeze(0).to(device)
                with torch.autocast(device_type=device.type, enabled=use_amp):
                    logits = predict_logits(net, x, eval_cfg, pad_value)
                target = torch.from_numpy(np.asarray(mask, dtype=np.int64)).to(device)
                pred = logits.argmax(1)[0]
                cm.update(pred, target)
                if surface is not None:
                    surface.update(pred, target)
    finally:
        net.train(was_training)
    if world_size > 1:
        cm.all_reduce()
        if surface is not None:
            surface.all_reduce()
    cm.surface = surface
    return cm


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
    )
    return cm.results(class_names)
