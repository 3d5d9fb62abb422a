"""Shared test helpers: tiny, fast configurations, networks, batches and methods, and paths."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from semiseg.models.base import Segmenter

if TYPE_CHECKING:
    from semiseg.config import ModelConfig
    from semiseg.methods import Batch, Method
    from semiseg.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NO_SHARED = "../shared/data not present: real-data tests need the shared datasets beside the repo"
BUILTIN_CONFIGS = REPO / "src" / "semiseg" / "configs"


def composed(protocol: str, dataset: str, method: str) -> list[Path]:
    """The built-in files ``semiseg train -c protocols/P.yaml -c datasets/D.yaml -c methods/M.yaml``
    merges, in that order (``load_config`` takes the list as it is)."""
    return [
        BUILTIN_CONFIGS / "protocols" / f"{protocol}.yaml",
        BUILTIN_CONFIGS / "datasets" / f"{dataset}.yaml",
        BUILTIN_CONFIGS / "methods" / f"{method}.yaml",
    ]


def tiny_overrides(iters: int = 4, **extra: object) -> list[str]:
    """A synthetic run that takes about a second on 2 CPU cores."""
    values: dict[str, object] = {
        "data.name": "synthetic",
        "data.synthetic.size": 40,
        "data.synthetic.num_labeled_pool": 8,
        "data.synthetic.num_val": 2,
        "data.synthetic.num_test": 3,
        "data.labeled": 0.5,
        "data.crop_size": 32,
        "data.batch_size": 2,
        "data.unlabeled_batch_size": 2,
        "model.widths": str(TINY_MODELS["unet"]["widths"]),  # "[4, 8, 16, 32, 64]"
        "train.iters": iters,
        "train.log_every": 1,
        "train.ckpt_every": 2,
        "train.progress": "none",
        "train.threads": 1,
        "eval.size_divisor": 16,
    }
    values.update(extra)
    if "model.widths" not in extra and values.get("model.name", "unet") != "unet":
        del values["model.widths"]  # a U-Net option: other models have their own sections
    return [f"{k}={v}" for k, v in values.items()]


def write_folder_dataset(
    root: Path,
    n: int = 8,
    size: tuple[int, int] = (32, 40),
    num_classes: int = 3,
    channels: int = 3,
    unlabeled: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny custom-folder dataset: images/, masks/, unlabeled/, classes.yaml."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "unlabeled").mkdir()
    mode = "RGB" if channels == 3 else "L"
    shape = (h, w, 3) if channels == 3 else (h, w)
    for i in range(n):
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 1
        if num_classes > 2:
            mask[h // 2 :, w // 2 :] = 2
        image = (rng.random(shape) * 80 + (mask * 60 if channels == 1 else mask[..., None] * 60)).astype(
            np.uint8
        )
        Image.fromarray(image, mode).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"img{i:02d}.png")
    for i in range(unlabeled):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(
            root / "unlabeled" / f"u{i:02d}.png"
        )
    names = ["background", "square", "corner"][:num_classes]
    (root / "classes.yaml").write_text("names: [" + ", ".join(names) + "]\n")
    return root


# ----------------------------------------------------------------------------------------------
# The command line, in-process
# ----------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    """``semiseg <args>`` in-process: ``(exit code, stdout, stderr)``."""
    from semiseg.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def sets(overrides):
    """``--set`` arguments for config overrides."""
    return [x for o in overrides for x in ("--set", o)]


def expect_error(capsys, args, *needles):
    """A user error: exit status 2 and exactly one ``error: ...`` line holding every needle."""
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Interrupted runs
# ----------------------------------------------------------------------------------------------


class Interrupt(Exception):
    """Raised by :func:`fit_interrupted` in place of a training step, as a killed process would stop."""


def fit_interrupted(trainer, monkeypatch, at_step: int = 3) -> None:
    """``trainer.fit()`` stopped when step ``at_step`` is about to run (its checkpoints so far kept)."""
    import pytest

    original = trainer.train_step

    def stop(batch, info):
        if info.step == at_step:
            raise Interrupt
        return original(batch, info)

    monkeypatch.setattr(trainer, "train_step", stop)
    with pytest.raises(Interrupt):
        trainer.fit()


# ----------------------------------------------------------------------------------------------
# Tiny networks, batches, methods and trainers (unit tests of methods, plug-ins and models)
# ----------------------------------------------------------------------------------------------

#: ``model`` options (the model's ``Config``) of a tiny, randomly initialised instance of each
#: built-in model (nothing is downloaded): U-Net 4-8-16-32-64, DeepLabV3+ on timm's ResNet-18,
#: GuidedMix-Net on a ResNet-18 with 4-8-8-8 stages. A model registered by another package is built
#: with its defaults.
TINY_MODELS: dict[str, dict[str, object]] = {
    "unet": {"widths": [4, 8, 16, 32, 64]},
    "deeplabv3plus": {"backbone": "resnet18"},
    "guidedmix": {
        "backbone": "resnet18",
        "backbone_widths": [4, 8, 8, 8],
        "output_stride": 32,
        "psp_channels": 8,
        "decoder_channels": [8, 8, 8, 4, 4],
        "mitrans_levels": [0, 1],
    },
}


def tiny_model_config(name: str = "unet", **changes: object) -> ModelConfig:
    """The :data:`TINY_MODELS` config of ``name`` (its own ``Config`` class), with ``changes``."""
    from semiseg.config import ModelConfig

    return ModelConfig(name=name, **{**TINY_MODELS.get(name, {}), **changes})  # type: ignore[arg-type]


def tiny_model(
    name: str = "unet", in_channels: int = 3, num_classes: int = 3, **changes: object
) -> Segmenter:
    """A tiny ``name`` network built through the model registry (:func:`semiseg.models.build_model`)."""
    from semiseg.models import build_model

    return build_model(tiny_model_config(name, **changes), in_channels, num_classes)


def tiny_unet(in_channels: int = 3, num_classes: int = 3, **changes: object) -> Segmenter:
    """The tiny U-Net (4-8-16-32-64) every unit test of a method or plug-in uses."""
    return tiny_model("unet", in_channels, num_classes, **changes)


def model_overrides(name: str = "unet") -> dict[str, object]:
    """``model.*`` overrides (for :func:`tiny_overrides`) of the tiny ``name`` network."""
    return {"model.name": name, **{f"model.{key}": value for key, value in TINY_MODELS.get(name, {}).items()}}


Boxes = Literal["different", "same"] | None


def make_batch(
    n_l: int = 2,
    n_u: int = 3,
    size: int | tuple[int, int] = 32,
    *,
    channels: int = 3,
    num_classes: int = 3,
    seed: int = 0,
    pad_labeled: int = 3,
    pad_unlabeled: int = 4,
    boxes: Boxes = "different",
) -> Batch:
    """A random training batch, the same for the same arguments.

    Drawn from ``torch.Generator().manual_seed(seed)`` in a fixed order: ``y_l`` (classes
    ``0..num_classes-1``), then ``x_l``, ``x_w``, ``x_s1``, ``x_s2`` (standard normal). The first
    ``pad_labeled`` rows of ``y_l`` and the last ``pad_unlabeled`` rows of ``ignore`` are 255 (a padded
    strip). ``boxes``: ``"different"`` — CutMix boxes ``box1[0, 2:10, 3:12]`` and
    ``box2[-1, 5:20, 5:20]``; ``"same"`` — ``box[0, 4:12, 4:12]`` on both strong views; ``None`` — none.
    """
    from semiseg.types import IGNORE_INDEX, Batch

    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    y_l = torch.randint(0, num_classes, (n_l, h, w), generator=g)
    y_l[:, :pad_labeled] = IGNORE_INDEX
    ignore = torch.zeros(n_u, h, w, dtype=torch.uint8)
    if pad_unlabeled:
        ignore[:, -pad_unlabeled:] = IGNORE_INDEX
    box1 = box2 = None
    if boxes == "different":
        box1, box2 = torch.zeros(n_u, h, w), torch.zeros(n_u, h, w)
        box1[0, 2:10, 3:12] = 1
        box2[-1, 5:20, 5:20] = 1
    elif boxes == "same":
        box1 = torch.zeros(n_u, h, w)
        box1[0, 4:12, 4:12] = 1
        box2 = box1.clone()
    x_l, x_w, x_s1, x_s2 = (torch.randn(n, channels, h, w, generator=g) for n in (n_l, n_u, n_u, n_u))
    return Batch(x_l, y_l, x_w, x_s1, x_s2, ignore, box1, box2)


def tiny_method(
    method: dict,
    plugins: dict | None = None,
    model: Segmenter | None = None,
    iters: int = 10,
    *,
    num_classes: int = 3,
) -> Method:
    """``method`` (a ``method:`` section) with ``plugins`` around ``model`` (default: the tiny
    U-Net), built as the trainer builds it (:func:`semiseg.methods.build_method`), for ``iters`` steps."""
    from semiseg.config import build_config
    from semiseg.methods import build_method

    cfg = build_config({"method": method, "plugins": plugins or {}, "train": {"iters": iters}})
    return build_method(cfg, model if model is not None else tiny_unet(num_classes=num_classes), num_classes)


def tiny_trainer(
    method: dict | None = None,
    plugins: dict | None = None,
    *,
    model: str = "unet",
    iters: int = 10,
    run_dir: str | Path | None = None,
    **overrides: object,
) -> Trainer:
    """A :class:`~semiseg.trainer.Trainer` of :func:`tiny_overrides` (synthetic data, the tiny
    ``model``, no evaluation) for ``method`` with ``plugins``; ``overrides``: more ``KEY=VALUE``
    settings (``**{"model.mitrans": False}``). Building it writes nothing: drive it with
    :func:`train_update`, or call ``fit()``."""
    from semiseg.config import apply_overrides, build_config
    from semiseg.trainer import Trainer

    values = {"train.eval_every": -1, "eval.splits": "[]", **model_overrides(model), **overrides}
    tree = apply_overrides({}, tiny_overrides(iters, **values))
    tree["method"] = method or {"name": "supervised"}
    tree["plugins"] = plugins or {}
    return Trainer(build_config(tree), run_dir)


def train_update(trainer: Trainer, batch: Batch, step: int) -> dict[str, float]:
    """Training step ``step`` on ``batch`` through the trainer's own update code
    (``Trainer.train_step``: poly lr, ``total``'s backward, the segmenter's and the extra
    optimizers' steps in the trainer's order, schedulers, ``after_step``); returns what it logs."""
    from semiseg.types import StepInfo

    return trainer.train_step(batch.to(trainer.device), StepInfo(step, trainer.cfg.train.iters))


def joint_context(method: Method, batch: Batch, step: int = 0, total: int = 100):
    """The plug-in context FixMatch / UniMatch build after their joint ``cat(x_l, x_w)`` pass (with
    encoder features; pseudo-labels: argmax / max of the detached softmax)."""
    from semiseg.types import StepContext, StepInfo

    n_l = batch.x_l.shape[0]
    out = method.model(torch.cat((batch.x_l, batch.x_w)), return_features=True)
    return StepContext.from_joint_pass(
        batch, StepInfo(step, total), out.logits, out.features, n_l, batch.ignore
    )


def nonzero(g: Tensor | None) -> bool:
    """A gradient that exists and is not all zero."""
    return g is not None and bool(g.abs().sum() > 0)


class Pointwise(Segmenter):
    """A 1×1-conv segmenter (no BatchNorm, no dropout besides FP): train and eval give the same logits,
    so a training step can be recomputed by hand. Records (training, grad enabled, batch) per pass."""

    def __init__(self, in_channels: int = 3, num_classes: int = 3) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.calls: list[tuple[bool, bool, int]] = []

    def encode(self, x: Tensor) -> list[Tensor]:
        self.calls.append((self.training, torch.is_grad_enabled(), x.shape[0]))
        return [x]

    def decode(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        return self.conv(feats[0])


def exact_trainer(method: dict, run_dir: Path, iters: int, resume: bool = False, **extra: object) -> Trainer:
    """A deterministic CPU :class:`~semiseg.trainer.Trainer` of :func:`tiny_overrides` for
    ``method`` that checkpoints every step and evaluates nothing: for exact-resume tests."""
    from semiseg.config import apply_overrides, build_config
    from semiseg.trainer import Trainer

    values = {
        "deterministic": True,
        "train.device": "cpu",
        "train.eval_every": -1,
        "eval.splits": "[]",
        "train.ckpt_every": 1,
        **extra,
    }
    tree = apply_overrides({}, tiny_overrides(iters, **values))
    tree["method"] = method
    return Trainer(build_config(tree), run_dir, resume)


def torchrun_train(run_dir: Path, overrides: list[str]):
    """``semiseg train`` as two gloo processes under torchrun (one thread each) with ``--set``
    ``overrides``; skips the test when torchrun is not installed. Returns the finished process."""
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if shutil.which("torchrun") is None and not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "semiseg",
        "train",
        "--run-dir",
        str(run_dir),
    ]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
