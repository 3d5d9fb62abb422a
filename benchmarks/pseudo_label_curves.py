"""Per-class pseudo-label curves of finished (or running) runs, side by side: which classes the
unlabeled pixels teach, and how often the policy would be right / wrong on the labeled view.

    python benchmarks/pseudo_label_curves.py runs/selection/chase/unimatch_warmup_fixed \\
        runs/selection/chase/unimatch_warmup_freematch_da --classes background vessel \\
        --out benchmarks/results/pseudo_label_curves_chase_val.png

With ``--window FIRST LAST`` it also prints, per run, the mean of every ``pl_used/<c>`` and
``pl_wrong/<c>`` over the logged steps FIRST..LAST (the numbers the benchmark tables quote);
``--json OUT.json`` also writes them, with the command, beside the tables that quote them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from semiseg.plots import plot_pseudo_label_curves, read_metrics

WINDOW_KEYS = ("pl_used/", "pl_wrong/")


def window_means(
    metrics: Path, first: int, last: int, prefixes: tuple[str, ...] = WINDOW_KEYS
) -> dict[str, float]:
    """Mean of each logged value whose name starts with one of ``prefixes`` (default: the
    pseudo-label diagnostics) over the train records with ``first <= step <= last``."""
    rows = [r for r in read_metrics(metrics) if r.get("kind") == "train" and first <= r["step"] <= last]
    keys = sorted({k for r in rows for k in r if k.startswith(prefixes)})
    return {k: statistics.mean(r[k] for r in rows if k in r) for k in keys}


def format_mean(key: str, value: float) -> str:
    """A pixel share (the pseudo-label diagnostics) as a percentage, any other value as logged."""
    return f"{key}={100 * value:.1f}%" if key.startswith(WINDOW_KEYS) else f"{key}={value:.4g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with metrics.jsonl")
    p.add_argument("--classes", nargs="*", default=None, help="class names, in index order")
    p.add_argument("--out", type=Path, help="PNG to write")
    p.add_argument("--window", nargs=2, type=int, metavar=("FIRST", "LAST"), help="print window means")
    p.add_argument("--json", type=Path, help="with --window: write the window means to this JSON file")
    p.add_argument("--keys", nargs="+", default=list(WINDOW_KEYS), help="with --window: logged-name prefixes")
    args = p.parse_args()
    if args.out is None and args.window is None:
        p.error("nothing to do: give --out, --window or both")
    runs = {f"{run.parent.name}/{run.name}": run / "metrics.jsonl" for run in args.runs}
    if args.json and not args.window:
        p.error("--json needs --window")
    if args.window:
        table = {}
        for label, metrics in runs.items():
            means = table[label] = window_means(metrics, *args.window, tuple(args.keys))
            text = "  ".join(format_mean(k, v) for k, v in means.items()) or "no diagnostics logged"
            print(f"{label} steps {args.window[0]}-{args.window[1]}: {text}")
        if args.json:
            command = "python benchmarks/pseudo_label_curves.py " + " ".join(sys.argv[1:])
            payload = {"command": command, "steps": args.window, "runs": table}
            args.json.write_text(json.dumps(payload, indent=1))
    if args.out:
        out = plot_pseudo_label_curves(runs, args.out, args.classes)
        print(out if out else "no run logged pseudo-label diagnostics")


if __name__ == "__main__":
    main()
