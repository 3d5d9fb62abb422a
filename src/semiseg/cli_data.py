"""``semiseg data``: dataset utilities (``split``, ``remap-masks``, ``example``) of the command line
(:mod:`semiseg.cli`). Each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import SemisegError


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` and its subcommands to the ``semiseg`` subparsers ``sub``."""
    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser(
        "split", help="write labeled/unlabeled/val/test lists for a folder dataset (or ACDC cases)"
    )
    s.add_argument("root", help="dataset root (images/, masks/, unlabeled/; or ACDC's SSL4MIS folder)")
    s.add_argument(
        "--dataset",
        choices=["folder", "acdc"],
        default="folder",
        help="acdc: draw --labeled whole patients at random with --seed (labeled.txt / unlabeled.txt)",
    )
    s.add_argument(
        "--labeled", required=True, help="fraction (0.125) or count (10) of labeled images; ACDC: cases"
    )
    s.add_argument("--val", default="0", help="fraction or count held out for validation")
    s.add_argument("--test", default="0", help="fraction or count held out for testing")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="output folder (default: ROOT/splits)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_split)
    s = data_sub.add_parser(
        "remap-masks", help="write a copy of ROOT/masks with mask values changed (e.g. 0/255 -> 0/1)"
    )
    s.add_argument("root", help="dataset root (masks/)")
    s.add_argument(
        "--map",
        action="append",
        required=True,
        metavar="OLD=NEW",
        help="value mapping (repeatable), e.g. 255=1",
    )
    s.add_argument("--out", help="output folder (default: ROOT/masks_remapped; never masks/ itself)")
    s.set_defaults(func=cmd_remap_masks)
    s = data_sub.add_parser(
        "example", help="write a small synthetic dataset in the folder format (to try the commands)"
    )
    s.add_argument("root", help="new (or empty) folder to write images/, masks/, unlabeled/, classes.yaml")
    s.add_argument("--images", type=int, default=40, help="images with masks (default 40)")
    s.add_argument("--unlabeled", type=int, default=8, help="images without masks (default 8)")
    s.add_argument("--classes", type=int, choices=[2, 3, 4], default=3, help="number of classes (default 3)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_example)


def cmd_split(args: argparse.Namespace) -> int:
    from .data.folder import write_split

    if args.dataset == "acdc":
        return _split_acdc(args)

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


def _split_acdc(args: argparse.Namespace) -> int:
    """``data split --dataset acdc``: a patient-wise random draw of labeled cases as split files."""
    from .data.acdc import write_patient_split

    if not args.labeled.isdigit() or int(args.labeled) < 1:
        raise SemisegError(f"--labeled {args.labeled}: ACDC splits take a number of cases (patients), e.g. 3")
    if args.val != "0" or args.test != "0":
        raise SemisegError("--val/--test: ACDC keeps its own val and test volumes (val.list, test.list)")
    if not args.out:
        raise SemisegError("--out: required for ACDC (the data folder is usually read-only)")
    counts = write_patient_split(args.root, int(args.labeled), args.seed, args.out, overwrite=args.overwrite)
    for part, count in counts.items():
        print(f"{part}: {count} slices")
    print(f"train with: --set data.split_dir={Path(args.out).resolve()}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from .data.folder import write_example

    counts = write_example(
        args.root, images=args.images, unlabeled=args.unlabeled, num_classes=args.classes, seed=args.seed
    )
    print(
        f"wrote {counts['images']} images with masks, {counts['unlabeled']} unlabeled images and "
        f"classes.yaml ({counts['classes']} classes) to {args.root}"
    )
    return 0


def cmd_remap_masks(args: argparse.Namespace) -> int:
    from .data.folder import remap_masks

    out, count = remap_masks(args.root, args.map, out_dir=args.out)
    print(f"wrote {count} remapped masks to {out}")
    print(f"check them, then replace {Path(args.root) / 'masks'} with {out}")
    return 0
