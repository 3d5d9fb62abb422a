"""A trained run, read back: checkpoints → networks, and what runs write about themselves.

* :func:`load_trained_model` rebuilds a run's evaluated network from its checkpoint (on the CPU,
  without ImageNet downloads or backbone weight files); :func:`model_state_from_checkpoint` and
  :func:`eval_prefix` locate that network inside a method's state dict;
* :func:`resolve_checkpoint` / :func:`resolve_run_checkpoint`: a run directory or a checkpoint file
  → the checkpoint to read;
* :func:`json_safe` and :func:`method_label`: how ``results.json``, ``eval_*.json`` and the grid
  reports write numbers and method names.

The training loop (:mod:`semiseg.trainer`) writes what this module reads; ``semiseg eval`` /
``predict`` / ``export``, the Python API and the grid reports read it without importing the loop.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import BEST, LATEST, load_checkpoint, previous_path
from .config import RunConfig, apply_overrides, build_config
from .errors import ConfigError, SemisegError, TrainingError
from .models.base import Segmenter
from .models.registry import build_model

if TYPE_CHECKING:  # annotations only
    from .methods.base import Method


def eval_prefix(method: Method) -> str:
    """State-dict prefix of the evaluated network inside the method (``model.``, ``teacher.``)."""
    target = method.eval_model()
    for name, module in method.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise TrainingError("method.eval_model() is not a submodule of the method")  # pragma: no cover


def model_state_from_checkpoint(ckpt: dict) -> dict[str, torch.Tensor]:
    """The evaluated network's state dict out of a checkpoint's method state (``eval_prefix``)."""
    prefix = ckpt.get("eval_prefix", "model.")
    return {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}


def load_init_weights(model: Segmenter, source: str | Path) -> None:
    """``train.init_from``: load the evaluated network of another run into ``model`` (strictly)."""
    ckpt_path = resolve_checkpoint(source)
    if not ckpt_path.is_file():
        raise ConfigError(f"train.init_from: {ckpt_path}: no such checkpoint (a run directory or a .pt file)")
    ckpt = load_checkpoint(ckpt_path)
    try:
        model.load_state_dict(model_state_from_checkpoint(ckpt))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"train.init_from: {ckpt_path}: its network does not match this run's model ({first})"
        ) from None


def load_trained_model(
    checkpoint: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[RunConfig, Segmenter, dict]:
    """``(config, model in eval mode on the CPU, checkpoint dict)`` of a saved run; ``overrides``
    (``KEY=VALUE``) change the saved config, e.g. the evaluation settings."""
    ckpt = load_checkpoint(checkpoint)
    cfg = build_config(apply_overrides(ckpt["config"], list(overrides)))
    # The saved weights replace any initialisation: never download ImageNet weights or read a
    # backbone weights file that may not exist on this machine (a run trained elsewhere).
    init_free = dataclasses.replace(cfg.model, pretrained=False, weights=None)
    model = build_model(init_free, ckpt["in_channels"], ckpt["num_classes"])
    model.load_state_dict(model_state_from_checkpoint(ckpt))
    model.eval()
    return cfg, model, ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory's ``latest.pt``."""
    p = Path(path)
    return p / LATEST if p.is_dir() else p


def resolve_run_checkpoint(path: str) -> Path:
    """A checkpoint file, or a run directory's ``latest.pt`` (its kept ``latest.prev.pt`` when
    ``latest.pt`` cannot be loaded; a warning on stderr says so)."""
    p = Path(path)
    if not p.is_dir():
        return p
    latest, prev = p / LATEST, previous_path(p / LATEST)
    try:
        load_checkpoint(latest)
    except SemisegError as exc:
        if not prev.is_file():
            raise
        print(f"warning: {exc}; using {prev}", file=sys.stderr)
        return prev
    return latest


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def method_label(cfg: RunConfig) -> str:
    """Readable method name for tables: ``unimatch+supmix+sufd``, ``unimatch+freematch+da``."""
    parts = [cfg.method.name]
    mix = getattr(cfg.method, "mix", None)
    if mix not in (None, "none", "cutmix"):  # CutMix is FixMatch's and UniMatch's own recipe
        parts.append(mix)
    parts.extend(sorted(cfg.plugins))
    pseudo = getattr(cfg.method, "pseudo", None)  # the unlabeled-loss recipe, when not the default
    if pseudo is not None and pseudo.mask != "fixed":
        parts.append(pseudo.mask)
    if pseudo is not None and pseudo.align != "none":
        parts.append("da")
    if getattr(cfg.method, "unlabeled_loss", "ce") != "ce":
        parts.append(cfg.method.unlabeled_loss)
    return "+".join(parts)


__all__ = [
    "BEST",
    "LATEST",
    "eval_prefix",
    "json_safe",
    "load_init_weights",
    "load_trained_model",
    "method_label",
    "model_state_from_checkpoint",
    "resolve_checkpoint",
    "resolve_run_checkpoint",
]
