"""Typed run configuration.

A config is YAML. A file may inherit from others with ``_base_: other.yaml`` (or a list; paths are
relative to the file); mappings merge deeply, everything else is replaced. Command-line overrides
``--set train.iters=200`` are applied last (the value is parsed as YAML). The merged mapping is then
checked against the dataclasses below: an unknown key or a wrong type raises :class:`ConfigError`
naming the dotted key. The ``method`` section and every entry of ``plugins`` are validated against
the config dataclass registered by that method or plug-in, so each method owns its options.

The schema is derived from the registries (:mod:`semiseg.registry`): a field marked
``metadata={CHOICES: <registry>}`` (``model.name``, ``method.mix``, ``method.pseudo.mask``, ...)
accepts the registered names, and ``method`` / ``plugins.<name>`` use the ``Config`` class of the
registered method / plug-in. Built-in registry entries are lazy, so importing this module imports no
method, plug-in or model (they are imported when a config naming them is built).

Two other field-metadata keys describe how a field enters :func:`config_hash` (the identity of a
run's result, which caches grid cells): ``VOLATILE`` (a setting that cannot change a result:
worker and thread counts, logging and checkpoint intervals, names) and ``HASH_NEUTRAL`` (an option
added after results were cached, left out of the hash at its default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, SemisegError
from .registry import METHODS, MODELS, PLUGINS, Registry

HASH_NEUTRAL = "hash_neutral"  # dataclass field metadata key, see config_hash
VOLATILE = "volatile"  # dataclass field metadata key: cannot change a result, see config_hash
CHOICES = "choices"  # dataclass field metadata key: the value is a name of this Registry


@dataclass(frozen=True)
class HashedAs:
    """``metadata={VOLATILE: HashedAs(value)}``: volatile, but hashed as the constant ``value``.

    For a setting that was part of the hash before it was declared volatile: ``value`` is what every
    cached run had, so their hashes stay valid while any value now gives the same hash.
    """

    value: Any


def volatile(default: Any = dataclasses.MISSING, *, hashed_as: Any = dataclasses.MISSING) -> Any:
    """A field that cannot change a run's result (left out of :func:`config_hash`, or hashed as
    the constant ``hashed_as``)."""
    mark = True if hashed_as is dataclasses.MISSING else HashedAs(hashed_as)
    return field(default=default, metadata={VOLATILE: mark})


def registered_name(registry: Registry, default: str) -> Any:
    """A field whose value must be a name registered in ``registry`` (checked by the loader)."""
    return field(default=default, metadata={CHOICES: registry})


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """Procedural dataset (the built-in default): thin branching curves and blob lesions."""

    num_labeled_pool: int = 24  # images in the training pool (labeled + unlabeled)
    num_val: int = 4
    num_test: int = 8
    size: int = 96  # square image side
    num_classes: int = 3  # 2 = background/vessel, 3 = + lesion, 4 = + second lesion kind
    channels: int = 3


@dataclass
class StrongAugConfig:
    """Strong view recipe of UniMatch's official training step."""

    color_jitter: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.25])
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    cutmix_p: float = 0.5
    cutmix_area: list[float] = field(default_factory=lambda: [0.02, 0.4])
    cutmix_aspect: float = 0.3  # aspect ratio sampled in U(a, 1/a)


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    # Labeled subset of the training pool: a fraction in (0, 1] (float) or a count (int >= 1).
    labeled: float | int = 0.125
    split_seed: int | None = None  # None: use the run seed (seed changes split, init and aug)
    split_dir: str | None = None  # folder with labeled.txt / unlabeled.txt / val.txt / test.txt
    num_classes: int | None = None  # None: the dataset's own
    class_names: list[str] | None = None
    resize: float = 1.0  # scale every image (and mask) by this factor when loading
    long_side: int | None = None  # or: resize so the long side has this length
    # or: resize every image (and mask) to this fixed [height, width], aspect ratio not kept, as
    # SSL4MIS / UniMatch zoom ACDC slices to 256×256. Takes precedence over resize / long_side.
    size: list[int] | None = field(default=None, metadata={HASH_NEUTRAL: True})
    crop_size: int = 128
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    # Resample only the crop's window of the randomly rescaled image (data/transforms.py
    # ``resize_window``): the same crops and labels, image values equal to the full resize up to
    # float rounding (≤ 4e-7), ≈ 5× cheaper weak views on CHASE_DB1. Volatile like channels_last.
    resize_crop_only: bool = volatile(False)
    batch_size: int = 4
    unlabeled_batch_size: int = 4
    # DataLoader processes: the batch stream does not depend on them (data/datasets.py). Hashed as 0,
    # the value of every run cached before it was volatile.
    num_workers: int = volatile(0, hashed_as=0)
    mean: list[float] | None = None  # None: ImageNet for RGB, 0.5 for greyscale
    std: list[float] | None = None
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 400.0])  # MedSeg NIfTI only
    mask_suffix: str = "_1stHO"  # CHASE_DB1: which observer
    # Mask values as saved -> class index, applied when a mask is read (before any label map), e.g.
    # {0: 0, 255: 1} for binary masks saved 0/255; values not listed are kept. Keys are read as text.
    mask_values: dict[str, int] | None = field(default=None, metadata={HASH_NEUTRAL: True})
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    name: str = registered_name(MODELS, "unet")  # a registered model (semiseg.registry.MODELS)
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # U-Net levels
    # U-Net encoder dropout per level; null = SSL4MIS/UniMatch's 0.05, 0.1, 0.2, 0.3, 0.5
    dropout: list[float] | None = None
    # U-Net up-path: "bilinear" = 1×1 conv + bilinear ×2, the official medical UniMatch / SSL4MIS
    # default; "transpose" = 2×2 stride-2 transposed conv (semiseg's earlier default).
    upsample: Literal["transpose", "bilinear"] = "bilinear"
    backbone: str = "resnet101"  # DeepLabV3+: a timm ResNet name
    pretrained: bool = False  # ImageNet weights through timm (needs the network)
    weights: str | None = None  # local backbone weights file (offline ImageNet weights)
    output_stride: int = 16
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    low_level_channels: int = 48
    fp_dropout: float = 0.5  # feature-perturbation Dropout2d (UniMatch)
    # guidedmix (GuidedMix-Net, models/guidedmix.py); hash-neutral so existing cells keep their hashes
    backbone_widths: list[int] | None = field(default=None, metadata={HASH_NEUTRAL: True})  # ResNet stages
    psp_bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6], metadata={HASH_NEUTRAL: True})
    psp_channels: int = field(default=512, metadata={HASH_NEUTRAL: True})
    decoder_channels: list[int] = field(
        default_factory=lambda: [256, 128, 64, 32, 16], metadata={HASH_NEUTRAL: True}
    )  # one per decoder block, deepest first
    mitrans: bool = field(default=True, metadata={HASH_NEUTRAL: True})  # false: no MITrans block
    mitrans_levels: list[int] = field(default_factory=lambda: [0, 1], metadata={HASH_NEUTRAL: True})
    mitrans_zero_init: bool = field(default=False, metadata={HASH_NEUTRAL: True})  # V = 0: identity at start


