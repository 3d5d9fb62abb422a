"""Lock files that let several processes (on one machine, or machines sharing the output folder)
work on one grid: a process claims a cell with ``.seed<k>.lock`` beside its run directory (holding
host and pid) before training it, and skips cells another live process holds. A lock left by a
process that died is taken over on the same host; one from another host is respected until deleted
by hand.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol


class _HasRunDir(Protocol):
    run_dir: Path


def _lock_path(cell: _HasRunDir) -> Path:
    return cell.run_dir.with_name(f".{cell.run_dir.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _me() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def lock_holder(cell: _HasRunDir) -> str | None:
    """``"host pid"`` of another live process training ``cell`` (None: free, held by this
    process, or its holder died on this host)."""
    try:
        holder = _lock_path(cell).read_text().strip()
    except FileNotFoundError:
        return None
    host, _, pid = holder.partition(" ")
    if holder == _me() or (host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))):
        return None
    return holder or "unknown holder"


def claim_cell(cell: _HasRunDir) -> bool:
    """Atomically take ``cell``'s lock for this process (False: another live process holds it)."""
    path = _lock_path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if lock_holder(cell) is not None:
                return False
            path.unlink(missing_ok=True)  # left by a process that died on this host
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(_me() + "\n")
        return True
    return False


def release_cell(cell: _HasRunDir) -> None:
    path = _lock_path(cell)
    try:
        if path.read_text().strip() == _me():
            path.unlink()
    except FileNotFoundError:
        pass
