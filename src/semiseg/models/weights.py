"""Loading backbone weights from a local file (``model.weights``).

ImageNet weights come in two ways:

* ``model.pretrained: true`` — timm downloads them (``timm.create_model(..., pretrained=True)``); this
  needs the network and is never the default;
* ``model.weights: path`` — a local file, for machines without the network: a backbone state dict
  saved with ``torch.save`` (``.pth``/``.pt``/``.bin``, read with ``weights_only=True``) or a
  ``.safetensors`` file (needs the ``safetensors`` package). Checkpoints that wrap the state dict in a
  ``'state_dict'``/``'model'`` entry are unwrapped; ``module.`` (DataParallel/DDP) prefixes are
  stripped. A whole-segmenter checkpoint (keys ``backbone.*`` or ``encoder.*`` — semiseg's own
  checkpoints, UniMatch's) gives up its backbone: those keys are kept without the prefix and the head
  keys are dropped (logged).

Loading is strict: every backbone key must be present with the right shape and no extra key may be
left over, otherwise :class:`~semiseg.errors.ConfigError` names the file and the first keys. The one
expected exception is the ImageNet classifier (``fc.*``, timm/torchvision ResNets), which the
``features_only`` backbone does not have: those keys are dropped and their number logged. Missing
``num_batches_tracked`` BatchNorm counters (old torchvision files) are tolerated. When the model's
first convolution takes a different number of input channels than the file's (a greyscale model,
RGB weights), the weights are adapted as timm does for ``in_chans`` (``adapt_input_conv``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Entries that wrap the state dict in common checkpoint formats.
WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "model_state")
#: Prefixes of the backbone inside a whole-segmenter checkpoint (DeepLabV3+ / U-Net attribute names).
BACKBONE_PREFIXES: tuple[str, ...] = ("backbone.", "encoder.")
#: Keys of an ImageNet classifier, expected in a classification checkpoint and dropped.
CLASSIFIER_PREFIXES: tuple[str, ...] = ("fc.",)

_SHOW = 5  # keys named in an error message


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did."""

    path: str
    loaded: int = 0
    dropped_classifier: list[str] = field(default_factory=list)
    dropped_non_backbone: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)


def _first(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", … (+{len(keys) - _SHOW})" if len(keys) > _SHOW else "")


def read_state_dict(path: str | Path, key: str = "model.weights") -> dict[str, Tensor]:
    """Read a state dict from ``path`` (torch pickle with ``weights_only=True``, or safetensors),
    unwrapping ``'state_dict'``/``'model'`` entries and stripping ``module.`` prefixes."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: {path}: file not found")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(
                f"{key}: {path}: reading .safetensors needs the 'safetensors' package "
                "(pip install safetensors)"
            ) from None
        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad user file
            raise ConfigError(f"{key}: {path}: cannot read safetensors file ({_one_line(exc)})") from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(
                f"{key}: {path}: cannot read as a torch weights file ({_one_line(exc)})"
            ) from None
    for _ in range(2):  # e.g. {'model': {...}} or {'state_dict': {...}}
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise ConfigError(
            f"{key}: {path}: not a state dict (expected a mapping of names to tensors, "
            f"possibly under one of {', '.join(repr(k) for k in WRAPPER_KEYS)})"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def select_backbone(
    state: Mapping[str, Tensor], prefixes: Sequence[str] = BACKBONE_PREFIXES
) -> tuple[dict[str, Tensor], list[str]]:
    """If ``state`` is a whole-segmenter state dict (some key starts with one of ``prefixes``), keep the
    keys under the first such prefix, without it, and return the others as dropped."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            return kept, [k for k in state if not k.startswith(prefix)]
    return dict(state), []


def load_backbone_weights(
    backbone: nn.Module,
    path: str | Path,
    key: str = "model.weights",
    drop_prefixes: Sequence[str] = CLASSIFIER_PREFIXES,
) -> LoadReport:
    """Load the backbone weights in ``path`` into ``backbone``, strictly.

    Raises:
        ConfigError: file not found or unreadable; missing or unexpected keys (the first few named);
            a shape mismatch (the key named).
    """
    state, dropped_other = select_backbone(read_state_dict(path, key))
    report = LoadReport(path=str(path), dropped_non_backbone=dropped_other)
    target = backbone.state_dict()

    for k in list(state):
        if k not in target and any(k.startswith(p) for p in drop_prefixes):
            report.dropped_classifier.append(k)
            del state[k]

    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        raise ConfigError(f"{key}: {path}: does not match the backbone: " + "; ".join(parts))

    first_conv = next((k for k, v in target.items() if v.ndim == 4), None)
    for k, value in state.items():
        want = target[k].shape
        if value.shape == want:
            continue
        if k == first_conv and value.ndim == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
            from timm.models import adapt_input_conv

            state[k] = adapt_input_conv(want[1], value.float()).to(value.dtype)
            report.adapted.append(k)
            continue
        raise ConfigError(
            f"{key}: {path}: shape mismatch for '{k}': file has {tuple(value.shape)}, "
            f"the backbone expects {tuple(want)}"
        )

    backbone.load_state_dict(state, strict=False)  # the check above is the strict one
    report.loaded = len(state)
    if report.dropped_classifier:
        log.info(
            "%s: dropped %d classifier keys (%s) not used by the segmentation backbone",
            path,
            len(report.dropped_classifier),
            _first(report.dropped_classifier),
        )
    if report.dropped_non_backbone:
        log.info(
            "%s: kept the backbone of a whole-model checkpoint, dropped %d head keys",
            path,
            len(report.dropped_non_backbone),
        )
    if report.adapted:
        log.info(
            "%s: adapted %s to %s input channels",
            path,
            ", ".join(report.adapted),
            target[first_conv].shape[1],
        )
    log.info("%s: loaded %d backbone tensors", path, report.loaded)
    return report