@dataclass
class OptimConfig:
    lr: float = 0.01
    lr_multi: float = 1.0  # head lr = lr * lr_multi (backbone keeps lr)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    poly_power: float = 0.9


@dataclass
class TrainConfig:
    iters: int = 800
    amp: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = volatile(20)
    # Validate every N steps and at the end. 0 (auto): when the run has a validation split, every
    # ceil(iters / 10) steps; without one, never. -1: never validate. Hashed although the weights
    # do not depend on it: it decides what a run records (the validation curve, best.pt's step).
    eval_every: int = 0
    ckpt_every: int = volatile(100)  # resume is exact from any checkpoint step
    threads: int | None = volatile(None)  # torch.set_num_threads; None: torch's default
    # Keep the network's (and its plug-ins') 4-D weights in channels-last memory format, so the
    # convolutions run NHWC: ≈ 0.8× the U-Net step on CPU (benchmarks/README "Faster cells").
    # Like ``threads`` it changes only floating-point rounding, so it is volatile.
    channels_last: bool = volatile(False)
    # torch.compile (inductor) of the segmenter's forward and backward in training steps
    # (semiseg/compiling.py): the same random draws, weights equal up to float rounding, so it is
    # volatile like channels_last. Compile time counts in the run (benchmarks/README "Faster cells").
    compile: bool = volatile(False)
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm under torchrun on CUDA
    # auto: bar on a TTY, log lines otherwise
    progress: Literal["auto", "bar", "log", "none"] = volatile("auto")
    # Start the segmenter from another run's weights: a run directory (its latest.pt) or a checkpoint
    # file. Only the network is taken (not optimizer, step or RNG); a Mean Teacher's EMA starts there too.
    init_from: str | None = field(default=None, metadata={HASH_NEUTRAL: True})


