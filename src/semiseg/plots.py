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


def plot_training_curves(runs: dict[str, str | Path], out_png: str | Path, loss_key: str = "total") -> Path:
    """One figure: training loss (left) and validation mIoU (right) per run label."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    any_val = False
    for label, path in runs.items():
        records = read_metrics(path)
        train = [r for r in records if r.get("kind") == "train" and loss_key in r]
        val = [r for r in records if r.get("kind") == "val"]
        if train:
            ax_loss.plot([r["step"] for r in train], [r[loss_key] for r in train], label=label)
        if val:
            any_val = True
            ax_val.plot([r["step"] for r in val], [100 * r["miou"] for r in val], marker="o", label=label)
    ax_loss.set(xlabel="iteration", ylabel=f"training loss ({loss_key})", title="Training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_val.set(xlabel="iteration", ylabel="mIoU (%)", title="Validation mIoU")
    if any_val:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation split", ha="center", va="center", transform=ax_val.transAxes)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
