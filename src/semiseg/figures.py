"""Figures for grids of runs: training curves, per-class IoU bars, qualitative comparison grid.

All PNG through matplotlib (Agg). The qualitative grid follows the SupMix paper's Figure 3: one row
per test image — input, ground truth, then each method's prediction (seed-0 run, final weights) —
in the dataset's colour map with a legend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .data.base import build_splits  # noqa: E402
from .data.io import image_to_tensor, read_record  # noqa: E402
from .evaluate import pad_value_for, predict_logits  # noqa: E402
from .inference import load_trained_model  # noqa: E402
from .plots import plot_pseudo_label_curves, plot_training_curves, save_compact  # noqa: E402
from .visualize import colorize, legend_patches  # noqa: E402


def iou_bar_chart(rows: list[dict], out_png: Path, title: str) -> Path:
    """Grouped bars: classes on the x axis, one bar (mean ± std over seeds) per method."""
    methods = [r["method"] for r in rows]
    classes = list(rows[0]["iou"])
    x = np.arange(len(classes) + 1)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(x), 3.8))
    for i, row in enumerate(rows):
        means = [100 * row["iou"][c][0] for c in classes] + [100 * row["miou"][0]]
        stds = [100 * row["iou"][c][1] for c in classes] + [100 * row["miou"][1]]
        ax.bar(
            x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=row["method"]
        )
    ax.set_xticks(x, [*classes, "mIoU"])
    ax.set_ylabel("IoU (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def curves_figure(run_dirs: dict[str, Path], out_png: Path) -> Path | None:
    """Each method on one plot: the labeled loss ``loss_x`` (the one term every method shares, so
    the curves are comparable), the share of confident pseudo-labels (``mask_ratio``, for the
    methods that log it) and validation mIoU when the dataset has a validation split."""
    runs = {label: d / "metrics.jsonl" for label, d in run_dirs.items() if (d / "metrics.jsonl").is_file()}
    return plot_training_curves(runs, out_png, loss_key="loss_x", ratio_key="mask_ratio") if runs else None


def pseudo_label_figure(run_dirs: dict[str, Path], out_png: Path, class_names: list[str]) -> Path | None:
    """Each method's per-class pseudo-label diagnostics over training (``pl_*`` keys; ``None`` when
    no run logged them)."""
    runs = {label: d / "metrics.jsonl" for label, d in run_dirs.items() if (d / "metrics.jsonl").is_file()}
    return plot_pseudo_label_curves(runs, out_png, class_names) if runs else None


def _to_rgb(image: np.ndarray) -> np.ndarray:
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    return np.clip(rgb, 0, 1)


def qualitative_figure(
    run_dirs: dict[str, Path], out_png: Path, num_images: int = 3, title: str = ""
) -> Path:
    """Paper-Figure-3 style grid for the first ``num_images`` test images of the runs' test split."""
    predictions: dict[str, list[np.ndarray]] = {}
    inputs: list[np.ndarray] = []
    truths: list[np.ndarray] = []
    class_names: list[str] = []
    palette: list = []
    for label, run_dir in run_dirs.items():
        cfg, model, ckpt = load_trained_model(run_dir / "latest.pt")
        splits = build_splits(cfg.data, cfg.seed)
        records = splits.test[:num_images]
        class_names, palette = ckpt["class_names"], [tuple(c) for c in ckpt["palette"]]
        preds = []
        for record in records:
            image, mask = read_record(record, cfg.data, ckpt["num_classes"], ckpt["in_channels"])
            with torch.inference_mode():
                logits = predict_logits(
                    model,
                    image_to_tensor(image, cfg.data).unsqueeze(0),
                    cfg.eval,
                    pad_value=pad_value_for(cfg.data, ckpt["in_channels"]),
                )
            preds.append(logits.argmax(1)[0].numpy().astype(np.uint8))
            if not inputs or len(inputs) < len(records):
                inputs.append(_to_rgb(image))
                truths.append(mask)
        predictions[label] = preds
    cols = 2 + len(predictions)
    rows = len(inputs)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.4 * rows + 0.6), squeeze=False)
    headers = ["input", "ground truth", *predictions]
    for r in range(rows):
        panels = [inputs[r], colorize(truths[r], palette)] + [
            colorize(predictions[m][r], palette) for m in predictions
        ]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=9)
    fig.legend(
        handles=legend_patches(class_names, palette), loc="lower center", ncol=len(class_names), fontsize=8
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_compact(fig, out_png, dpi=100)
    return out_png