@dataclass
class EvalConfig:
    mode: Literal["whole", "sliding"] = "whole"
    window: int = 128  # sliding-window size
    overlap: float = 0.5  # sliding-window overlap fraction in [0, 1)
    size_divisor: int = 32  # whole-image mode pads to a multiple of this
    splits: list[str] = field(default_factory=lambda: ["test"])  # evaluated at the end of training
    # HD95 / ASD / ASSD per foreground class (per image, pixels; metrics.py) next to IoU and Dice
    surface_metrics: bool = field(default=True, metadata={HASH_NEUTRAL: True})
    # What one test case is: "image" (2-D metrics pooled over images), "volume" (slices of a volume
    # predicted, resized back to its original size and scored per volume in 3-D: evaluate.py), or
    # "auto": the dataset's own (ACDC: volume; every other dataset: image).
    unit: Literal["auto", "image", "volume"] = field(default="auto", metadata={HASH_NEUTRAL: True})
    # Weight-averaged evaluation (semiseg/ema.py): keep θ̄ ← d·θ̄ + (1 − d)·θ of the segmenter and
    # evaluate it beside the final weights, recorded under each split's results as "ema" (the final
    # weights' keys stay) and in validation logs as "ema/..." keys. The training trajectory is untouched.
    ema: bool = field(default=False, metadata={HASH_NEUTRAL: True})
    # d: 0.99 (horizon 100 steps) was the best of 0.99 / 0.995 / 0.998 / 0.999 on the CHASE_DB1 and
    # COVID validation runs of benchmarks/README "Weight-averaged evaluation"
    ema_decay: float = field(default=0.99, metadata={HASH_NEUTRAL: True})
    # First training step folded into the average (it starts as a copy of the weights after it)
    ema_start: int = field(default=0, metadata={HASH_NEUTRAL: True})
    # d_k = min(d, 1 − 1/(k+1)) over the k-th update: a plain mean of the first 1/(1−d) updates
    ema_warmup: bool = field(default=True, metadata={HASH_NEUTRAL: True})
    # BatchNorm statistics of the evaluated average: recomputed for its weights over this many
    # training batches (weak views; torch.optim.swa_utils.update_bn); 0: the averaged statistics
    ema_bn_batches: int = field(default=50, metadata={HASH_NEUTRAL: True})


@dataclass
class RunConfig:
    name: str = volatile("run")
    protocol: str = "custom"  # label for result records (cpu-small, paper, ...)
    seed: int = 0
    deterministic: bool = False
    run_dir: str | None = volatile(None)  # None: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: Any = None  # the registered method's config dataclass
    plugins: dict[str, Any] = field(default_factory=dict)  # name -> plug-in config dataclass


# --------------------------------------------------------------------------------------------
# Config classes of the registered methods / plug-ins (views of semiseg.registry)
# --------------------------------------------------------------------------------------------


