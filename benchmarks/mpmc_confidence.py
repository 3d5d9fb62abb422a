"""What λ_s (Beyond Pixels eq. 5) does to each class: per class, the mean λ_s a finished MPMC run's
teacher gives the pixels pseudo-labelled with it on the run's unlabeled images, next to the λ_s an
ideal teacher would give (the patch's true classes equally likely: 1 / number of classes present).

λ_s(pixel) = γ of the pixel's pseudo-label class at the patch covering it, γ = softmax over classes
of the patch head's logits. In a patch holding k classes an ideal multi-label head is sure of all k,
so γ ≈ 1/k for each: a thin class (vessels) that never fills a patch alone gets λ_s ≈ ½ at best,
while background pixels in background-only patches get ≈ 1. This script measures that bias.

    python benchmarks/mpmc_confidence.py \\
        runs/grids/cpu_small_recipe/chase_db1/1-8/unimatch+mpmc+freematch+da/seed0 \\
        --out benchmarks/results/mpmc_confidence_chase_db1_1-8_seed0

Whole images, eval mode, the run's final weights (``latest.pt``) and its ``splits/unlabeled.txt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import command_line, split_records, write_outputs

from semiseg.data.io import image_to_tensor, read_record
from semiseg.inference import load_trained_model
from semiseg.methods import build_method
from semiseg.plugins.mpmc import patch_targets, pixel_confidence

#: λ_s read as eq. 5's γ or as σ(q) (``lambda_s: presence``), over all / correct / wrong pseudo-labels.
WEIGHT_KEYS = tuple(f"{w}_{part}" for w in ("gamma", "presence") for part in ("all", "correct", "wrong"))


def run_confidence(run_dir: Path) -> dict:
    cfg, model, ckpt = load_trained_model(run_dir / "latest.pt")
    num_classes, in_channels = ckpt["num_classes"], ckpt["in_channels"]
    method = build_method(cfg, model, num_classes)
    method.load_state_dict(ckpt["model"])
    method.eval()
    plugin = method.plugins["mpmc"]
    records = split_records(cfg, run_dir)
    sums = {key: np.zeros(num_classes) for key in WEIGHT_KEYS}
    counts = {key: np.zeros(num_classes) for key in ("all", "correct", "wrong")}
    ideal_sum, gt_count = np.zeros(num_classes), np.zeros(num_classes)
    with torch.inference_mode():
        for record in records:
            image, mask = read_record(record, cfg.data, num_classes, in_channels)
            x = image_to_tensor(image, cfg.data)[None]
            feats = model.encode(x)
            pseudo = model.decode(feats, x.shape[-2:]).argmax(1)  # N×H×W
            logits = plugin.teacher(feats[plugin.tap])
            weights = {
                "gamma": pixel_confidence(plugin.confidence(logits), pseudo, plugin.geometry)[0],
                "presence": pixel_confidence(torch.sigmoid(logits), pseudo, plugin.geometry)[0],
            }
            target = torch.from_numpy(np.asarray(mask, dtype=np.int64))[None]
            present, _ = patch_targets(target, num_classes, plugin.geometry, logits.shape[-2:])
            ideal_gamma = present / present.sum(1, keepdim=True).clamp_min(1)
            ideal = pixel_confidence(ideal_gamma, target.clamp(0, num_classes - 1), plugin.geometry)[0]
            valid = target[0] != 255
            right = pseudo[0] == target[0]
            for c in range(num_classes):
                labelled = (pseudo[0] == c) & valid
                for part, sel in (
                    ("all", labelled),
                    ("correct", labelled & right),
                    ("wrong", labelled & ~right),
                ):
                    counts[part][c] += int(sel.sum())
                    for name, lam in weights.items():
                        sums[f"{name}_{part}"][c] += float(lam[sel].sum())
                sel_gt = (target[0] == c) & valid
                ideal_sum[c] += float(ideal[sel_gt].sum())
                gt_count[c] += int(sel_gt.sum())
    names_c = ckpt["class_names"]

    def mean(total: float, n: float) -> float | None:
        return float(total / n) if n else None

    return {
        "run": str(run_dir),
        "step": ckpt["step"],
        "images": len(records),
        "patch": {"size": plugin.geometry.size, "stride": plugin.geometry.stride},
        "classes": {
            names_c[c]: {
                "teacher_lambda_s": mean(sums["gamma_all"][c], counts["all"][c]),
                "ideal_lambda_s": mean(ideal_sum[c], gt_count[c]),
                "pseudo_share": float(counts["all"][c] / max(counts["all"].sum(), 1)),
                "pseudo_precision": mean(counts["correct"][c], counts["all"][c]),
                **{
                    f"{key}_lambda_s": mean(sums[key][c], counts[key.rsplit("_", 1)[1]][c])
                    for key in WEIGHT_KEYS
                    if key != "gamma_all"
                },
            }
            for c in range(num_classes)
        },
    }


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        f"MPMC's λ_s per class on each run's unlabeled images (whole image, eval mode). Command: `{command}`",
        "",
        "γ: eq. 5 (softmax over classes); presence: σ(q) (`plugins.mpmc.lambda_s: presence`). "
        "correct / wrong: pixels whose pseudo-label matches / misses the ground truth.",
        "",
        "| run | patch (size/stride px) | class | share of pseudo-labels | pseudo-label precision "
        "| λ_s γ (all / correct / wrong) | λ_s presence (all / correct / wrong) "
        "| ideal-teacher γ (1 / classes in the patch) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(value: float | None, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    for row in rows:
        label = "/".join(Path(row["run"]).parts[-2:])
        patch = f"{row['patch']['size']}/{row['patch']['stride']}"
        for name, s in row["classes"].items():
            gamma = " / ".join(
                fmt(s[k]) for k in ("teacher_lambda_s", "gamma_correct_lambda_s", "gamma_wrong_lambda_s")
            )
            presence = " / ".join(fmt(s[f"presence_{p}_lambda_s"]) for p in ("all", "correct", "wrong"))
            precision = "–" if s["pseudo_precision"] is None else f"{100 * s['pseudo_precision']:.1f} %"
            lines.append(
                f"| {label} | {patch} | {name} | {100 * s['pseudo_share']:.1f} % | {precision} | {gamma} "
                f"| {presence} | {fmt(s['ideal_lambda_s'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="MPMC run directories with latest.pt and splits/")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [run_confidence(r) for r in args.runs]
    command = command_line("mpmc_confidence.py", args.runs, args.out)
    write_outputs(args.out, command, rows, markdown(rows, command))


if __name__ == "__main__":
    main()
