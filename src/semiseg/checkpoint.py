"""Atomic checkpoint writing and safe loading (``weights_only=True``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import SemisegError

CHECKPOINT_FORMAT = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save to a temp file beside ``path``, fsync, then rename over it.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely: tensors and plain containers only (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise SemisegError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, truncated write, pickled objects
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SemisegError(f"{path}: cannot load checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SemisegError(f"{path}: not a semiseg checkpoint (no 'model' entry)")
    return ckpt