class _ConfigClasses(Mapping[str, type]):
    """Name -> ``Config`` class of each entry of a registry (imports the entry on lookup)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __getitem__(self, name: str) -> type:
        return self.registry[name].Config

    def __contains__(self, name: object) -> bool:
        return name in self.registry

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry)

    def __len__(self) -> int:
        return len(self.registry)


METHOD_CONFIGS: Mapping[str, type] = _ConfigClasses(METHODS)
PLUGIN_CONFIGS: Mapping[str, type] = _ConfigClasses(PLUGINS)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and everything it inherits through ``_base_``."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular _base_ inheritance")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML ({first})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of them")
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return _deep_merge(merged, raw)


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    tree = dict(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.iters=200")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "1e30" as a string
        parts = key.strip().split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return tree


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it (dataclasses are built). Raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, int) and not isinstance(value, bool) and int in args:
            return value  # ``float | int``: an integer stays a count, not a fraction
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported schema type {tp!r}")  # pragma: no cover


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{dotted}: unknown config key (known here: {known})")
        kwargs[key] = _coerce(value, hints[key], dotted)
        registry = fields[key].metadata.get(CHOICES)
        if registry is not None and kwargs[key] not in registry:
            known = ", ".join(sorted(registry))
            raise ConfigError(f"{dotted}: unknown {registry.kind} {kwargs[key]!r} (known: {known})")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def build_config(tree: dict) -> RunConfig:
    """Validate a merged raw mapping into a :class:`RunConfig`."""
    tree = dict(tree)
    method_raw = tree.pop("method", None) or {"name": "supervised"}
    plugins_raw = tree.pop("plugins", None) or {}
    cfg: RunConfig = build_dataclass(RunConfig, tree)
    if not isinstance(method_raw, dict):
        raise ConfigError(f"method: expected a mapping, got {method_raw!r}")
    name = method_raw.get("name", "supervised")
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    cfg.method = build_dataclass(METHODS[name].Config, {**method_raw, "name": name}, "method")
    if not isinstance(plugins_raw, dict):
        raise ConfigError(f"plugins: expected a mapping of plug-in name to options, got {plugins_raw!r}")
    for pname, options in plugins_raw.items():
        if pname not in PLUGINS:
            known = ", ".join(sorted(PLUGINS)) or "none"
            raise ConfigError(f"plugins.{pname}: unknown plug-in (known: {known})")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"plugins.{pname}: expected a mapping of options, got {options!r}")
        cfg.plugins[pname] = build_dataclass(PLUGINS[pname].Config, options or {}, f"plugins.{pname}")
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    d = cfg.data
    if isinstance(d.labeled, float) and not 0.0 < d.labeled <= 1.0:
        raise ConfigError(f"data.labeled: a fraction must be in (0, 1], got {d.labeled}")
    if isinstance(d.labeled, int) and d.labeled < 1:
        raise ConfigError(f"data.labeled: a count must be >= 1, got {d.labeled}")
    if d.crop_size < 8:
        raise ConfigError(f"data.crop_size: must be >= 8, got {d.crop_size}")
    if d.batch_size < 1 or d.unlabeled_batch_size < 1:
        raise ConfigError("data.batch_size: batch sizes must be >= 1")
    if d.resize <= 0:
        raise ConfigError(f"data.resize: must be > 0, got {d.resize}")
    if d.size is not None and (len(d.size) != 2 or min(d.size) < 1):
        raise ConfigError(f"data.size: expected [height, width] of positive sizes, got {d.size}")
    if len(d.scale_range) != 2 or d.scale_range[0] > d.scale_range[1]:
        raise ConfigError(f"data.scale_range: expected [low, high], got {d.scale_range}")
    if cfg.train.iters < 1:
        raise ConfigError(f"train.iters: must be >= 1, got {cfg.train.iters}")
    if not 0.0 <= cfg.eval.overlap < 1.0:
        raise ConfigError(f"eval.overlap: must be in [0, 1), got {cfg.eval.overlap}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")

    # NaN/inf anywhere, and the remaining signs/ranges that crash a run later
    def finite(obj: Any, prefix: str) -> None:
        fields = () if isinstance(obj, dict) else dataclasses.fields(obj)
        items = obj.items() if isinstance(obj, dict) else ((f.name, getattr(obj, f.name)) for f in fields)
        for key, value in items:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{dotted}: must be a finite number, got {value}")
            if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(f"{dotted}: must hold finite numbers, got {value}")
            if dataclasses.is_dataclass(value) or isinstance(value, dict):
                finite(value, dotted)

    finite(cfg, "")
    o, t = cfg.optim, cfg.train
    for key, value, ok, want in (
        ("optim.lr_multi", o.lr_multi, o.lr_multi > 0, "> 0"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.poly_power", o.poly_power, o.poly_power >= 0, ">= 0"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.ckpt_every", t.ckpt_every, t.ckpt_every >= 1, ">= 1"),
        ("train.eval_every", t.eval_every, t.eval_every >= -1, ">= -1 (0: auto, -1: never)"),
    ):
        if not ok:
            raise ConfigError(f"{key}: must be {want}, got {value}")
    e = cfg.eval
    if not 0.0 <= e.ema_decay < 1.0:
        raise ConfigError(f"eval.ema_decay: must be in [0, 1), got {e.ema_decay}")
    if e.ema_start < 0:
        raise ConfigError(f"eval.ema_start: must be >= 0, got {e.ema_start}")
    if e.ema_bn_batches < 0:
        raise ConfigError(
            f"eval.ema_bn_batches: must be >= 0 (0: the averaged statistics), got {e.ema_bn_batches}"
        )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a config file (or the defaults when ``path`` is None), apply overrides, validate."""
    tree = load_yaml_tree(path) if path is not None else {}
    tree = apply_overrides(tree, overrides or [])
    return build_config(tree)


