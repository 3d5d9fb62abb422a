"""The one training loop.

Builds data, model and method from a :class:`~semiseg.config.RunConfig`; runs SGD with
backbone/head parameter groups and a per-step poly schedule; AMP; DDP under torchrun; logs to a
progress bar / log lines, JSONL and TensorBoard; validates periodically; writes ``latest.pt``
(and ``best.pt`` when a validation split exists) atomically; resumes exactly (same LR step,
optimizer and RNG states, same data order: the data pipeline is a pure function of
(seed, epoch, position)); stops on a non-finite loss keeping the last good checkpoint; evaluates
the final weights on the configured splits and writes ``results.json``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn

from .checkpoint import (
    BEST,
    CHECKPOINT_FORMAT,
    EMA_STATE,
    LATEST,
    atomic_save,
    atomic_write_text,
    check_writable,
    drop_log_records_after,
    load_checkpoint,
    previous_path,
    remove_start_leftovers,
    stale_temp_files,
    start_leftovers,
)
from .compiling import compile_networks, eager
from .config import RunConfig, build_config, config_hash, config_to_dict, hashed_tree
from .data.base import DataSplits, build_splits
from .data.datasets import InfiniteBatches, LabeledDataset, UnlabeledDataset, make_batch
from .data.validate import check_crop_size, check_data, check_eval_splits
from .distributed import DistInfo, all_reduce_mean, barrier, broadcast_flag, init_distributed
from .ema import ModelEma, broadcast_buffers
from .errors import ConfigError, SemisegError, TrainingError
from .evaluate import evaluate, primary_metric, resolve_unit
from .inference import (
    eval_prefix,
    json_safe,
    load_trained_model,
    method_label,
    model_state_from_checkpoint,
    resolve_checkpoint,
)
from .methods import Method, build_method
from .metrics import format_table
from .models import Segmenter, build_model
from .types import StepInfo

# ---------------------------------------------------------------------------------------------
# Seeding and RNG state
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), np_state[2], np_state[3], np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: Segmenter, cfg: RunConfig) -> torch.optim.SGD:
    """SGD with two groups: backbone at ``lr``, everything else at ``lr × lr_multi``.

    ``foreach=True`` (multi-tensor update) on every device: bit-identical to the per-parameter loop
    PyTorch uses on CPU by default (tested), and fewer kernel launches."""
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    backbone = [p for p in model.parameters() if id(p) in backbone_ids and p.requires_grad]
    head = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
    o = cfg.optim
    groups = [{"params": backbone, "lr": o.lr, "lr_scale": 1.0}]
    if head:
        groups.append({"params": head, "lr": o.lr * o.lr_multi, "lr_scale": o.lr_multi})
    return torch.optim.SGD(
        groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov, foreach=True
    )


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    """``lr · (1 − step/total)^power`` (DeepLab / UniMatch poly schedule, per iteration)."""
    return base_lr * (1.0 - step / total) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, cfg: RunConfig, step: int) -> float:
    lr = poly_lr(cfg.optim.lr, step, cfg.train.iters, cfg.optim.poly_power)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


# ---------------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------------


def fresh_run_dir(base: str | Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ...: the first that does not exist yet."""
    base = Path(base)
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def resolve_run_dir(cfg: RunConfig, run_dir: str | None, resume: bool = False) -> Path:
    """The run directory: ``run_dir``, else ``cfg.run_dir``, else a new ``runs/<name>`` (``-2``,
    ``-3``, ... when taken), so a run started without one never collides with an earlier one. Resuming
    needs the directory named (a TrainingError otherwise)."""
    chosen = run_dir or cfg.run_dir
    if chosen:
        return Path(chosen)
    if resume:
        raise TrainingError(
            "--resume: name the run directory to continue (semiseg train --resume runs/<run>; "
            "semiseg.train(..., run_dir=..., resume=True))"
        )
    return fresh_run_dir(Path("runs") / cfg.name)


