"""``semiseg`` command line: train, eval, predict, demo, data, config show, reproduce, export, list.

Bad input ends with a one-line ``error: ...`` naming the file or config key and exit status 2.
``semiseg train`` also runs under ``torchrun --nproc_per_node N -m semiseg.cli train ...`` (or the
``semiseg`` script path) for DistributedDataParallel; nothing else changes.

Each command imports what it needs when it runs, so torch and the training code stay out of the
CLI's start-up (``semiseg --help``, ``semiseg list``). The ``data`` commands live in
:mod:`semiseg.cli_data`, ``reproduce`` in :mod:`semiseg.cli_reproduce`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import yaml

from . import __version__
from .cli_data import add_data_commands
from .cli_reproduce import add_reproduce_command
from .cli_reproduce import select_cells as select_cells  # re-exported
from .config import BUILTIN_CONFIGS, config_to_dict, load_config_file
from .config_load import resolve_config_paths
from .errors import OutputExistsError, SemisegError


def _add_set_arg(p: argparse.ArgumentParser, help: str = "override a config value (repeatable)") -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        help="auto, cpu, cuda or cuda:N (default: the run's train.device; checkpoints load on any device)",
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        action="append",
        metavar="CONFIG",
        help="YAML config file or built-in config name; repeat to merge several in order, later "
        "ones winning (-c protocols/cpu_small.yaml -c datasets/chase_db1.yaml -c methods/unimatch.yaml)",
    )
    _add_set_arg(p, "override a config value, e.g. --set train.iters=200 (repeatable)")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import apply_overrides, build_config
    from .run_dir import saved_run_config
    from .trainer import train

    run_dir, resume = args.run_dir, args.resume is not None
    if isinstance(args.resume, str):  # --resume RUN_DIR
        if run_dir and Path(run_dir) != Path(args.resume):
            raise SemisegError(f"--resume {args.resume} and --run-dir {run_dir}: two different run folders")
        run_dir = args.resume
    saved = saved_run_config(run_dir) if resume and run_dir and args.config is None else None
    if saved is not None:  # resuming without --config: the run's own config (+ --set, e.g. threads)
        try:
            cfg = build_config(apply_overrides(saved, args.overrides))
        except (TypeError, ValueError, AttributeError) as exc:
            raise SemisegError(
                f"{Path(run_dir) / 'config.yaml'}: cannot read the run's config ({type(exc).__name__}: "
                f"{exc}); pass --config with the config the run was started with"
            ) from None
    else:
        cfg = load_config_file(resolve_config_paths(args.config), args.overrides)
    result = train(cfg, run_dir=run_dir, resume=resume)
    print(f"run directory: {result.run_dir}")
    if result.results:
        print(f"results: {result.run_dir / 'results.json'}")
    return 0


def pick_device(name: str, key: str = "--device"):
    """:func:`semiseg.distributed.pick_device` (imported on use: torch stays out of CLI start-up)."""
    from .distributed import pick_device as pick

    return pick(name, key)


def resolve_run_checkpoint(path: str) -> Path:
    """:func:`semiseg.inference.resolve_run_checkpoint` (imported on use, as everything heavy here)."""
    from .inference import resolve_run_checkpoint as resolve

    return resolve(path)


def _load_run(checkpoint: str, overrides: list[str], device: str | None = None):
    """Config, model (eval mode) and metadata from a checkpoint; ``device`` (``--device``) defaults to
    the run's ``train.device``. Checkpoints are always loaded on the CPU first, so a run trained on a
    GPU is evaluated on a CPU-only machine with ``--device cpu`` (or ``auto``)."""
    from .checkpoint import previous_path
    from .inference import load_trained_model

    path = Path(checkpoint)
    if path.is_dir():  # a run directory: its latest.pt, or the kept previous one if that is damaged
        path = path / "latest.pt"
        try:
            cfg, model, ckpt = load_trained_model(path, overrides)
        except SemisegError as exc:
            if not previous_path(path).is_file() or "cannot load checkpoint" not in str(exc):
                raise
            print(f"warning: {exc}; using {previous_path(path)}", file=sys.stderr)
            cfg, model, ckpt = load_trained_model(previous_path(path), overrides)
    else:
        cfg, model, ckpt = load_trained_model(path, overrides)
    if device is not None:
        target = pick_device(device)
    else:
        try:
            target = pick_device(cfg.train.device, "train.device")
        except SemisegError:  # e.g. trained on a GPU, evaluated on a CPU-only machine
            target = pick_device("auto")
    return cfg, model.to(target), ckpt, target


def _relative_root_hint(exc: SemisegError, cfg, checkpoint: str) -> SemisegError:
    """Add ``--set data.root=...`` advice to a missing-data error when the saved root is relative
    (it was relative to the folder the run was started from)."""
    root = cfg.data.root
    if not root or Path(root).is_absolute() or Path(root).expanduser().is_dir():
        return exc
    run_dir = Path(checkpoint).resolve()
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    guesses = [(base / root).resolve() for base in (run_dir.parent, run_dir.parent.parent)]  # runs/<name>
    maybe = next((f" (perhaps {g})" for g in guesses if g.is_dir()), "")
    return type(exc)(
        f"{exc}; the run saved the relative data.root {root!r}, taken from the current folder "
        f"{Path.cwd()}: run from the folder the run was started in, or pass --set data.root=<folder>{maybe}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_write_text
    from .data.base import build_splits
    from .evaluate import evaluate, resolve_unit
    from .inference import json_safe
    from .metrics import format_table

    cfg, model, ckpt, device = _load_run(args.checkpoint, args.overrides, args.device)
    try:
        splits = build_splits(cfg.data, cfg.seed)
    except SemisegError as exc:
        raise _relative_root_hint(exc, cfg, args.checkpoint) from None
    records = getattr(splits, args.split)
    if not records:
        raise SemisegError(f"--split {args.split}: the dataset has no images in that split")
    ckpt_path = Path(args.checkpoint)
    default_out = (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent) / f"eval_{args.split}.json"
    out = Path(args.out) if args.out else default_out
    if out.exists() and not args.overwrite:  # refused before the (possibly long) evaluation
        raise SemisegError(
            f"{out}: exists, from an earlier evaluation; pass --overwrite to replace it, or --out FILE "
            "to keep both"
        )
    # training slices of a volume dataset are separate 2-D files: the labeled split is scored per image
    unit = "image" if args.split == "labeled" else resolve_unit(cfg.eval, splits.eval_unit)
    cm = evaluate(
        model, records, cfg.data, cfg.eval, ckpt["num_classes"], ckpt["in_channels"], device, unit=unit
    )
    results = cm.results(ckpt["class_names"])
    print(f"{args.split}: {len(records)} images, checkpoint {args.checkpoint} (step {ckpt['step']})")
    print(format_table(results, ckpt["class_names"]))
    payload = {"checkpoint": str(args.checkpoint), "split": args.split, "step": ckpt["step"], **results}
    atomic_write_text(json.dumps(json_safe(payload), indent=2), out)
    print(f"wrote {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_folder

    cfg, model, ckpt, device = _load_run(args.checkpoint, args.overrides, args.device)
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
        log=lambda text: print(text, file=sys.stderr),
        mask_format=args.mask_format,
    )
    kinds = {
        "index": f"class indices 0..{len(ckpt['class_names']) - 1} (dark in a viewer: --mask-format "
        "visible or color to look at them)",
        "visible": "classes spread over 0..255 (for viewing, not class indices)",
        "color": "palette PNGs in the class colours (their pixel values are the class indices)",
    }
    parts = []
    if any(p.name.endswith("_mask.png") for p in written):
        parts.append(f"*_mask.png = {kinds[args.mask_format]}")
    if any(p.name.endswith("_mask.h5") for p in written):
        parts.append("*_mask.h5 = 'label', class indices per slice; *_overlay.png tiles the slices")
    print(f"wrote {len(written)} files to {args.out_dir}: {'; '.join(parts)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    overrides = list(args.overrides)
    if args.iters is not None:
        overrides.append(f"train.iters={args.iters}")
    cfg = load_config_file(BUILTIN_CONFIGS / "demo.yaml", overrides)
    run_demo(cfg, args.run_dir)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config_file(resolve_config_paths(args.config), args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    out = export_model(
        args.checkpoint,
        args.out_dir,
        torch_export=args.torch_export,
        onnx=args.onnx,
        overwrite=args.overwrite,
    )
    print(f"exported to {out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .api import format_registered, registered

    print(json.dumps(registered(), indent=2) if args.json else format_registered())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semiseg", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"semiseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (also under torchrun for DDP)")
    _add_config_args(p)
    p.add_argument("--run-dir", help="output directory (default: a new runs/<name>, runs/<name>-2, ...)")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="RUN_DIR",
        help="continue a run from its latest.pt: RUN_DIR (or --run-dir); without --config, with the "
        "config it was started with",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint: per-class IoU / mIoU / Dice")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["test", "val", "labeled"])
    p.add_argument("--out", help="JSON output (default: eval_<split>.json beside the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON output")
    _add_device_arg(p)
    _add_set_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict", help="write index masks and colour overlays for a folder of images or .h5 volumes"
    )
    p.add_argument("checkpoint", help="a run directory or a checkpoint file")
    p.add_argument(
        "input_dir", help="folder of images (.png, .jpg, .tif, ...) and/or .h5 volumes (SSL4MIS layout)"
    )
    p.add_argument("out_dir", help="where <stem>_mask.png / <stem>_mask.h5 and <stem>_overlay.png go")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--mask-format",
        choices=["index", "visible", "color"],
        default="index",
        help="*_mask.png of images: index = class indices 0..K-1 (default; what training reads), visible = "
        "spread over 0..255 for viewing, color = palette PNG in the class colours (values = indices)",
    )
    _add_device_arg(p)
    _add_set_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="train a supervised U-Net on the synthetic dataset (a few CPU minutes)")
    p.add_argument("--iters", type=int, help="training iterations (default from the demo config)")
    p.add_argument("--run-dir", help="output directory (default: a new runs/demo*)")
    _add_set_arg(p)
    p.set_defaults(func=cmd_demo)

    add_data_commands(sub)

    add_reproduce_command(sub)

    p = sub.add_parser("config", help="config utilities")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    s = config_sub.add_parser("show", help="print the fully resolved config")
    _add_config_args(s)
    s.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "export", help="write model.safetensors + model.yaml (and optionally torch.export / ONNX)"
    )
    p.add_argument("checkpoint", help="run directory or checkpoint file")
    p.add_argument("out_dir", help="export folder")
    p.add_argument(
        "--torch-export", action="store_true", help="also write a torch.export program (model.pt2)"
    )
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the onnx package)")
    p.add_argument("--overwrite", action="store_true", help="replace existing export files")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "list", help="registered methods, mixers, plug-ins, pseudo-label policies, datasets, models"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(func=cmd_list)
    return parser


def one_line(text: str) -> str:
    """An error message as one printable line: line breaks folded, other control characters and
    bytes of file names that are not UTF-8 shown as ``\\xNN``."""
    text = " ".join(part.strip() for part in re.split(r"[\r\n]+", text) if part.strip())
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == "\t" else ascii(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # PIL's warnings about odd but readable files (EXIF, ...) are noise here: every input is checked
    # before a run starts, and damage that matters is an error there.
    warnings.filterwarnings("ignore", module=r"PIL(\..*)?$")
    try:
        return int(args.func(args) or 0)
    except SemisegError as exc:
        if isinstance(exc, OutputExistsError):
            exc = exc.for_cli()
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave that cannot be read or written (permissions, full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {one_line(where + (exc.strerror or str(exc)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        advice = exc.advice() if callable(getattr(exc, "advice", None)) else ""
        print(f"interrupted{': ' + advice if advice else ''}", file=sys.stderr)
        return 130
    finally:
        from .distributed import cleanup

        cleanup()


if __name__ == "__main__":
    sys.exit(main())