#: The configs shipped with the package (``configs/`` in the repository links here).
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str | None) -> Path | None:
    """A config path, or a name inside the built-in configs (``cpu_small/chase_db1/unimatch``).

    The README's ``configs/...`` paths work from any folder: ``configs/`` is the repository's link
    to the built-in configs, so that prefix is also looked up there.
    """
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    names = [name]
    parts = Path(name).parts
    if len(parts) > 1 and parts[0] == "configs":
        names.append(Path(*parts[1:]).as_posix())
    for item in names:
        for candidate in (BUILTIN_CONFIGS / item, BUILTIN_CONFIGS / f"{item}.yaml"):
            if candidate.is_file():
                return candidate
    raise SemisegError(f"{name}: config file not found (nor as a built-in config under {BUILTIN_CONFIGS})")


def load_config_file(path: Path | None, overrides: list[str]) -> RunConfig:
    """:func:`load_config`, with any failure to read the file (a ``_base_`` that is not a file
    name, text that is not UTF-8, nesting too deep, ...) as a one-line ConfigError naming the file."""
    unexpected = (TypeError, ValueError, AttributeError, KeyError, RecursionError, OSError)
    try:
        return load_config(path, overrides)
    except SemisegError:
        raise
    except unexpected as exc:
        where = str(path) if path is not None else "config"
        for i in range(len(overrides) + 1):  # the first override that breaks it, if any, is named
            try:
                load_config(path, overrides[:i])
            except SemisegError:
                break
            except unexpected:
                if i:
                    where = f"--set {overrides[i - 1]}"
                break
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: cannot read config ({type(exc).__name__}: {detail[:200]})") from None


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain mapping of a resolved config (round-trips through :func:`build_config`)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (built from its ``default_factory`` when it has one)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _hash_view(obj: Any, tree: dict) -> None:
    """Apply the field metadata to ``tree`` (``asdict(obj)``), recursively (nested sections and
    plug-in configs): a ``VOLATILE`` field is removed (or set to its ``HashedAs`` constant), a
    ``HASH_NEUTRAL`` field at its default is removed."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        mark = f.metadata.get(VOLATILE)
        if isinstance(mark, HashedAs):
            tree[f.name] = mark.value
        elif mark or f.metadata.get(HASH_NEUTRAL) and value == _field_default(f):
            tree.pop(f.name, None)
        elif dataclasses.is_dataclass(value) and isinstance(tree.get(f.name), dict):
            _hash_view(value, tree[f.name])
        elif isinstance(value, dict) and isinstance(tree.get(f.name), dict):  # plug-in configs
            for key, item in value.items():
                if dataclasses.is_dataclass(item) and isinstance(tree[f.name].get(key), dict):
                    _hash_view(item, tree[f.name][key])


_drop_hash_neutral = _hash_view  # its name before volatile fields joined it


def hashed_tree(cfg: Any) -> dict:
    """The mapping :func:`config_hash` hashes: ``asdict(cfg)`` after the field metadata."""
    tree = dataclasses.asdict(cfg)
    _hash_view(cfg, tree)
    return tree


def config_hash(cfg: RunConfig) -> str:
    """Stable short hash of everything that changes a run's result (it caches grid cells and
    guards ``--resume``).

    Field metadata decides what enters it, so no key list lives here:

    * ``VOLATILE`` (:func:`volatile`): a setting that cannot change a result (``name``,
      ``run_dir``, ``data.num_workers`` / ``resize_crop_only``, ``train.threads`` / ``channels_last`` /
      ``log_every`` / ``ckpt_every`` / ``progress``: thread count, memory format and windowed
      resampling change only float rounding) is
      left out, so resuming or finishing a grid with other worker or thread counts
      never re-runs a cell. A field that used to be hashed is hashed as a constant instead
      (``HashedAs``), so cached hashes stay valid.
    * ``HASH_NEUTRAL``: an option added after results were cached, whose default reproduces the
      old behaviour, is declared ``field(default=..., metadata={HASH_NEUTRAL: True})``: at its
      default it is left out, so adding it does not invalidate finished grid cells; any other value
      changes the hash.
    """
    blob = json.dumps(hashed_tree(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
