"""``semiseg reproduce``: run a grid of runs (cached, resumable, optionally in several worker
processes) and write its tables; part of the command line (:mod:`semiseg.cli`). The experiment code
is imported when the command runs."""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import threading
from pathlib import Path

from .errors import SemisegError

#: Where a bare grid name (``semiseg reproduce table1_cpu_small``) is looked up, from the current
#: folder: the repository's studies keep their grid files there; the package ships none.
GRIDS_FOLDER = Path("benchmarks") / "grids"


def add_reproduce_command(sub: argparse._SubParsersAction) -> None:
    """Add ``reproduce`` to the ``semiseg`` subparsers ``sub``."""
    p = sub.add_parser(
        "reproduce",
        help="run a grid of runs (cached, resumable) and write the tables",
        description="Run a grid of runs (cached, resumable) and write the tables. GRID is a grid file "
        "(benchmarks/grids/table1_cpu_small_recipe.yaml) or a bare grid name, looked up as "
        "./benchmarks/grids/<name>.yaml (run from the repository root).",
    )
    p.add_argument(
        "grid",
        metavar="GRID",
        help="grid YAML file, or a bare name looked up as ./benchmarks/grids/<name>.yaml",
    )
    p.add_argument("--output", help="grid output folder (default: the grid's 'output')")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--report-only", action="store_true", help="aggregate finished cells, run nothing")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run only matching cells, e.g. --only fraction=0.125 --only method=unimatch,fixmatch",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes training cells at once; each claims a cell by lock file "
        "(default threads per worker: cores // workers)",
    )
    p.add_argument("--no-report", action="store_true", help="run cells but do not rewrite the tables")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override applied to every cell (repeatable)",
    )
    p.set_defaults(func=cmd_reproduce)


def resolve_grid_path(name: str) -> Path:
    """The grid file ``name`` names: a path to a file, or a bare name (no folder) looked up as
    ``./benchmarks/grids/<name>.yaml``. Anything else is a one-line :class:`SemisegError`."""
    path = Path(name)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        candidate = GRIDS_FOLDER / (name if path.suffix in (".yaml", ".yml") else f"{name}.yaml")
        if candidate.is_file():
            return candidate
        raise SemisegError(f"{name}: grid not found (no such file, nor {candidate} in the current folder)")
    hint = ""
    if path.parts[0] in ("grids", "configs"):
        moved = (GRIDS_FOLDER / f"{path.stem}.yaml").as_posix()
        hint = f"; grids live in {GRIDS_FOLDER.as_posix()}/ (semiseg reproduce {moved})"
    raise SemisegError(f"{name}: grid file not found{hint}")


def select_cells(grid, only: list[str]):
    """A copy of ``grid`` restricted to the cells matching every ``KEY=VALUE`` of ``--only``."""
    keys = {"dataset", "fraction", "method", "seed"}
    wanted: dict[str, set[str]] = {}
    for item in only:
        key, _, value = item.partition("=")
        if key not in keys or not value:
            raise SemisegError(f"--only {item}: expected KEY=VALUE[,VALUE] with KEY one of {sorted(keys)}")
        wanted.setdefault(key, set()).update(v.strip() for v in value.split(","))
    if not wanted:
        return grid
    subset = copy.copy(grid)
    subset.cells = [c for c in grid.cells if all(str(getattr(c, k)) in v for k, v in wanted.items())]
    if not subset.cells:
        raise SemisegError(f"--only {' '.join(only)}: matches no cell of {grid.path}")
    return subset


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiment import collect_records, load_grid, run_grid, write_reports

    if args.workers < 1:
        raise SemisegError(f"--workers {args.workers}: must be at least 1")
    args.grid = str(resolve_grid_path(args.grid))
    grid = load_grid(args.grid, output=args.output, extra_overrides=args.overrides)
    if not args.report_only:
        selected = select_cells(grid, args.only)
        if args.workers > 1 and not args.dry_run:
            failed = _run_workers(args)
            if failed:
                raise SemisegError(f"{failed} of {args.workers} grid workers failed (their output is above)")
        else:
            run_grid(selected, dry_run=args.dry_run)
        if args.dry_run:
            return 0
    if args.no_report:
        return 0
    paths = write_reports(grid, collect_records(grid))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _run_workers(args: argparse.Namespace) -> int:
    """Start ``args.workers`` ``semiseg reproduce --no-report`` processes on the same grid (they
    claim cells by lock file, see :mod:`semiseg.experiment`), relay their output line by line with
    a ``[wK]`` prefix, and return how many failed. Without an explicit ``train.threads`` each
    worker gets ``cpu_count // workers`` threads."""
    command = [sys.executable, "-m", "semiseg", "reproduce", args.grid, "--no-report"]
    if args.output:
        command += ["--output", args.output]
    for item in args.only:
        command += ["--only", item]
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "train.threads" for o in overrides):
        overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // args.workers)}")
    for item in overrides:
        command += ["--set", item]

    def relay(index: int, stream) -> None:
        for line in stream:
            print(f"[w{index}] {line}", end="", flush=True)

    procs, relays = [], []
    for index in range(1, args.workers + 1):
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append(proc)
        relays.append(threading.Thread(target=relay, args=(index, proc.stdout), daemon=True))
        relays[-1].start()
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise
    for thread in relays:
        thread.join()
    return sum(code != 0 for code in codes)
