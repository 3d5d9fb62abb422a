"""Atomic checkpoint writing with a kept previous version, and safe loading (``weights_only=True``).

* :func:`atomic_save` writes to a temp file beside the target, fsyncs it, and renames it over the
  target (then fsyncs the folder): a kill at any moment leaves either the old or the new file,
  never a partial one. For ``latest.pt`` the version it replaces is kept as ``latest.prev.pt``
  (a hard link, so no copy is written; a copy where the file system has no hard links), so a
  checkpoint damaged later (disk error, a copy cut short) still leaves one good version behind.
* A failed write (full disk, read-only folder) removes the temp file, keeps the previous checkpoint
  intact and raises a one-line :class:`~semiseg.errors.SemisegError`.
* :func:`load_checkpoint` accepts tensors and plain containers only: a crafted file that would run
  code when unpickled is refused, as is a truncated or corrupted one (one line naming the file).
* A run with weight-averaged evaluation (``eval.ema``) also saves the average under
  :data:`EMA_STATE` (``semiseg.ema.ModelEma.state_dict()``: ``module.<network keys>`` and the update
  count ``updates``), so a resumed run continues the same average;
  :func:`average_state_from_checkpoint` gives its network's state dict.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import SemisegError

CHECKPOINT_FORMAT = 1
LATEST = "latest.pt"  # a run's last checkpoint (what --resume continues)
BEST = "best.pt"  # the best validation checkpoint, when the dataset has a validation split
EMA_STATE = "ema"  # a checkpoint's weight average (eval.ema), when the run keeps one
KEEP_PREVIOUS = (LATEST,)  # checkpoints whose replaced version is kept as <stem>.prev.pt


def previous_path(path: str | Path) -> Path:
    """``latest.pt`` -> ``latest.prev.pt``: where the replaced version of a checkpoint is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    """Atomically make ``<stem>.prev<suffix>`` the current ``path`` (which stays in place)."""
    prev = previous_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{prev.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(path, tmp)  # no data written: both names share the old file
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: OSError) -> SemisegError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    kept = " (the previous version is intact)" if path.is_file() else ""
    hint = "; free some space and resume with --resume" if exc.errno == errno.ENOSPC else ""
    return SemisegError(f"{path}: cannot write checkpoint ({reason}){kept}{hint}")


class _WriteRecorder:
    """A file proxy that remembers the OSError a ``write`` raised: torch.save reports a failed write
    (e.g. a full disk) as an opaque RuntimeError, and this gives the real cause back."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


def atomic_save(obj: Any, path: str | Path, keep_previous: bool | None = None) -> None:
    """Write ``obj`` with torch.save to a temp file beside ``path``, fsync, then rename over it.

    A crash mid-write leaves the previous file intact. ``keep_previous`` (default: for the names in
    :data:`KEEP_PREVIOUS`) keeps the replaced version as :func:`previous_path`. An OSError (full
    disk, permissions) becomes a one-line SemisegError after the temp file is removed.
    """
    path = Path(path)
    if keep_previous is None:
        keep_previous = path.name in KEEP_PREVIOUS
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            recorder = _WriteRecorder(fh)
            try:
                torch.save(obj, recorder)
            except RuntimeError:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.is_file():
            _keep_previous(path)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_writes(
    out_dir: Path, created: bool, what: str, error: type[SemisegError] = SemisegError
) -> Iterator[Callable[[Path, Path], Path]]:
    """All-or-nothing writing of several files into ``out_dir``.

    The block writes each file to a temp path registered with ``stage(tmp, final)`` (which returns
    ``tmp``); when the block finishes, every temp file is renamed to its final path. On any failure
    the temp files are deleted and ``out_dir``, when ``created`` (it did not exist before) and left
    empty, is removed. An OSError becomes ``error("<file or out_dir>: cannot write <what> (...)")``.
    """
    staged: list[tuple[Path, Path]] = []  # (temp file, final path)

    def stage(tmp: Path, final: Path) -> Path:
        staged.append((tmp, final))
        return tmp

    try:
        yield stage
        for tmp, final in staged:
            os.replace(tmp, final)
        staged, created = [], False
    except OSError as exc:
        raise error(f"{exc.filename or out_dir}: cannot write {what} ({exc.strerror or exc})") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely: tensors and plain containers only (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise SemisegError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, truncated write, pickled objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            first = "it holds pickled Python objects, not only tensors; refused for safety"
        raise SemisegError(f"{path}: cannot load checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SemisegError(f"{path}: not a semiseg checkpoint (no 'model' entry)")
    return ckpt


def average_state_from_checkpoint(ckpt: dict) -> dict[str, torch.Tensor] | None:
    """The weight average's network state dict (the evaluated network's keys), or None when the
    run kept no average (``eval.ema``)."""
    state = ckpt.get(EMA_STATE)
    if state is None:
        return None
    return {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}


def load_checkpoint_or_previous(
    path: str | Path, map_location: str | torch.device = "cpu", warn=None
) -> tuple[dict, Path]:
    """:func:`load_checkpoint`, falling back to the kept previous version when ``path`` is missing,
    truncated or corrupted; ``warn(text)`` is told which. Returns ``(checkpoint, path loaded)``."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return load_checkpoint(path, map_location), path
    except SemisegError as exc:
        if not prev.is_file():
            raise
        try:
            ckpt = load_checkpoint(prev, map_location)
        except SemisegError:
            raise exc from None
        if warn is not None:
            warn(f"{exc}; using the previous checkpoint {prev} (step {ckpt.get('step', '?')})")
        return ckpt, prev


def stale_temp_files(folder: Path) -> list[Path]:
    """Temp files an interrupted :func:`atomic_save` / :func:`atomic_write_text` left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def drop_log_records_after(path: Path, step: int) -> None:
    """On resume, forget log lines of steps the interrupted segment ran past its checkpoint, and a
    last line cut short by a kill (not valid JSON)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    atomic_write_text("".join(f"{line}\n" for line in kept), path)


# Files and folders a run writes before its first checkpoint (fit's start, the logger).
START_FILES = ("config.yaml", "metrics.jsonl")
START_DIRS = ("splits", "tb")


def start_leftovers(run_dir: Path) -> list[Path] | None:
    """What a run that never reached its first checkpoint left in ``run_dir`` (its config, empty
    log, split lists, TensorBoard folder, temp files), or None when the folder holds anything else
    (a checkpoint, results, files semiseg does not write): then it is not replaced."""
    if not run_dir.is_dir():
        return None
    found = []
    for entry in run_dir.iterdir():
        name = entry.name
        if name in START_FILES and entry.is_file():
            found.append(entry)
        elif name in START_DIRS and entry.is_dir():
            allowed = (lambda p: p.suffix in (".txt", ".tmp")) if name == "splits" else (lambda p: True)
            if not all(p.is_file() and allowed(p) for p in entry.rglob("*")):
                return None
            found.append(entry)
        elif name.startswith(".") and name.endswith(".tmp") and entry.is_file():
            found.append(entry)
        else:
            return None
    return found


def remove_start_leftovers(run_dir: Path) -> list[Path]:
    """Delete :func:`start_leftovers` (nothing when the folder holds anything else); return them."""
    found = start_leftovers(run_dir) or []
    for entry in found:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    return found


def check_writable(folder: Path, what: str = "run directory") -> None:
    """One-line SemisegError when ``folder`` cannot be created or written (checked before a run
    starts, so nothing is left half-written)."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SemisegError(f"{folder}: cannot create the {what}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise SemisegError(f"{folder}: cannot create or write the {what}: {probe} is not writable")
