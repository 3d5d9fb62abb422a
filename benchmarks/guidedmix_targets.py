"""What GuidedMix-Net's decoupled masks teach: on a finished run's unlabeled images, the pseudo-mask
each decoupling gives (eq. 7, eq. 8) against the ground truth, next to the direct prediction it is
the MSE target of (eq. 10).

Per unlabeled image ``x_u`` (whole image, eval mode, the run's final weights), the labeled image
nearest in pooled encoder features (eq. 3; ``pairing: random`` runs are paired the same way here)
``x_l``, and each λ of ``--lambdas``::

    M_mix = softmax(Γ(λ·x_l + (1 − λ)·x_u)),  M_l = softmax(Γ(x_l))                       (eq. 2)
    soft  = M_mix − λ·M_l    (eq. 8)     hard = M_mix − M_l    (eq. 7)

The MSE of eq. 10 pulls the direct prediction toward the target's projection on the probability
simplex, whose arg-max is the target's: that arg-max is the pseudo-mask reported (per-class IoU, its
share of each class). ``unmix`` (soft ÷ (1 − λ)) rescales each pixel's target by a positive number,
so its arg-max is soft's: what it changes is the pull of eq. 10 toward uniform (a soft target sums
to 1 − λ, a hard one to 0), not the mask. The
paper says decoupled masks are "more credible than the direct predictions": the ``direct`` row is
that comparison. Training runs the mixed pass in train mode (BatchNorm batch statistics of the
mixed crops); eval mode here is the closest whole-image reading.

    python benchmarks/guidedmix_targets.py \\
        runs/grids/cpu_small_recipe/chase_db1/1-8/guidedmix+cedice/seed0 \\
        --out benchmarks/results/guidedmix_targets_chase_db1_1-8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import command_line, split_records, write_outputs

from semiseg.data.io import image_to_tensor, read_record
from semiseg.evaluate import pad_value_for, predict_logits
from semiseg.inference import load_trained_model
from semiseg.methods.guidedmix import decouple, lupi_mix, nearest_pairs, pair_embedding

MODES = ("soft", "hard")
DEFAULT_LAMBDAS = [0.1, 0.25, 0.4]


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    """``num_classes × num_classes`` counts (rows: truth) over the non-ignored pixels."""
    valid = target != 255
    index = target[valid] * num_classes + pred[valid]
    return np.bincount(index.numpy(), minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class(conf: np.ndarray, names: list[str]) -> dict:
    """Per class: IoU against the truth and the share of pixels the mask gives the class."""
    tp, total = np.diag(conf), conf.sum()
    union = conf.sum(0) + conf.sum(1) - tp
    return {
        name: {"iou": float(tp[c] / union[c]) if union[c] else None, "share": float(conf[:, c].sum() / total)}
        for c, name in enumerate(names)
    }


def run_targets(run_dir: Path, lambdas: list[float]) -> dict:
    cfg, model, ckpt = load_trained_model(run_dir / "latest.pt")
    num_classes, in_channels, names = ckpt["num_classes"], ckpt["in_channels"], ckpt["class_names"]
    pad = pad_value_for(cfg.data, in_channels)

    def load(record) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = read_record(record, cfg.data, num_classes, in_channels)
        return image_to_tensor(image, cfg.data)[None], torch.from_numpy(np.asarray(mask, dtype=np.int64))

    def probs(x: torch.Tensor) -> torch.Tensor:
        return predict_logits(model, x, cfg.eval, pad).float().softmax(1)

    def embedding(x: torch.Tensor) -> torch.Tensor:
        return pair_embedding(model.encode(x)[-1], getattr(cfg.method, "pair_features", "pooled"))

    counts = {"direct": np.zeros((num_classes, num_classes), np.int64)}
    for lam in lambdas:
        for mode in MODES:
            counts[f"{mode}@{lam}"] = np.zeros((num_classes, num_classes), np.int64)
    with torch.inference_mode():
        labeled = [load(r) for r in split_records(cfg, run_dir, "labeled")]
        keys = torch.cat([embedding(x) for x, _ in labeled])
        probs_l = [probs(x) for x, _ in labeled]
        unlabeled = split_records(cfg, run_dir)
        for record in unlabeled:
            x_u, target = load(record)
            p_u = probs(x_u)
            counts["direct"] += confusion(p_u.argmax(1)[0], target, num_classes)
            k = int(nearest_pairs(embedding(x_u), keys)[0])
            x_l, p_l = labeled[k][0], probs_l[k]
            if x_l.shape != x_u.shape:
                raise SystemExit(
                    f"{record.name}: size {tuple(x_u.shape[-2:])} != its pair's {tuple(x_l.shape[-2:])}"
                )
            for lam in lambdas:
                lam_t = torch.tensor([lam])
                p_mix = probs(lupi_mix(x_l, x_u, lam_t))
                for mode in MODES:
                    target_map = decouple(p_mix, p_l, lam_t, mode)[0]
                    counts[f"{mode}@{lam}"] += confusion(target_map.argmax(0), target, num_classes)
    return {
        "run": str(run_dir),
        "step": ckpt["step"],
        "images": len(unlabeled),
        "labeled_images": len(labeled),
        "masks": {key: per_class(conf, names) for key, conf in counts.items()},
    }


def markdown(rows: list[dict], command: str) -> str:
    names = list(next(iter(rows[0]["masks"].values())))
    header = " | ".join(f"{n} IoU / share" for n in names)
    lines = [
        "GuidedMix-Net's pseudo-masks on each run's unlabeled images (whole image, eval mode). "
        f"Command: `{command}`",
        "",
        "direct: arg-max of the direct prediction; soft / hard @ λ: arg-max of the decoupled target "
        "(eq. 8 / eq. 7) for the nearest labeled partner (unmix has soft's arg-max).",
        "",
        f"| run | mask | {header} |",
        "|---|---|" + "---:|" * len(names),
    ]
    for row in rows:
        label = "/".join(Path(row["run"]).parts[-2:])
        for key, mask in row["masks"].items():
            cells = " | ".join(
                ("–" if s["iou"] is None else f"{100 * s['iou']:.1f}") + f" / {100 * s['share']:.1f} %"
                for s in mask.values()
            )
            lines.append(f"| {label} | {key} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories with latest.pt and splits/")
    p.add_argument("--lambdas", type=float, nargs="+", default=DEFAULT_LAMBDAS, help="λ values to mix with")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [run_targets(r, args.lambdas) for r in args.runs]
    lambdas = None if args.lambdas == DEFAULT_LAMBDAS else args.lambdas
    command = command_line("guidedmix_targets.py", args.runs, args.out, lambdas=lambdas)
    write_outputs(args.out, command, rows, markdown(rows, command))


if __name__ == "__main__":
    main()
