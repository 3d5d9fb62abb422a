"""Devices and torchrun / DistributedDataParallel helpers. One entry point: ``semiseg train`` under
torchrun initialises the process group from the environment (NCCL on CUDA, gloo on CPU);
:func:`pick_device` checks a ``--device`` / ``device=`` choice for inference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SemisegError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (this process's local rank) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def pick_device(name: str, key: str = "--device") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; one-line error when
    that device is not there (``key`` names the option in the message)."""
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SemisegError(f"{key} {name}: unknown device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SemisegError(f"{key} {name}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SemisegError(f"{key} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise SemisegError(f"{key} {name}: unsupported device type (auto, cpu, cuda or cuda:N)")
    return device


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun; return rank info and device."""
    if not launched_by_torchrun():
        return DistInfo(), select_device(device_name)
    info = DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    )
    device = select_device(device_name, info.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar logs over ranks (identity when not distributed).

    Ranks may log different keys (a per-class diagnostic is logged only when its class occurred in
    the rank's batches): the keys are first gathered, and each key is averaged over the ranks that
    logged it, so no collective ever sees tensors of different lengths."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(values))
    keys = sorted(set().union(*(k or [] for k in gathered)))
    if not keys:
        return values
    t = torch.zeros(2, len(keys), dtype=torch.float64, device=device)
    for i, key in enumerate(keys):
        if key in values:
            t[0, i], t[1, i] = values[key], 1.0
    dist.all_reduce(t)
    return {k: float(t[0, i] / t[1, i]) for i, k in enumerate(keys)}


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a NaN loss)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Start every rank's copy of the parameters ``optimizer`` steps (modules outside DDP) from
    rank 0's values."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            dist.broadcast(p.data, src=0)


def average_gradients(optimizer: torch.optim.Optimizer, world_size: int) -> None:
    """Average the gradients of the parameters ``optimizer`` steps over the ``world_size`` ranks
    (modules outside DDP, before their optimizer's step)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world_size
