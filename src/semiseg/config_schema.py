"""The run configuration's schema: one dataclass per section (:class:`RunConfig` at the top).

The schema is derived from the registries (:mod:`semiseg.registry`): a field marked
``metadata={CHOICES: <registry>}`` (``model.name``, ``method.mix``, ``method.pseudo.mask``, ...)
accepts the registered names, and ``method`` / ``plugins.<name>`` / ``model`` use the ``Config``
class of the registered method / plug-in / model (:data:`METHOD_CONFIGS`, :data:`PLUGIN_CONFIGS`,
:data:`MODEL_CONFIGS`; a model's extends :class:`ModelConfig`). Built-in registry
entries are lazy, so importing this module imports no method, plug-in or model.

Which fields enter :func:`~semiseg.config.config_hash`, and how, is decided in one place,
:mod:`semiseg.config_hashing`; the classes here carry no hash markers. Loading and validation
live in :mod:`semiseg.config_load`; import all of it from :mod:`semiseg.config`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .registry import METHODS, MODELS, PLUGINS, Registry

CHOICES = "choices"  # dataclass field metadata key: the value is a name of this Registry


def registered_name(registry: Registry, default: str) -> Any:
    """A field whose value must be a name registered in ``registry`` (checked by the loader)."""
    return field(default=default, metadata={CHOICES: registry})


SECTION = "section"  # dataclass field metadata key: (selector field, registry), see registered_section


def registered_section(selector: str, registry: Registry) -> Any:
    """A field holding the options of the ``registry`` entry that the sibling field ``selector``
    names (``method.mixer`` for ``method.mix``): the loader validates its mapping against that
    entry's ``Config`` dataclass, so whoever registers the entry owns its options."""
    return field(default=None, metadata={SECTION: (selector, registry)})


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
    size: list[int] | None = None
    crop_size: int = 128
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    # Resample only the crop's window of the randomly rescaled image (data/transforms.py
    # ``resize_window``): the same crops and labels, image values equal to the full resize up to
    # float rounding (≤ 4e-7), ≈ 5× cheaper weak views on CHASE_DB1. Volatile like channels_last.
    resize_crop_only: bool = False
    batch_size: int = 4
    unlabeled_batch_size: int = 4
    # DataLoader processes: the batch stream does not depend on them (data/datasets.py). Hashed as 0,
    # the value of every run cached before it was volatile.
    num_workers: int = 0
    mean: list[float] | None = None  # None: ImageNet for RGB, 0.5 for greyscale
    std: list[float] | None = None
    hu_window: list[float] = field(default_factory=lambda: [-1000.0, 400.0])  # MedSeg NIfTI only
    mask_suffix: str = "_1stHO"  # CHASE_DB1: which observer
    # Mask values as saved -> class index, applied when a mask is read (before any label map), e.g.
    # {0: 0, 255: 1} for binary masks saved 0/255; values not listed are kept. Keys are read as text.
    mask_values: dict[str, int] | None = None
    strong: StrongAugConfig = field(default_factory=StrongAugConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """Options every model has: the base of each registered model's ``Config`` (:data:`MODEL_CONFIGS`).

    ``model`` in a config is validated against the chosen model's class (``UNetConfig``,
    ``DeepLabV3PlusConfig``, ``GuidedMixConfig`` beside their networks in :mod:`semiseg.models`), so
    an option of another model is an unknown key. ``ModelConfig(name="unet", widths=[...])`` builds
    the named model's class (the flat class of schema version 2 was called this way).
    """

    name: str = registered_name(MODELS, "unet")  # a registered model (semiseg.registry.MODELS)
    pretrained: bool = False  # ImageNet weights through timm (needs the network)
    weights: str | None = None  # local backbone weights file (offline ImageNet weights)
    fp_dropout: float = 0.5  # feature-perturbation Dropout2d (UniMatch)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is ModelConfig and (args or kwargs):
            name = kwargs.get("name", args[0] if args else "unet")
            target = MODEL_CONFIGS[name] if isinstance(name, str) and name in MODELS else cls
            if target is not cls:
                return target.__new__(target)  # then ``target.__init__(*args, **kwargs)``
        return super().__new__(cls)


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
    log_every: int = 20
    # Validate every N steps and at the end. 0 (auto): when the run has a validation split, every
    # ceil(iters / 10) steps; without one, never. -1: never validate. Hashed although the weights
    # do not depend on it: it decides what a run records (the validation curve, best.pt's step).
    eval_every: int = 0
    ckpt_every: int = 100  # resume is exact from any checkpoint step
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    # Keep the network's (and its plug-ins') 4-D weights in channels-last memory format, so the
    # convolutions run NHWC: ≈ 0.8× the U-Net step on CPU (benchmarks/README "Faster cells").
    # Like ``threads`` it changes only floating-point rounding, so it is volatile.
    channels_last: bool = False
    # torch.compile (inductor) of the segmenter's forward and backward in training steps
    # (semiseg/compiling.py): the same random draws, weights equal up to float rounding, so it is
    # volatile like channels_last. Compile time counts in the run (benchmarks/README "Faster cells").
    compile: bool = False
    sync_bn: bool = True  # convert BatchNorm to SyncBatchNorm under torchrun on CUDA
    # auto: bar on a TTY, log lines otherwise
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    # Start the segmenter from another run's weights: a run directory (its latest.pt) or a checkpoint
    # file. Only the network is taken (not optimizer, step or RNG); a Mean Teacher's EMA starts there too.
    init_from: str | None = None


@dataclass
class EvalConfig:
    mode: Literal["whole", "sliding"] = "whole"
    window: int = 128  # sliding-window size
    overlap: float = 0.5  # sliding-window overlap fraction in [0, 1)
    size_divisor: int = 32  # whole-image mode pads to a multiple of this
    splits: list[str] = field(default_factory=lambda: ["test"])  # evaluated at the end of training
    # HD95 / ASD / ASSD per foreground class (per image, pixels; surface_metrics.py) next to IoU and Dice
    surface_metrics: bool = True
    # What one test case is: "image" (2-D metrics pooled over images), "volume" (slices of a volume
    # predicted, resized back to its original size and scored per volume in 3-D: evaluate.py), or
    # "auto": the dataset's own (ACDC: volume; every other dataset: image).
    unit: Literal["auto", "image", "volume"] = "auto"
    # Weight-averaged evaluation (semiseg/ema.py): keep θ̄ ← d·θ̄ + (1 − d)·θ of the segmenter and
    # evaluate it beside the final weights, recorded under each split's results as "ema" (the final
    # weights' keys stay) and in validation logs as "ema/..." keys. The training trajectory is untouched.
    ema: bool = False
    # d: 0.99 (horizon 100 steps) was the best of 0.99 / 0.995 / 0.998 / 0.999 on the CHASE_DB1 and
    # COVID validation runs of benchmarks/README "Weight-averaged evaluation"
    ema_decay: float = 0.99
    # First training step folded into the average (it starts as a copy of the weights after it)
    ema_start: int = 0
    # d_k = min(d, 1 − 1/(k+1)) over the k-th update: a plain mean of the first 1/(1−d) updates
    ema_warmup: bool = True
    # BatchNorm statistics of the evaluated average: recomputed for its weights over this many
    # training batches (weak views; torch.optim.swa_utils.update_bn); 0: the averaged statistics
    ema_bn_batches: int = 50


@dataclass
class RunConfig:
    name: str = "run"
    protocol: str = "custom"  # label for result records (cpu-small, paper, ...)
    seed: int = 0
    deterministic: bool = False
    run_dir: str | None = None  # None: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    # the registered model's config dataclass (a ModelConfig subclass); default: the U-Net's
    model: ModelConfig = field(default_factory=lambda: MODEL_CONFIGS["unet"]())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: Any = None  # the registered method's config dataclass
    plugins: dict[str, Any] = field(default_factory=dict)  # name -> plug-in config dataclass


# --------------------------------------------------------------------------------------------
# Config classes of the registered methods / plug-ins (views of semiseg.registry)
# --------------------------------------------------------------------------------------------


class _ConfigClasses(Mapping[str, type]):
    """Name -> ``Config`` class of each entry of a registry (imports the entry on lookup); an entry
    without one has ``default`` (a model builder registered without a ``Config``: :class:`ModelConfig`)."""

    def __init__(self, registry: Registry, default: type | None = None) -> None:
        self.registry = registry
        self.default = default

    def __getitem__(self, name: str) -> type:
        entry = self.registry[name]
        if self.default is not None:
            return getattr(entry, "Config", self.default)
        return entry.Config

    def __contains__(self, name: object) -> bool:
        return name in self.registry

    def __iter__(self) -> Iterator[str]:
        return iter(self.registry)

    def __len__(self) -> int:
        return len(self.registry)


METHOD_CONFIGS: Mapping[str, type] = _ConfigClasses(METHODS)
PLUGIN_CONFIGS: Mapping[str, type] = _ConfigClasses(PLUGINS)
#: ``model.name`` -> the model's config class: its builder's ``Config`` attribute (the built-in ones
#: beside their networks in :mod:`semiseg.models`), :class:`ModelConfig` for a builder without one.
MODEL_CONFIGS: Mapping[str, type] = _ConfigClasses(MODELS, default=ModelConfig)
