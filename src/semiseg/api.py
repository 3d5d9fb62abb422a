"""semiseg as a library: train, load, predict.

.. code-block:: python

    import semiseg

    config = ["protocols/cpu_small", "datasets/chase_db1", "methods/unimatch"]  # merged in order
    result = semiseg.train(config, overrides={"train.iters": 200})
    predictor = semiseg.load(result.run_dir)              # a run, a checkpoint or an export folder
    prediction = predictor.predict(image)                 # H×W or H×W×C, uint8 or float in [0, 1]
    prediction.mask, prediction.probs                     # H×W int64, C×H×W float32
    rgb = predictor.overlay(image, prediction.mask)

:func:`train` resolves config names like ``semiseg train --config`` (a file, or a name under the
built-in configs; a list of them is merged in order, later ones winning, as repeated ``-c`` are).
:meth:`Predictor.predict` preprocesses exactly like ``semiseg predict``: the image is scaled to
``[0, 1]`` as an image file would be read, resized per ``data.size`` / ``data.resize`` /
``data.long_side`` (bilinear), normalised with the run's mean / std, predicted with the run's ``eval.mode``
(``whole``: padded to ``eval.size_divisor`` with the normalised black pixel; ``sliding``:
``eval.window`` / ``eval.overlap``), and the prediction is resized back to the input size (nearest
neighbour). Messages go to the ``semiseg`` logger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import (
    RunConfig,
    apply_overrides,
    build_config,
    config_to_dict,
    load_config_file,
)
from .config_load import resolve_config_path, resolve_config_paths
from .errors import DataError, SemisegError
from .modes import eval_mode
from .registry import REGISTRIES

if TYPE_CHECKING:  # annotations only: torch, the trainer and the export code load on first use
    import torch

    from .export import InferenceSpec
    from .trainer import TrainResult

log = logging.getLogger("semiseg")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"data": {"labeled": 4}}`` -> ``[("data.labeled", 4)]``; empty mappings stay values."""
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items.extend(_flatten(value, f"{dotted}."))
        else:
            items.append((dotted, value))
    return items


