"""Collect finished single runs (outside a grid) into one JSON + Markdown result file.

For the calibration and investigation runs quoted in ``docs/studies/``: each run directory's
``results.json`` becomes one record with the keys of the grid records (``dataset``, ``fraction``,
``method``, ``seed``, ``protocol``, ``miou``, ``iou``, ``steps``, ``seconds``) plus the settings
that distinguish these runs (U-Net widths, iterations, τ) and the validation curve from
``metrics.jsonl`` (step, mIoU, per-class IoU) when the run had a validation split.

    python benchmarks/collect_runs.py runs/calibration/* --out benchmarks/results/calibration_runs
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from semiseg.plots import read_metrics


def run_record(run_dir: Path) -> dict:
    payload = json.loads((run_dir / "results.json").read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    split = "test" if "test" in payload["results"] else "val"  # selection runs evaluate val only
    final = payload["results"][split]
    method_cfg = cfg["method"]
    pseudo = method_cfg.get("pseudo") or {}
    curve = [
        {k: v for k, v in r.items() if k in ("step", "miou", "mdice") or k.startswith("iou/")}
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r.get("kind") == "val"
    ]
    return {
        "run": str(run_dir),
        **{k: payload[k] for k in ("dataset", "fraction", "method", "seed", "protocol", "steps", "seconds")},
        "split": split,
        "miou": final["miou"],
        "iou": final["iou"],
        # runs evaluated by volume (ACDC): the foreground mean Dice per volume, the field's number
        **({"evaluation": "volume", "mdice": final["mdice"]} if final.get("evaluation") == "volume" else {}),
        # runs with eval.ema: the weight-averaged model's numbers on the same split
        **({"ema": {"miou": final["ema"]["miou"], "iou": final["ema"]["iou"]}} if "ema" in final else {}),
        "model_widths": cfg["model"].get("widths"),
        "iters": cfg["train"]["iters"],
        "threshold": method_cfg.get("threshold"),
        "recipe": {
            "init_from": cfg["train"].get("init_from"),
            "warmup_iters": method_cfg.get("warmup_iters", 0),
            "rampup_iters": method_cfg.get("rampup_iters", 0),
            "mask": pseudo.get("mask", "fixed"),
            "align": pseudo.get("align", "none"),
            "unlabeled_loss": method_cfg.get("unlabeled_loss", "ce"),
            "dice_weight": method_cfg.get("dice_weight", 0.0),
        },
        "val_curve": curve,
    }


def markdown(records: list[dict], command: str) -> str:
    if any(r.get("evaluation") == "volume" for r in records):
        return volume_markdown(records, command)
    lines = [
        f"IoU % of the final weights on each run's `split` (test, or val for selection runs that never "
        f"evaluate test). Command: `{command}`",
        "",
        "| run | method | split | U-Net widths | iterations | τ | per-class IoU | mIoU "
        "| validation mIoU by step |",
        "|---|---|---|---|---:|---:|---|---:|---|",
    ]
    for r in records:
        classes = ", ".join(f"{c} {100 * v:.2f}" for c, v in r["iou"].items() if v is not None)
        curve = " ".join(f"{p['step']}:{100 * p['miou']:.2f}" for p in r["val_curve"]) or "–"
        widths = "-".join(map(str, r["model_widths"] or [])) or "–"
        tau = "–" if r["threshold"] is None else str(r["threshold"])
        lines.append(
            f"| {Path(r['run']).name} | {r['method']} | {r.get('split', 'test')} | {widths} | {r['iters']} "
            f"| {tau} | {classes} "
            f"| {100 * r['miou']:.2f} | {curve} |"
        )
    return "\n".join(lines + weight_averaged_lines(records)) + "\n"


def weight_averaged_lines(records: list[dict]) -> list[str]:
    """Runs with ``eval.ema``: final against weight-averaged mIoU per run, and mean ± std over runs."""
    runs = [r for r in records if "ema" in r]
    if not runs:
        return []
    lines = [
        "",
        "Final weights against their moving average (`eval.ema`), same runs and split:",
        "",
        "| run | final mIoU | weight-averaged mIoU | weight-averaged per-class IoU |",
        "|---|---:|---:|---|",
    ]
    for r in runs:
        classes = ", ".join(f"{c} {100 * v:.2f}" for c, v in r["ema"]["iou"].items() if v is not None)
        name, final, averaged = Path(r["run"]).name, 100 * r["miou"], 100 * r["ema"]["miou"]
        lines.append(f"| {name} | {final:.2f} | {averaged:.2f} | {classes} |")
    if len(runs) > 1:
        final = [100 * r["miou"] for r in runs]
        averaged = [100 * r["ema"]["miou"] for r in runs]
        lines.append(
            f"| mean ± std ({len(runs)} runs) | {statistics.mean(final):.2f} ± {statistics.stdev(final):.2f} "
            f"| {statistics.mean(averaged):.2f} ± {statistics.stdev(averaged):.2f} | |"
        )
    return lines


def volume_markdown(records: list[dict], command: str) -> str:
    """Runs evaluated by volume: mean foreground Dice (3-D, per volume) and its validation curve."""
    lines = [
        f"Mean foreground Dice % per volume (3-D) of the final weights on each run's `split`, and the "
        f"validation mean Dice by step. Command: `{command}`",
        "",
        "| run | method | split | iterations | mIoU | mean Dice | validation mean Dice by step |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in records:
        curve = " ".join(f"{p['step']}:{100 * p['mdice']:.2f}" for p in r["val_curve"] if "mdice" in p)
        mdice = f"{100 * r['mdice']:.2f}" if r.get("mdice") is not None else "–"
        lines.append(
            f"| {Path(r['run']).name} | {r['method']} | {r.get('split', 'test')} | {r['iters']} "
            f"| {100 * r['miou']:.2f} | {mdice} | {curve or '–'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with results.json")
    p.add_argument("--out", type=Path, required=True, help="write OUT.json and OUT.md")
    args = p.parse_args()
    records = [run_record(r) for r in args.runs if (r / "results.json").is_file()]
    command = "python benchmarks/collect_runs.py " + " ".join(map(str, args.runs)) + f" --out {args.out}"
    text = markdown(records, command)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": records}, indent=2))
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
