"""Training-curve figures from ``metrics.jsonl`` files (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_training_curves(
    runs: dict[str, str | Path],
    out_png: str | Path,
    loss_key: str = "total",
    ratio_key: str | None = None,
) -> Path:
    """One figure: training ``loss_key`` per run label, then (for the runs that log it) ``ratio_key``
    (e.g. ``mask_ratio``, the share of confident pseudo-labels), then validation mIoU (a note when
    no run has a validation split). A run keeps one colour across panels."""
    metrics = {label: read_metrics(path) for label, path in runs.items()}
    train = {label: [r for r in recs if r.get("kind") == "train"] for label, recs in metrics.items()}
    val = {label: [r for r in recs if r.get("kind") == "val"] for label, recs in metrics.items()}
    has_ratio = ratio_key is not None and any(ratio_key in r for recs in train.values() for r in recs)
    fig, axes = plt.subplots(1, 3 if has_ratio else 2, figsize=(15 if has_ratio else 10, 4))
    ax_loss, ax_val = axes[0], axes[-1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(runs):
        colour = colours[i % len(colours)]
        loss = [r for r in train[label] if loss_key in r]
        if loss:  # a single logged point is a marker (a line through one point draws nothing)
            marker = "o" if len(loss) == 1 else None
            ax_loss.plot(
                [r["step"] for r in loss],
                [r[loss_key] for r in loss],
                label=label,
                color=colour,
                marker=marker,
            )
        ratio = [r for r in train[label] if has_ratio and ratio_key in r]
        if ratio:
            axes[1].plot(
                [r["step"] for r in ratio],
                [100 * r[ratio_key] for r in ratio],
                label=label,
                color=colour,
                marker="o" if len(ratio) == 1 else None,
            )
        if val[label]:
            steps, miou = [r["step"] for r in val[label]], [100 * r["miou"] for r in val[label]]
            ax_val.plot(steps, miou, marker="o", label=label, color=colour)
    ax_loss.set(xlabel="iteration", ylabel=f"training loss ({loss_key})", title="Training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    if has_ratio:
        axes[1].set(xlabel="iteration", ylabel=f"{ratio_key} (%)", title="Confident pseudo-labels")
        axes[1].legend(fontsize=8)
    ax_val.set(xlabel="iteration", ylabel="mIoU (%)", title="Validation mIoU")
    if any(val.values()):
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax_val.transAxes)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