def override_list(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """``KEY=VALUE`` strings from a list of them or a mapping (dotted keys or nested mappings).

    Mapping values are written as JSON, which the override parser reads back as the same value.
    """
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        out = []
        for key, value in _flatten(overrides):
            if isinstance(value, Path):
                value = str(value)
            if isinstance(value, tuple):
                value = list(value)
            try:
                text = json.dumps(value)
            except TypeError:
                raise SemisegError(
                    f"override {key}: cannot use a {type(value).__name__} as a config value"
                ) from None
            out.append(f"{key}={text}")
        return out
    return [str(item) for item in overrides]


ConfigSource = str | Path | Sequence[str | Path] | RunConfig | None


def load_run_config(
    config: ConfigSource = None, overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> RunConfig:
    """A validated :class:`~semiseg.config.RunConfig` from a built-in config name, a YAML path, a
    list of them (merged in order, later ones winning, like repeated ``semiseg train -c``), a config
    object or ``None`` (the defaults), with ``overrides`` applied (as ``--set`` does)."""
    items = override_list(overrides)
    if isinstance(config, RunConfig):
        return build_config(apply_overrides(config_to_dict(config), items))
    if config is None or isinstance(config, (str, Path)):
        path = resolve_config_path(str(config)) if config is not None else None
        return load_config_file(path, items)
    return load_config_file(resolve_config_paths([str(c) for c in config]), items)


def train(
    config: ConfigSource = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train (or ``resume``) a run, as ``semiseg train`` does, and evaluate its final weights.

    ``config``: a built-in config name (``"demo"``, ``"methods/unimatch"``), a YAML path, a list of
    them merged in order (``["protocols/cpu_small", "datasets/chase_db1", "methods/unimatch"]``), a
    :class:`~semiseg.config.RunConfig`, or ``None`` for the defaults (when resuming: the config
    ``run_dir`` was started with). ``run_dir``: by default a new ``runs/<name>`` (``-2``,
    ``-3``, ... when taken); resuming needs it. ``overrides``:
    ``["train.iters=200"]`` or ``{"train.iters": 200, "data": {"labeled": 4}}``. Returns the
    trainer's :class:`~semiseg.trainer.TrainResult` (``run_dir``, ``results`` per split, ``steps``,
    ``seconds``). Raises :class:`~semiseg.errors.SemisegError` (one line, naming the key or file)
    on bad input.
    """
    from .run_dir import saved_run_config
    from .trainer import train as run_training

    saved = saved_run_config(run_dir) if resume and run_dir is not None and config is None else None
    cfg = (
        load_run_config(config, overrides)
        if saved is None
        else build_config(apply_overrides(saved, override_list(overrides)))
    )
    log.info(
        "training %s (method %s, model %s, %d steps)",
        cfg.name,
        cfg.method.name,
        cfg.model.name,
        cfg.train.iters,
    )
    result = run_training(cfg, run_dir=run_dir, resume=resume)
    log.info("finished %s after %d steps (%.1f s)", result.run_dir, result.steps, result.seconds)
    return result


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """``mask``: ``H×W`` int64 class indices; ``probs``: ``C×H×W`` float32 class probabilities
    (softmax, averaged over windows in sliding mode), both at the input image's size."""

    mask: np.ndarray
    probs: np.ndarray


def image_to_float(image: np.ndarray) -> np.ndarray:
    """An image array as ``semiseg predict`` reads an image file: ``H×W×C`` float32 in ``[0, 1]``.

    ``H×W`` (greyscale) or ``H×W×C``; uint8 is divided by 255, 16-bit / integer images by 65535 if
    any value exceeds 255 (else 255), booleans map to 0 / 1, floats are taken as already in
    ``[0, 1]``. A fourth (alpha) channel of an RGBA image and the second of a grey + alpha image are
    dropped, as when reading the file.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise DataError(f"image must be H×W or H×W×C with H, W, C >= 1, got shape {np.shape(image)}")
    if arr.shape[2] == 4:
        arr = arr[..., :3]  # RGBA -> RGB
    elif arr.shape[2] == 2:
        arr = arr[..., :1]  # LA -> L
    if arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.size and arr.min() < 0:
            raise DataError(f"image: negative pixel values ({int(arr.min())}) in an integer image")
        peak = 65535.0 if arr.size and arr.max() > 255 else 255.0
        out = (arr.astype(np.float32) / peak).clip(0, 1)
    elif np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
    else:
        raise DataError(f"image: unsupported dtype {arr.dtype} (uint8, integer, bool or float)")
    if not np.isfinite(out).all():
        raise DataError("image holds NaN or Inf values")
    return np.ascontiguousarray(out)


class Predictor:
    """A trained network ready for inference on numpy images (see :func:`load`).

    Attributes: ``model`` (eval mode, on ``device``), ``spec``
    (:class:`~semiseg.export.InferenceSpec`: model config, channels, classes, normalisation,
    resize and inference settings), ``class_names``, ``palette``, ``in_channels``, ``num_classes``.
    """

    def __init__(
        self, model: torch.nn.Module, spec: InferenceSpec, device: str | torch.device = "cpu"
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec = spec
        self.data_cfg = spec.data_config()
        self.eval_cfg = spec.eval

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [tuple(c) for c in self.spec.palette]

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __repr__(self) -> str:
        return (
            f"Predictor({self.spec.model.name}, {self.in_channels} channel(s) -> classes {self.class_names}, "
            f"eval {self.eval_cfg.mode}, device {self.device})"
        )

    def _as_input(self, image: np.ndarray | str | Path) -> np.ndarray:
        if isinstance(image, (str, Path)):
            from .data.io import open_image, pil_to_float

            img = open_image(image)
            if img.mode == "F" and not np.isfinite(np.asarray(img)).all():
                raise DataError(f"{image}: image holds NaN or Inf values")
            arr = pil_to_float(img)
        else:
            arr = image_to_float(image)
        if arr.shape[2] != self.in_channels:
            raise DataError(f"image has {arr.shape[2]} channel(s) but the model expects {self.in_channels}")
        return arr

    def predict(self, image: np.ndarray | str | Path) -> Prediction:
        """Class mask and probabilities of one image (an array, or an image file's path), at its size.

        The same preprocessing and inference as ``semiseg predict`` (module docstring): the mask is
        the one ``semiseg predict`` writes for the same image; ``probs`` are resized back with the same
        nearest-neighbour mapping, so ``mask == probs.argmax(0)``.
        """
        import torch
        from PIL import Image

        from .data.io import image_to_tensor, resize_pair, target_size
        from .evaluate import pad_value_for, predict_logits

        original = self._as_input(image)
        oh, ow = original.shape[:2]
        resized, _ = resize_pair(original, None, target_size(oh, ow, self.data_cfg))
        x = image_to_tensor(resized, self.data_cfg).unsqueeze(0).to(self.device)
        pad_value = pad_value_for(self.data_cfg, self.in_channels)
        with eval_mode(self.model), torch.inference_mode():
            logits = predict_logits(self.model, x, self.eval_cfg, pad_value)
            probs = logits.float().softmax(1)[0]
            pred = logits.argmax(1)[0]
        probs_np = probs.cpu().numpy().astype(np.float32)
        if self.num_classes <= 256:
            mask = pred.to(torch.uint8).cpu().numpy()
        else:
            mask = pred.to(torch.int32).cpu().numpy()
        if mask.shape != (oh, ow):  # as predict_folder: nearest neighbour back to the input size
            mask = np.asarray(Image.fromarray(mask).resize((ow, oh), Image.NEAREST))
            probs_np = np.stack(
                [np.asarray(Image.fromarray(c).resize((ow, oh), Image.NEAREST)) for c in probs_np]
            ).astype(np.float32)
        return Prediction(mask=mask.astype(np.int64), probs=probs_np)

    __call__ = predict

    def predict_volume(self, volume: np.ndarray | str | Path) -> np.ndarray:
        """``D×H×W`` int64 class indices of a volume: a ``D×H×W`` array, or an ``.h5`` file in the
        SSL4MIS layout (its ``'image'``; ``H×W`` for a 2-D slice file). Each slice is taken as the
        ``"h5"`` reader takes it (as stored when in [0, 1], else min-max scaled) and predicted as
        per-volume evaluation and ``semiseg predict`` predict it (resized to the model's input,
        zoomed back by nearest neighbour), so the result is the ``'label'`` of the
        ``<stem>_mask.h5`` that ``semiseg predict`` writes."""
        import torch

        from .data.acdc import read_h5_slices, unit_range
        from .evaluate import SlicePredictor

        if self.in_channels != 1:
            raise DataError(f"a volume has 1 channel but the model expects {self.in_channels}")
        if isinstance(volume, (str, Path)):
            slices, one_slice = read_h5_slices(Path(volume))
        else:
            arr = np.asarray(volume)
            if arr.ndim != 3 or 0 in arr.shape:
                raise DataError(f"volume must be D×H×W with D, H, W >= 1, got shape {arr.shape}")
            if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
                raise DataError(f"volume: expected finite numbers, got dtype {arr.dtype}")
            slices, one_slice = [unit_range(s)[..., None] for s in arr], False
        predict = SlicePredictor(self.model, self.data_cfg, self.eval_cfg, 1, self.device, amp=False)
        with eval_mode(self.model), torch.inference_mode():
            preds = [predict.at_original_size(s).astype(np.int64) for s in slices]
        return preds[0] if one_slice else np.stack(preds)  # a 2-D .h5 file: its H×W slice

    def overlay(self, image: np.ndarray | str | Path, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """Class colours blended over ``image`` (background untinted): ``H×W×3`` uint8, as the
        ``<stem>_overlay.png`` of ``semiseg predict``."""
        from .visualize import overlay

        return overlay(self._as_input(image), np.asarray(mask), self.palette, alpha=alpha)


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    if isinstance(device, torch.device):
        return device
    from .distributed import pick_device

    return pick_device(device or "cpu", "device")


def load(
    path: str | Path,
    device: str | torch.device = "cpu",
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> Predictor:
    """A :class:`Predictor` from a run directory (its ``latest.pt``, or ``latest.prev.pt`` when that
    is damaged), a checkpoint file or an export folder (``semiseg export``).

    Checkpoints are always read on the CPU first (a run trained on a GPU loads on a CPU-only
    machine), then moved to ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``). The network is
    rebuilt from the saved config without ImageNet downloads or backbone weight files
    (``model.pretrained`` / ``model.weights`` only initialise training; the saved weights replace
    them). ``overrides`` change the saved inference settings as ``--set`` does for ``semiseg
    predict`` (e.g. ``["eval.mode=sliding"]``); an export folder accepts ``eval.*``,
    ``data.size``, ``data.resize`` and ``data.long_side``.
    """
    from .export import SPEC_FILE, InferenceSpec, is_export_dir, load_exported

    p = Path(path)
    target = _device(device)
    items = override_list(overrides)
    if p.is_file() and p.name == SPEC_FILE:
        p = p.parent
    if p.is_dir() and (p / SPEC_FILE).is_file():
        if not is_export_dir(p):
            raise SemisegError(f"{p}: export folder without its weights file (model.safetensors)")
        model, spec = load_exported(p, target)
        if items:
            spec = _override_spec(spec, items, p / SPEC_FILE)
        log.info("loaded export %s (%s) on %s", p, spec.model.name, target)
        return Predictor(model, spec, target)
    if not p.exists():
        raise SemisegError(f"{p}: no such run directory, checkpoint or export folder")
    from .inference import load_trained_model, resolve_run_checkpoint

    checkpoint = resolve_run_checkpoint(str(p))
    cfg, model, ckpt = load_trained_model(
        checkpoint, [*items, "model.pretrained=false", "model.weights=null"]
    )
    spec = InferenceSpec.from_run(cfg, ckpt)
    log.info("loaded %s (step %s, %s) on %s", checkpoint, ckpt.get("step"), spec.model.name, target)
    return Predictor(model, spec, target)


EXPORT_OVERRIDABLE = (
    "eval.mode",
    "eval.window",
    "eval.overlap",
    "eval.size_divisor",
    "data.resize",
    "data.long_side",
    "data.size",
)


def _override_spec(spec: InferenceSpec, items: list[str], where: Path) -> InferenceSpec:
    """Apply the ``eval.*`` / ``data.*`` overrides of :data:`EXPORT_OVERRIDABLE` to an export's spec."""
    from .export import InferenceSpec

    for item in items:
        key = item.split("=", 1)[0].strip()
        if key not in EXPORT_OVERRIDABLE:
            raise SemisegError(
                f"override {key}: an export folder ({where}) accepts only {', '.join(EXPORT_OVERRIDABLE)}"
            )
    new = InferenceSpec.from_dict(apply_overrides(spec.to_dict(), items), f"{where} with overrides")
    if not 0.0 <= new.eval.overlap < 1.0 or new.eval.window < 1 or new.resize <= 0:
        raise SemisegError(
            f"overrides {' '.join(items)}: eval.overlap in [0, 1), eval.window >= 1, data.resize > 0"
        )
    return new


# ---------------------------------------------------------------------------------------------
# What is registered
# ---------------------------------------------------------------------------------------------

#: Section of :func:`registered` -> (label, the config key that selects one of its entries).
REGISTRY_KEYS = {
    "methods": ("methods", "method.name"),
    "mixers": ("mixers", "method.mix"),
    "plugins": ("plug-ins", "plugins.<name>"),
    "pseudo_label_masks": ("pseudo-label masks", "method.pseudo.mask"),
    "pseudo_label_alignment": ("pseudo-label alignment", "method.pseudo.align"),
    "datasets": ("datasets", "data.name"),
    "models": ("models", "model.name"),
}


def registered() -> dict[str, list[str]]:
    """Names of every registered method, mixer, plug-in, pseudo-label policy, dataset and model
    (built-in ones and those installed packages add through entry points; nothing is imported)."""
    return {key: REGISTRIES[key].names() for key in REGISTRY_KEYS}


def format_registered(entries: dict[str, list[str]] | None = None) -> str:
    """:func:`registered` as aligned text lines: ``section:  names  (config key)``."""
    entries = registered() if entries is None else entries
    rows = []
    for key, names in entries.items():
        label, config_key = REGISTRY_KEYS.get(key, (key, ""))
        rows.append((f"{label}:", ", ".join(names) or "-", f"({config_key})" if config_key else ""))
    w0 = max(len(r[0]) for r in rows) + 1
    w1 = max(len(r[1]) for r in rows) + 2
    return "\n".join(f"{a.ljust(w0)}{b.ljust(w1)}{c}".rstrip() for a, b, c in rows)


__all__ = [
    "Prediction",
    "Predictor",
    "format_registered",
    "image_to_float",
    "load",
    "load_run_config",
    "override_list",
    "registered",
    "train",
]
