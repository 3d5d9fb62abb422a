"""A run's folder and its logs: which folder a run writes (fresh, resumed, or refused), how a
resume is checked against the saved config, the JSONL / TensorBoard / progress logger, and what
Ctrl-C tells the user."""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import LATEST, load_checkpoint, previous_path, start_leftovers
from .config import RunConfig, build_config, config_hash, hashed_tree
from .errors import SemisegError, TrainingError


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
