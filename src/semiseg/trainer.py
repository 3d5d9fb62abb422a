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
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
)
from .compiling import compile_networks, eager
from .config import SCHEMA_VERSION, RunConfig, config_hash, config_to_dict
from .data.base import DataSplits, build_splits
from .data.datasets import InfiniteBatches, make_batch, training_streams
from .data.validate import check_crop_size, check_data, check_eval_splits
from .distributed import (
    DistInfo,
    all_reduce_mean,
    average_gradients,
    barrier,
    broadcast_flag,
    broadcast_parameters,
    init_distributed,
)
from .ema import ModelEma, broadcast_buffers
from .errors import SemisegError, TrainingError
from .evaluate import effective_eval_every, evaluate, primary_metric, resolve_unit
from .inference import (
    eval_prefix,
    json_safe,
    load_init_weights,
    load_trained_model,
    method_label,
    model_state_from_checkpoint,
    resolve_checkpoint,
)
from .methods import Method, build_method
from .metrics import format_table
from .models import Segmenter, build_model
from .optim import build_optimizer, set_poly_lr
from .run_dir import Interrupted, RunLogger, prepare_run_dir, resolve_run_dir
from .seeding import rng_state, seed_everything, set_rng_state
from .step import apply_update
from .types import StepInfo

# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    results: dict[str, dict]  # split -> metrics
    steps: int
    seconds: float


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
            for opt in self.method.extra_optimizers().values():  # e.g. a discriminator
                broadcast_parameters(opt)
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

    def _sync_extra_grads(self, opt: torch.optim.Optimizer) -> None:
        """Average gradients of modules outside DDP over ranks."""
        if self.dist.enabled:
            average_gradients(opt, self.dist.world_size)

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
        """The labeled (and, for methods that use them, unlabeled) batch streams from ``self.step``."""
        m = self.method
        return training_streams(
            self.splits, self.cfg, m.needs_labeled_strong, m.uses_unlabeled, self.dist, self.step
        )

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
            "config_version": SCHEMA_VERSION,
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
        """One step: the method's :class:`~semiseg.step.StepResult`, a finite-loss check, the
        optimizer updates (:func:`~semiseg.step.apply_update`), schedulers, hooks, the weight
        average; returns the logged values (with ``lr``)."""
        lr = set_poly_lr(self.optimizer, self.cfg, info.step)
        with self._autocast():
            result = self.method.training_step(batch, info)
        if broadcast_flag(not bool(torch.isfinite(result.loss.detach())), self.device):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in result.logged().items())
            raise TrainingError(
                f"non-finite loss at step {info.step} ({shown}); stopped. "
                f"Last good checkpoint: {self.run_dir / LATEST} (try a lower optim.lr)"
            )
        apply_update(result, self.optimizer, self.extra_optimizers, self.scaler, self._sync_extra_grads)
        for fn in self.method.extra_schedulers().values():
            fn(info.step)
        self.method.after_step(info)
        if self.ema is not None and info.step >= self.cfg.eval.ema_start:
            self.ema.update(self.model)
        logged = result.logged()
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
                "config_version": SCHEMA_VERSION,
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
