"""``semiseg`` command line: train, eval, predict, demo, data split, config show.

Bad input ends with a one-line ``error: ...`` naming the file or config key and exit status 2.
``semiseg train`` also runs under ``torchrun --nproc_per_node N -m semiseg.cli train ...`` (or the
``semiseg`` script path) for DistributedDataParallel; nothing else changes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import SemisegError

BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(name: str | None) -> Path | None:
    """A config path, or a name inside the built-in configs (``cpu_small/chase_db1/unimatch``)."""
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (BUILTIN_CONFIGS / name, BUILTIN_CONFIGS / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise SemisegError(f"{name}: config file not found (nor as a built-in config under {BUILTIN_CONFIGS})")


def _add_set_arg(p: argparse.ArgumentParser, help: str = "override a config value (repeatable)") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file or built-in config name")
    _add_set_arg(p, "override a config value, e.g. --set train.iters=200 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    result = train(cfg, run_dir=args.run_dir, resume=args.resume)
    if result.results:
        print(f"results: {result.run_dir / 'results.json'}")
    return 0


def _load_run(checkpoint: str, overrides: list[str]):
    """Config, model (eval mode) and metadata from a checkpoint."""
    import torch

    from .trainer import load_trained_model

    cfg, model, ckpt = load_trained_model(checkpoint, overrides)
    device = torch.device(
        "cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    )
    if cfg.train.device.startswith("cuda:"):
        device = torch.device(cfg.train.device)
    return cfg, model.to(device), ckpt, device


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_text
    from .data.base import build_splits
    from .evaluate import evaluate
    from .metrics import format_table
    from .trainer import json_safe

    cfg, model, ckpt, device = _load_run(args.checkpoint, args.overrides)
    splits = build_splits(cfg.data, cfg.seed)
    records = getattr(splits, args.split)
    if not records:
        raise SemisegError(f"--split {args.split}: the dataset has no images in that split")
    cm = evaluate(model, records, cfg.data, cfg.eval, ckpt["num_classes"], ckpt["in_channels"], device)
    results = cm.results(ckpt["class_names"])
    print(f"{args.split}: {len(records)} images, checkpoint {args.checkpoint} (step {ckpt['step']})")
    print(format_table(results, ckpt["class_names"]))
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_{args.split}.json")
    payload = {"checkpoint": str(args.checkpoint), "split": args.split, "step": ckpt["step"], **results}
    atomic_write_text(json.dumps(json_safe(payload), indent=2), out)
    print(f"wrote {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_folder

    cfg, model, ckpt, device = _load_run(args.checkpoint, args.overrides)
    written = predict_folder(
        model,
        args.input_dir,
        args.out_dir,
        cfg.data,
        cfg.eval,
        ckpt["class_names"],
        [tuple(c) for c in ckpt["palette"]],
        ckpt["in_channels"],
        device,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} files to {args.out_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .demo import run_demo

    overrides = list(args.overrides)
    if args.iters is not None:
        overrides.append(f"train.iters={args.iters}")
    cfg = load_config(BUILTIN_CONFIGS / "demo.yaml", overrides)
    run_demo(cfg, args.run_dir)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from .data.folder import write_split

    def number(text: str) -> float | int:
        value = float(text)
        return int(value) if value >= 1 and value.is_integer() and "." not in text else value

    written = write_split(
        args.root,
        labeled=number(args.labeled),
        seed=args.seed,
        val=number(args.val),
        test=number(args.test),
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    for part, names in written.items():
        print(f"{part}: {len(names)}")
    return 0


def select_cells(grid, only: list[str]):
    """A copy of ``grid`` restricted to the cells matching every ``KEY=VALUE`` of ``--only``."""
    import copy

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
    grid = load_grid(resolve_config_path(args.grid), output=args.output, extra_overrides=args.overrides)
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
    import os
    import subprocess
    import threading

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


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from .config import config_to_dict, load_config

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"semiseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (also under torchrun for DDP)")
    _add_config_args(p)
    p.add_argument("--run-dir", help="output directory (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from latest.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: per-class IoU / mIoU / Dice")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["test", "val", "labeled"])
    p.add_argument("--out", help="JSON output (default: eval_<split>.json beside the checkpoint)")
    _add_set_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="write index masks and colour overlays for a folder of images")
    p.add_argument("checkpoint")
    p.add_argument("input_dir")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_set_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="train a supervised U-Net on the synthetic dataset (a few CPU minutes)")
    p.add_argument("--iters", type=int, help="training iterations (default from the demo config)")
    p.add_argument("--run-dir", help="output directory (default: a new runs/demo*)")
    _add_set_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("split", help="write labeled/unlabeled/val/test lists for a folder dataset")
    s.add_argument("root", help="dataset root (images/, masks/, unlabeled/)")
    s.add_argument("--labeled", required=True, help="fraction (0.125) or count (10) of labeled images")
    s.add_argument("--val", default="0", help="fraction or count held out for validation")
    s.add_argument("--test", default="0", help="fraction or count held out for testing")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="output folder (default: ROOT/splits)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_split)

    p = sub.add_parser("reproduce", help="run a grid of runs (cached, resumable) and write the tables")
    p.add_argument("grid", help="grid YAML file or built-in grid name (grids/table1_cpu_small)")
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
    _add_set_arg(p, "override applied to every cell (repeatable)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("config", help="config utilities")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    s = config_sub.add_parser("show", help="print the fully resolved config")
    _add_config_args(s)
    s.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SemisegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        from .distributed import cleanup

        cleanup()


if __name__ == "__main__":
    sys.exit(main())
