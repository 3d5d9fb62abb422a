"""Carve a validation split out of a grid cell's training pool, for choosing recipes without test.

Reads a cell's split folder (``labeled.txt`` / ``unlabeled.txt`` / ``test.txt``, as the grid
runner saves them under ``benchmarks/results/<grid>/splits/``), keeps its labeled images, moves
``--val`` images drawn from its unlabeled pool (``random.Random(--seed)``) into ``val.txt`` and
writes the rest as ``unlabeled.txt``; ``test.txt`` is copied so that nothing defaults to it.
With ``--full`` it writes a second folder, ``OUT_full``, in which every image of the reduced
training pool is labeled (no unlabeled file): the validation ceiling of the same split.

    python benchmarks/hold_out_split.py \
        benchmarks/results/table1_cpu_small_recipe/splits/chase_db1_1-8_seed2 \
        --val 6 --seed 2 --out benchmarks/calibration_split_chase_s2 --full
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from semiseg.checkpoint import atomic_write_text
from semiseg.data.base import read_split_names
from semiseg.errors import DataError


def read_names(path: Path) -> list[str]:
    """The names a split file lists, parsed as training reads it (an absent file is an empty list)."""
    try:
        return list(read_split_names(path)) if path.is_file() else []
    except DataError as error:
        raise SystemExit(f"error: {error}") from None


def hold_out(source: Path, val_count: int, seed: int) -> dict[str, list[str]]:
    """The four parts: the source's labeled and test images, ``val_count`` unlabeled ones held out."""
    labeled, unlabeled = read_names(source / "labeled.txt"), read_names(source / "unlabeled.txt")
    if not labeled:
        raise SystemExit(f"error: {source / 'labeled.txt'}: no labeled images")
    if not 0 < val_count < len(unlabeled):
        raise SystemExit(
            f"error: --val {val_count}: must be between 1 and {len(unlabeled) - 1} "
            f"({source / 'unlabeled.txt'} has {len(unlabeled)} images)"
        )
    val = sorted(random.Random(seed).sample(sorted(unlabeled), val_count))
    rest = [name for name in unlabeled if name not in set(val)]
    return {"labeled": labeled, "unlabeled": rest, "val": val, "test": read_names(source / "test.txt")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a cell's split folder")
    parser.add_argument("--val", type=int, required=True, help="images held out of the unlabeled pool")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--full", action="store_true", help="also write OUT_full (every training image labeled)"
    )
    args = parser.parse_args(argv)
    parts = hold_out(args.source, args.val, args.seed)
    targets = [(args.out, parts)]
    if args.full:
        full = {"labeled": parts["labeled"] + parts["unlabeled"], "val": parts["val"], "test": parts["test"]}
        targets.append((args.out.with_name(args.out.name + "_full"), full))
    for folder, _split in targets:
        if folder.exists():
            raise SystemExit(f"error: {folder}: exists; remove it first (nothing was overwritten)")
    for folder, split in targets:
        folder.mkdir(parents=True)
        for part, names in split.items():
            atomic_write_text("".join(f"{name}\n" for name in names), folder / f"{part}.txt")
        print(f"{folder}: " + ", ".join(f"{len(names)} {part}" for part, names in split.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