def saved_run_config(run_dir: str | Path) -> dict | None:
    """The config a run directory was started with, as a raw mapping: its ``config.yaml``, or the
    config saved in its checkpoint when that file is unreadable; ``None`` when neither is there."""
    run_dir = Path(run_dir)
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text())
        if isinstance(tree, dict):
            return tree
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        pass
    for ckpt in (run_dir / LATEST, previous_path(run_dir / LATEST)):
        if ckpt.is_file():
            try:
                tree = load_checkpoint(ckpt).get("config")
            except SemisegError:
                continue
            if isinstance(tree, dict):
                return tree
    return None


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, current value)`` for every leaf where two hashed config trees
    (:func:`semiseg.config.hashed_tree`) differ; a key missing on one side shows as ``None``."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{dotted}.")
        elif a != b:
            out.append((dotted, a, b))
    return out


def _describe_differences(diffs: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    shown = ", ".join(f"{key} (run: {a!r}, now: {b!r})" for key, a, b in diffs[:limit])
    return shown + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> Path | None:
    """Refuse to overwrite a run; on resume return the checkpoint to continue from. Creates nothing.

    * new directory (or empty): fine, nothing to resume;
    * a run that never reached its first checkpoint (only the files semiseg writes at the start):
      replaced by the same command without ``resume`` (see ``fit``); with ``resume``, an error
      saying so;
    * existing run and ``resume``: the saved config must match (hash), continue from ``latest.pt``
      (``latest.prev.pt`` when ``latest.pt`` is missing);
    * existing run without ``resume``: error (never silently overwrite).
    """
    ckpt = run_dir / LATEST
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir}: run directory path exists and is not a directory")
    has_content = run_dir.exists() and any(run_dir.iterdir())
    if not has_content:
        if resume:
            raise TrainingError(f"{run_dir}: nothing to resume (no {LATEST})")
        return None
    if not ckpt.is_file() and not previous_path(ckpt).is_file() and start_leftovers(run_dir) is not None:
        if resume:
            raise TrainingError(
                f"{run_dir}: its run never reached its first checkpoint, so there is nothing to resume; "
                "the same command without --resume starts it again"
            )
        return None
    if not resume:
        raise TrainingError(
            f"{run_dir}: run directory exists; pass --resume to continue it or choose another --run-dir"
        )
    if not ckpt.is_file():
        if not previous_path(ckpt).is_file():
            raise TrainingError(f"{ckpt}: nothing to resume from (run directory has no checkpoint)")
        ckpt = previous_path(ckpt)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        saved_cfg = None
        try:
            saved_cfg = build_config(yaml.safe_load(saved.read_text()))
            saved_hash = config_hash(saved_cfg)
        except (yaml.YAMLError, SemisegError, OSError, ValueError, TypeError, AttributeError):
            saved_hash = load_checkpoint(ckpt).get("config_hash")  # unreadable config.yaml: the checkpoint's
        if saved_hash != config_hash(cfg):
            diffs = config_differences(hashed_tree(saved_cfg), hashed_tree(cfg)) if saved_cfg else []
            which = f" in {_describe_differences(diffs)}" if diffs else ""
            raise TrainingError(
                f"{saved}: the config differs from the one this run was started with{which}; "
                f"resume with the same config (semiseg train --resume {run_dir} uses the saved one) "
                "or start a new run directory"
            )
    return ckpt


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class RunLogger:
    """JSONL + TensorBoard + progress bar or log lines (main rank only)."""

    def __init__(self, run_dir: Path, cfg: RunConfig, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = cfg.train.iters
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start)
        except Exception:  # tensorboard missing or broken: JSONL is the record
            self.tb = None
        mode = cfg.train.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=start, dynamic_ncols=True, desc=cfg.name)

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **values}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{kind}/{key}", value, step)

    def progress(self, step: int, values: dict[str, float], every: int) -> None:
        if not self.enabled:
            return
        shown = {k: values[k] for k in ("total", "lr", "it/s") if k in values}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif self.mode == "log" and (step % every == 0 or step == self.total):
            text = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"[{step}/{self.total}] {text}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        elif self.mode != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    results: dict[str, dict]  # split -> metrics
    steps: int
    seconds: float


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training, with what it takes to continue: :meth:`advice` names the
    exact ``semiseg train --resume`` command (or says that no checkpoint was reached yet)."""

    def __init__(self, run_dir: Path, step: int, iters: int, checkpoint_step: int | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.run_dir, self.step, self.iters = Path(run_dir), step, iters
        self.checkpoint_step = checkpoint_step

    def advice(self) -> str:
        if self.checkpoint_step is None:
            return (
                f"stopped at step {self.step} of {self.iters}, before the first checkpoint: nothing to "
                f"resume; start the run again (--run-dir {shlex.quote(str(self.run_dir))} reuses its folder)"
            )
        return (
            f"stopped at step {self.step} of {self.iters}; {self.run_dir / LATEST} holds step "
            f"{self.checkpoint_step}. Continue with: semiseg train --resume {shlex.quote(str(self.run_dir))}"
        )


def effective_eval_every(cfg: RunConfig, num_val: int) -> int:
    """Validation interval in steps (0: never). ``train.eval_every: 0`` (the default) means auto:
    every ``ceil(iters / 10)`` steps when the run has a validation split, never without one; ``-1``:
    never."""
    if not num_val or cfg.train.eval_every < 0:
        return 0
    return cfg.train.eval_every or max(1, math.ceil(cfg.train.iters / 10))


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


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> None:
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.run_dir = resolve_run_dir(cfg, str(run_dir) if run_dir else None, resume)
        self.resume_from = prepare_run_dir(cfg, self.run_dir, resume)
        barrier()
        seed_everything(cfg.seed, cfg.deterministic)

        self.splits: DataSplits = build_splits(cfg.data, cfg.seed)
        check_eval_splits(self.splits, cfg)
        # Every file the run will read is checked now, before anything is created.
        self.data_check = check_data(self.splits, cfg.data)
        self.eval_every = effective_eval_every(cfg, len(self.splits.val))
        check_crop_size(cfg, self.splits.in_channels, self.splits.num_classes)
        model = build_model(cfg.model, self.splits.in_channels, self.splits.num_classes)
        if cfg.train.init_from and self.resume_from is None:
            load_init_weights(model, cfg.train.init_from)
        if self.dist.enabled and self.device.type == "cuda" and cfg.train.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.method: Method = build_method(cfg, model, self.splits.num_classes)
        if self.method.uses_unlabeled and not self.splits.unlabeled:
            raise SemisegError(
                f"method.name={cfg.method.name}: needs unlabeled images but the unlabeled split is empty"
            )
        if self.dist.is_main:
            check_writable(self.run_dir)
            for note in self.data_check.warnings:
                print(f"warning: {note}", file=sys.stderr, flush=True)
        self.method.to(self.device)
        if cfg.train.channels_last and self.method.model.channels_last_safe:  # convolutions follow
            # their weights' memory format
            self.method.to(memory_format=torch.channels_last)
        if self.dist.enabled:
            ddp = nn.parallel.DistributedDataParallel(
                self.method.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.method.use_net(ddp)
            self._broadcast_extra_parameters()
        self.model: Segmenter = self.method.model
        # Weight-averaged evaluation: an EMA of the segmenter, updated after every step; it reads
        # the weights only, so the training trajectory is the same with or without it.
        self.ema = ModelEma(self.model, cfg.eval.ema_decay, cfg.eval.ema_warmup) if cfg.eval.ema else None
        self.compiled = self._compile() if cfg.train.compile else []
        self.optimizer = build_optimizer(self.model, cfg)
        self.extra_optimizers = self.method.extra_optimizers()
        self.amp = cfg.train.amp
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.device.type == "cuda")
        self.step = 0
        self.checkpoint_step: int | None = None  # step of the run's latest.pt, once there is one
        self.best_score = -math.inf
        self.elapsed_before = 0.0  # training seconds of earlier segments (resumed runs)
        self._segment_start = time.perf_counter()

    # -- helpers ---------------------------------------------------------------------------------

    def _broadcast_extra_parameters(self) -> None:
        """Start every rank's extra modules (e.g. a discriminator) from rank 0's weights."""
        for opt in self.method.extra_optimizers().values():
            for group in opt.param_groups:
                for p in group["params"]:
                    dist.broadcast(p.data, src=0)

    def _sync_extra_grads(self, opt: torch.optim.Optimizer) -> None:
        """Average gradients of modules outside DDP over ranks."""
        if not self.dist.enabled:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.dist.world_size

    def _compile(self) -> list[Segmenter]:
        """``train.compile``: compile the networks a training step calls (semiseg/compiling.py),
        after a trial pass on a zero batch of the training crop; eager where compiling fails."""
        networks = [self.method.model]
        teacher = self.method.eval_model()
        if isinstance(teacher, Segmenter):
            networks.append(teacher)
        d, channels = self.cfg.data, self.splits.in_channels
        sample = torch.zeros(d.batch_size, channels, d.crop_size, d.crop_size, device=self.device)
        return compile_networks(networks, sample, warn=self.dist.is_main)

    def _autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _data_iterators(self) -> tuple[InfiniteBatches, InfiniteBatches | None]:
        cfg, d = self.cfg, self.cfg.data
        C, ch = self.splits.num_classes, self.splits.in_channels
        labeled = InfiniteBatches(
            LabeledDataset(self.splits.labeled, d, C, ch, with_strong=self.method.needs_labeled_strong),
            batch_size=d.batch_size,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=d.num_workers,
            start_batch=self.step,
        )
        unlabeled = None
        if self.method.uses_unlabeled:
            if not self.splits.unlabeled:
                raise SemisegError(
                    f"method.name={cfg.method.name}: needs unlabeled images but the unlabeled split is empty"
                )
            unlabeled = InfiniteBatches(
                UnlabeledDataset(self.splits.unlabeled, d, C, ch),
                batch_size=d.unlabeled_batch_size,
                seed=cfg.seed + 1,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                num_workers=d.num_workers,
                start_batch=self.step,
            )
        return labeled, unlabeled

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.method.state_dict(),
            "eval_prefix": eval_prefix(self.method),
            **({EMA_STATE: self.ema.state_dict()} if self.ema is not None else {}),
            "optimizer": self.optimizer.state_dict(),
            "extra_optimizers": {k: o.state_dict() for k, o in self.extra_optimizers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_score": self.best_score,
            "train_seconds": self.train_seconds(),
            "config": config_to_dict(self.cfg),
            "config_hash": config_hash(self.cfg),
            "class_names": self.splits.class_names,
            "palette": [list(c) for c in self.splits.palette],
            "in_channels": self.splits.in_channels,
            "num_classes": self.splits.num_classes,
        }

    def train_seconds(self) -> float:
        """Wall-clock training time over every segment of this run (resumes included)."""
        return self.elapsed_before + time.perf_counter() - self._segment_start

    def save(self, name: str = LATEST) -> None:
        if self.dist.is_main:
            atomic_save(self.checkpoint_state(), self.run_dir / name)
        if name == LATEST:
            self.checkpoint_step = self.step

    def load(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        self.method.load_state_dict(ckpt["model"])
        if self.ema is not None:
            if EMA_STATE not in ckpt:
                raise TrainingError(f"{path}: the checkpoint holds no weight average (eval.ema)")
            self.ema.load_state_dict(ckpt[EMA_STATE])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for name, state in ckpt.get("extra_optimizers", {}).items():
            if name in self.extra_optimizers:
                self.extra_optimizers[name].load_state_dict(state)
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        self.checkpoint_step = self.step
        self.best_score = float(ckpt.get("best_score", -math.inf))
        self.elapsed_before = float(ckpt.get("train_seconds", 0.0))

    def evaluate_split(
        self, split: str, surface_metrics: bool | None = None, model: nn.Module | None = None
    ) -> dict | None:
        """Metrics of ``model`` (default: the method's evaluated network) on ``split``, run eagerly
        (a compiled network is compiled for training steps only)."""
        records = getattr(self.splits, split)
        if not records:
            return None
        net = self.method.eval_model() if model is None else model
        with eager(net):
            cm = evaluate(
                net,
                records,
                self.cfg.data,
                self.cfg.eval,
                self.splits.num_classes,
                self.splits.in_channels,
                self.device,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                amp=self.amp,
                surface_metrics=surface_metrics,
                unit=resolve_unit(self.cfg.eval, self.splits.eval_unit),
            )
        return cm.results(self.splits.class_names)

    def evaluate_average(self, split: str, surface_metrics: bool | None = None) -> dict | None:
        """:meth:`evaluate_split` of the weight average (``eval.ema``; None without one), with
        BatchNorm statistics recomputed for it over ``eval.ema_bn_batches`` training batches
        (semiseg/ema.py). Under DDP every rank evaluates rank 0's statistics."""
        if self.ema is None:
            return None
        model = self.ema.for_evaluation(self._bn_batches(self.cfg.eval.ema_bn_batches))
        if self.dist.enabled:
            broadcast_buffers(model)
        return self.evaluate_split(split, surface_metrics, model=model)

    def _bn_batches(self, n: int) -> Iterator[torch.Tensor] | None:
        """``n`` training input batches for recomputing BatchNorm statistics (the weak views: the
        labeled crops, and the unlabeled ones for methods that use them), from streams of their
        own; the forwards' dropout draws from ``seed``, and the random states are restored after,
        so training is unchanged and the result depends only on the weights, step and seed."""
        if n == 0:
            return None

        def batches() -> Iterator[torch.Tensor]:
            saved = rng_state()
            torch.manual_seed(self.cfg.seed)
            labeled, unlabeled = self._data_iterators()
            try:
                for _ in range(n):
                    b = make_batch(next(labeled), next(unlabeled) if unlabeled else None).to(self.device)
                    yield b.x_l if b.x_w is None else torch.cat((b.x_l, b.x_w))
            finally:
                labeled.close()
                if unlabeled:
                    unlabeled.close()
                set_rng_state(saved)

        return batches()

    # -- the loop -------------------------------------------------------------------------------

    def train_step(self, batch, info: StepInfo) -> dict[str, float]:
        lr = set_poly_lr(self.optimizer, self.cfg, info.step)
        with self._autocast():
            losses = self.method.training_step(batch, info)
        total = losses["total"]
        if broadcast_flag(not bool(torch.isfinite(total.detach())), self.device):
            shown = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise TrainingError(
                f"non-finite loss at step {info.step} ({shown}); stopped. "
                f"Last good checkpoint: {self.run_dir / LATEST} (try a lower optim.lr)"
            )
        on_total = self.method.extra_optimizers_on_total()
        self.optimizer.zero_grad(set_to_none=True)
        for name in on_total:  # their gradient comes from total's backward
            self.extra_optimizers[name].zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        for name, opt in self.extra_optimizers.items():
            if f"total/{name}" not in losses:  # e.g. a labeled-only warm-up step: nothing to train
                continue
            if name not in on_total:
                opt.zero_grad(set_to_none=True)
                self.scaler.scale(losses[f"total/{name}"]).backward()
            self._sync_extra_grads(opt)
            self.scaler.step(opt)
        for fn in self.method.extra_schedulers().values():
            fn(info.step)
        self.scaler.update()
        self.method.after_step(info)
        if self.ema is not None and info.step >= self.cfg.eval.ema_start:
            self.ema.update(self.model)
        logged = {k: float(v.detach()) for k, v in losses.items()}
        logged["lr"] = lr
        return logged

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.dist.is_main:
            if self.resume_from is None and remove_start_leftovers(self.run_dir):
                print(f"{self.run_dir}: its run never reached its first checkpoint; starting it again")
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TrainingError(
                    f"{self.run_dir}: cannot create the run directory ({exc.strerror})"
                ) from None
            for tmp in stale_temp_files(self.run_dir):  # left by a run killed while writing
                tmp.unlink(missing_ok=True)
            atomic_write_text(
                yaml.safe_dump(config_to_dict(cfg), sort_keys=False), self.run_dir / "config.yaml"
            )
            self._write_splits()
        if self.resume_from is not None:
            try:
                self.load(self.resume_from)
            except SemisegError as exc:  # truncated / corrupted: the kept previous version
                prev = previous_path(self.run_dir / LATEST)
                if self.resume_from == prev or not prev.is_file():
                    raise
                print(f"warning: {exc}; resuming from {prev} instead", file=sys.stderr, flush=True)
                self.resume_from = prev
                self.load(prev)
        if self.resume_from is not None and self.dist.is_main:
            drop_log_records_after(self.run_dir / "metrics.jsonl", self.step)
        if self.dist.is_main:
            s = self.splits
            world = f" x {self.dist.world_size} processes" if self.dist.enabled else ""
            resumed = f" | resumed from {self.resume_from} at step {self.step}" if self.resume_from else ""
            print(
                f"semiseg: run {self.run_dir} | device {self.device}{world} | {torch.get_num_threads()} "
                f"thread(s) | {len(s.labeled)} labeled / {len(s.unlabeled)} unlabeled / {len(s.val)} val / "
                f"{len(s.test)} test images ({self.data_check.summary()}){resumed}",
                flush=True,
            )
        logger = RunLogger(self.run_dir, cfg, self.step, self.dist.is_main)
        labeled, unlabeled = self._data_iterators()
        self.method.train()
        self._segment_start = time.perf_counter()
        window_start, window_steps = time.perf_counter(), 0
        window_sums: dict[str, float] = {}
        window_counts: dict[str, int] = {}
        try:
            while self.step < cfg.train.iters:
                info = StepInfo(self.step, cfg.train.iters)
                batch = make_batch(next(labeled), next(unlabeled) if unlabeled else None).to(self.device)
                step_values = self.train_step(batch, info)
                self.step += 1
                window_steps += 1
                for key, value in step_values.items():  # losses are logged as means over the window
                    window_sums[key] = window_sums.get(key, 0.0) + value
                    window_counts[key] = window_counts.get(key, 0) + 1  # some keys skip steps
                logged = {k: v / window_counts[k] for k, v in window_sums.items()}
                logged["lr"] = step_values["lr"]
                elapsed = time.perf_counter() - window_start
                logged["it/s"] = window_steps / max(elapsed, 1e-9)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.iters:
                    logged = all_reduce_mean(logged, self.device)
                    logger.log(self.step, logged)
                    window_start, window_steps, window_sums = time.perf_counter(), 0, {}
                    window_counts = {}
                logger.progress(self.step, logged, cfg.train.log_every)
                if self.eval_every and self.step % self.eval_every == 0:
                    self._validate(logger)
                if self.step % cfg.train.ckpt_every == 0 or self.step == cfg.train.iters:
                    self.save(LATEST)
            seconds = self.train_seconds()
            self._check_ranks_agree()
            if self.eval_every and self.step % self.eval_every != 0:
                self._validate(logger)
            results = self._final_evaluation(logger, seconds)
        except KeyboardInterrupt as exc:
            if isinstance(exc, Interrupted):
                raise
            raise Interrupted(self.run_dir, self.step, cfg.train.iters, self.checkpoint_step) from None
        finally:
            logger.close()
            labeled.close()
            if unlabeled:
                unlabeled.close()
        return TrainResult(self.run_dir, results, self.step, seconds)

    def _check_ranks_agree(self) -> None:
        """Under DDP every rank must end with the same weights; fail loudly if not."""
        if not self.dist.enabled:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.method.parameters()]).sum()
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world_size)]
        dist.all_gather(gathered, checksum)
        values = [float(v) for v in gathered]
        if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
            raise TrainingError(f"DDP ranks ended with different weights (parameter sums {values})")

    def _validate(self, logger: RunLogger) -> None:
        res = self.evaluate_split("val", surface_metrics=False)  # HD95/ASD: final evaluation only
        if res is None:
            return
        per_class = {f"iou/{name}": value for name, value in res["iou"].items()}
        average = self.evaluate_average("val", surface_metrics=False)
        if average is not None:  # the weight average's, beside the final weights' (keys "ema/...")
            per_class["ema/miou"], per_class["ema/mdice"] = average["miou"], average["mdice"]
            per_class.update({f"ema/iou/{name}": value for name, value in average["iou"].items()})
        logger.log(self.step, {"miou": res["miou"], "mdice": res["mdice"], **per_class}, kind="val")
        classes = "  ".join(
            f"{name} {'–' if value is None else f'{100 * value:.2f}'}" for name, value in res["iou"].items()
        )
        key, score = primary_metric(res)
        shown = f"mIoU {100 * res['miou']:.2f}" + (f", mean Dice {100 * score:.2f}" if key != "miou" else "")
        logger.message(f"[{self.step}] val {shown}  ({classes})")
        if score > self.best_score:
            self.best_score = score
            self.save(BEST)

    def _final_evaluation(self, logger: RunLogger, seconds: float) -> dict[str, dict]:
        results: dict[str, dict] = {}
        for split in self.cfg.eval.splits:
            res = self.evaluate_split(split)
            if res is None:
                logger.message(f"no '{split}' split: skipped final evaluation on it")
                continue
            results[split] = res
            count = f"{len(getattr(self.splits, split))} images"
            if res.get("evaluation") == "volume":
                count = f"{res['volumes']} volumes, {count[:-6]}slices, scored per volume in 3-D"
            logger.message(f"\n{split} ({count}, final weights):")
            logger.message(format_table(res, self.splits.class_names))
            average = self.evaluate_average(split)
            if average is not None:  # results[split]["ema"]: the same keys, for the weight average
                res["ema"] = average
                logger.message(f"\n{split} ({count}, weight average, decay {self.cfg.eval.ema_decay}):")
                logger.message(format_table(average, self.splits.class_names))
        if self.dist.is_main:
            payload = {
                "name": self.cfg.name,
                "dataset": self.cfg.data.name,
                # data.labeled; null when split files chose the labeled images (labeled_count says how many)
                "fraction": None if self.cfg.data.split_dir else self.cfg.data.labeled,
                "labeled_count": len(self.splits.labeled),
                "method": method_label(self.cfg),
                "seed": self.cfg.seed,
                "protocol": self.cfg.protocol,
                "steps": self.step,
                "seconds": seconds,
                "world_size": self.dist.world_size,
                "config_hash": config_hash(self.cfg),
                "weights": "final",
                "results": results,
            }
            atomic_write_text(json.dumps(json_safe(payload), indent=2), self.run_dir / "results.json")
        return results

    def _write_splits(self) -> None:
        split_dir = self.run_dir / "splits"
        split_dir.mkdir(exist_ok=True)
        for part in ("labeled", "unlabeled", "val", "test"):
            names = [r.name for r in getattr(self.splits, part)]
            atomic_write_text("".join(f"{n}\n" for n in names), split_dir / f"{part}.txt")


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> TrainResult:
    """Train (or resume) a run and evaluate its final weights."""
    trainer = Trainer(cfg, run_dir, resume)
    return trainer.fit()


__all__ = [
    "BEST",
    "LATEST",
    "DistInfo",
    "Interrupted",
    "TrainResult",
    "Trainer",
    "eval_prefix",
    "json_safe",
    "load_trained_model",
    "method_label",
    "model_state_from_checkpoint",
    "resolve_checkpoint",
    "train",
]
