"""Per-class pseudo-label curves of finished (or running) runs, side by side: which classes the
unlabeled pixels teach, and how often the policy would be right / wrong on the labeled view.

    python benchmarks/pseudo_label_curves.py runs/selection/chase/unimatch_warmup_fixed \\
        runs/selection/chase/unimatch_warmup_freematch_da --classes background vessel \\
        --out benchmarks/results/pseudo_label_curves_chase_val.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from semiseg.plots import plot_pseudo_label_curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with metrics.jsonl")
    p.add_argument("--classes", nargs="*", default=None, help="class names, in index order")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    runs = {run.name: run / "metrics.jsonl" for run in args.runs}
    out = plot_pseudo_label_curves(runs, args.out, args.classes)
    print(out if out else "no run logged pseudo-label diagnostics")


if __name__ == "__main__":
    main()
