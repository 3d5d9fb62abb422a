"""Per seed: how far a fraction's supervised baseline is from the same budget with every label.

Pairs each (dataset, seed) of a table's records (the supervised baseline and every other method at
one labeled fraction) with the same seed's fully labeled supervised record, and writes what a
"≥ MARGIN mIoU over supervised" bar asks of that seed: the bar, the best semi-supervised cell, and
the full-label ceiling (the same network, budget and labeled loss, trained on every training image).
A bar above the ceiling asks the semi-supervised model to beat full supervision.

    python benchmarks/label_ceiling.py benchmarks/results/table1_cpu_small_recipe/records.json \
        benchmarks/results/full_supervision_cpu_small/records.json --baseline supervised+cedice \
        --margin 3 --out benchmarks/results/label_ceiling_cpu_small
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

from common import load_records


def headroom(table: list[dict], full: list[dict], baseline: str, margin: float) -> list[dict]:
    """One row per (dataset, fraction, seed) of ``table`` that has a baseline and a full-label record."""
    ceiling = {(r["dataset"], r["seed"]): r["miou"] for r in full if r["method"] == baseline}
    cells: dict[tuple, dict[str, float]] = {}
    for record in table:
        key = (record["dataset"], record["fraction"], record["seed"])
        cells.setdefault(key, {})[record["method"]] = record["miou"]
    rows = []
    for (dataset, fraction, seed), by_method in sorted(cells.items()):
        if baseline not in by_method or (dataset, seed) not in ceiling:
            continue
        others = {m: v for m, v in by_method.items() if m != baseline}
        best = max(others, key=others.get) if others else None
        supervised, full_miou = 100 * by_method[baseline], 100 * ceiling[(dataset, seed)]
        rows.append({
            "dataset": dataset, "fraction": fraction, "seed": seed,
            "supervised": supervised, "full_labels": full_miou, "bar": supervised + margin,
            "headroom": full_miou - supervised,
            "best_method": best, "best": 100 * others[best] if best else None,
            "bar_above_ceiling": supervised + margin > full_miou,
        })  # fmt: skip
    return rows


def markdown(rows: list[dict], margin: float, command: str) -> str:
    lines = [
        f"Full-label ceiling vs the ≥ {margin:g} mIoU bar, per seed (test mIoU %). Command: `{command}`",
        "",
        "| dataset | fraction | seed | supervised | bar | best semi-supervised | full labels | "
        "headroom (full − supervised) | bar above full labels? |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    by_dataset: dict[tuple, list[dict]] = {}
    for row in rows:
        by_dataset.setdefault((row["dataset"], row["fraction"]), []).append(row)
        best = f"{row['best_method']} {row['best']:.2f}" if row["best_method"] else "–"
        lines.append(
            f"| {row['dataset']} | {row['fraction']:g} | {row['seed']} | {row['supervised']:.2f} | "
            f"{row['bar']:.2f} | {best} | {row['full_labels']:.2f} | {row['headroom']:+.2f} | "
            f"{'**yes**' if row['bar_above_ceiling'] else 'no'} |"
        )
    for (dataset, fraction), group in by_dataset.items():
        sup, full = mean(r["supervised"] for r in group), mean(r["full_labels"] for r in group)
        lines.append(
            f"| {dataset} | {fraction:g} | mean | {sup:.2f} | {sup + margin:.2f} | – | {full:.2f} | "
            f"{full - sup:+.2f} | {'**yes**' if sup + margin > full else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="records.json of the table (one labeled fraction or more)")
    parser.add_argument("full", type=Path, help="records.json of the fully labeled supervised cells")
    parser.add_argument("--baseline", default="supervised", help="the supervised method's name in both")
    parser.add_argument("--margin", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    rows = headroom(load_records(args.table), load_records(args.full), args.baseline, args.margin)
    if not rows:
        raise SystemExit(f"error: no (dataset, seed) has both a '{args.baseline}' cell and a full-label cell")
    command = "python benchmarks/label_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, args.margin, command))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
