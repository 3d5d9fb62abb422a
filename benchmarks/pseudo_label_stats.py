"""How good are a run's pseudo-labels on its own unlabeled images? (investigation of Table 1)

For each run directory, loads ``latest.pt`` (the final weights of a finished run), predicts the run's
unlabeled images whole (eval mode, no augmentation: the weak view without crop/flip) and compares
with their ground truth, which the training never saw. Per class ``c`` it reports:

- ``gt_share``: share of pixels whose ground truth is ``c``;
- ``confident_share``: share of pixels pseudo-labelled ``c`` with confidence >= τ (what FixMatch /
  UniMatch train on);
- ``confident_recall``: of the ground-truth ``c`` pixels, the share that get a confident ``c``
  pseudo-label; ``confident_miss``: the share that get a confident *wrong* pseudo-label (what the
  unlabeled loss actively teaches against ``c``); ``confident_precision``: of the confident ``c``
  pseudo-labels, the share that are right;

plus the overall ``mask_ratio`` (share of pixels with confidence >= τ). A minority class whose
confident recall is near 0 while the mask ratio is high is the collapse the SupMix paper targets.

    python benchmarks/pseudo_label_stats.py runs/grids/cpu_small/chase_db1/1-8/*/seed0 \\
        --out benchmarks/results/pseudo_labels_chase_db1_1-8_seed0

Only datasets whose training pool has masks (all built-in formats except ``extra_unlabeled``
images) can be checked; images without a mask are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import command_line, split_records, write_outputs

from semiseg.data.io import image_to_tensor, read_record
from semiseg.evaluate import pad_value_for, predict_logits
from semiseg.trainer import load_trained_model


def run_stats(run_dir: Path, thresholds: list[float] | None) -> list[dict]:
    """One row per τ in ``thresholds`` (default: the run's ``method.threshold``, else 0.95)."""
    cfg, model, ckpt = load_trained_model(run_dir / "latest.pt")
    taus = thresholds or [getattr(cfg.method, "threshold", 0.95)]
    num_classes, in_channels = ckpt["num_classes"], ckpt["in_channels"]

    def per_class(labels: torch.Tensor) -> np.ndarray:
        return np.bincount(labels.numpy(), minlength=num_classes)[:num_classes]

    records = split_records(cfg, run_dir)
    gt = np.zeros(num_classes)
    confident = np.zeros((len(taus), num_classes))
    correct = np.zeros((len(taus), num_classes))
    missed = np.zeros((len(taus), num_classes))  # per ground-truth class: confident and wrong
    pixels = 0
    pad = pad_value_for(cfg.data, in_channels)
    with torch.inference_mode():
        for record in records:
            image, mask = read_record(record, cfg.data, num_classes, in_channels)
            probs = predict_logits(model, image_to_tensor(image, cfg.data)[None], cfg.eval, pad).softmax(1)[0]
            conf, pred = probs.max(0)
            target = torch.from_numpy(np.asarray(mask, dtype=np.int64))
            valid = target != 255
            pixels += int(valid.sum())
            gt += per_class(target[valid])
            for i, tau in enumerate(taus):
                sure = valid & (conf >= tau)
                confident[i] += per_class(pred[sure])
                correct[i] += per_class(pred[sure & (pred == target)])
                missed[i] += per_class(target[sure & (pred != target)])
    class_names = ckpt["class_names"]
    return [
        {
            "run": str(run_dir),
            "method": cfg.method.name if hasattr(cfg.method, "name") else str(cfg.method),
            "step": ckpt["step"],
            "images": len(records),
            "threshold": tau,
            "mask_ratio": float(confident[i].sum() / max(pixels, 1)),
            "classes": {
                class_names[c]: {
                    "gt_share": float(gt[c] / max(pixels, 1)),
                    "confident_share": float(confident[i, c] / max(pixels, 1)),
                    "confident_recall": float(correct[i, c] / gt[c]) if gt[c] else None,
                    "confident_miss": float(missed[i, c] / gt[c]) if gt[c] else None,
                    "confident_precision": (
                        float(correct[i, c] / confident[i, c]) if confident[i, c] else None
                    ),
                }
                for c in range(num_classes)
            },
        }
        for i, tau in enumerate(taus)
    ]


def markdown(rows: list[dict], command: str) -> str:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    lines = [
        f"Pseudo-labels of each run's final weights on its unlabeled images (whole image, eval mode). "
        f"Command: `{command}`",
        "",
        "| run | τ | mask ratio | class | GT share | confident share | confident recall "
        "| confident miss | confident precision |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        label = "/".join(Path(row["run"]).parts[-2:])
        for name, s in row["classes"].items():
            cells = [label, str(row["threshold"]), pct(row["mask_ratio"]), name, pct(s["gt_share"])]
            cells += [pct(s[k]) for k in ("confident_share", "confident_recall", "confident_miss")]
            cells.append(pct(s["confident_precision"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories with latest.pt and splits/")
    p.add_argument(
        "--threshold", type=float, nargs="+", help="τ values (default: the run's method.threshold, else 0.95)"
    )
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [row for r in args.runs if (r / "latest.pt").is_file() for row in run_stats(r, args.threshold)]
    command = command_line("pseudo_label_stats.py", args.runs, args.out, threshold=args.threshold)
    write_outputs(args.out, command, rows, markdown(rows, command))


if __name__ == "__main__":
    main()
