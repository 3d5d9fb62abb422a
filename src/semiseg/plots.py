"""Training-curve figures from ``metrics.jsonl`` files, and one image's prediction next to its ground
truth (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def prediction_figure(
    image: np.ndarray,
    truth: np.ndarray | None,
    prediction: np.ndarray,
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]],
    out_png: str | Path,
    title: str = "",
    panel_inches: float = 3.2,
) -> Path:
    """One image as titled panels: the image, the ground truth (when ``truth`` is given) and the
    prediction, both drawn the same way (class colours blended over the image, background untinted,
    ignore = 255 shown white), with a legend of the classes. ``image`` is ``H×W×C`` float in [0, 1]."""
    from .visualize import IGNORE_COLOR, IGNORE_INDEX, legend_patches, overlay

    panels = [("image", _display_rgb(image))]
    if truth is not None:
        panels.append(("ground truth", _with_ignore(overlay(image, truth, palette), truth)))
    panels.append(("prediction", overlay(image, prediction, palette)))
    height, width = np.asarray(image).shape[:2]
    panel_w, panel_h = (panel_inches * side / max(height, width) for side in (width, height))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * panel_w + 0.3, panel_h + 0.9))
    for ax, (name, rgb) in zip(np.atleast_1d(axes), panels):
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    names = list(class_names)[1:]  # background is left untinted in both panels
    handles = legend_patches(names, list(palette)[1 : len(class_names)]) if names else []
    if truth is not None and (np.asarray(truth) == IGNORE_INDEX).any():
        handles += legend_patches(["ignore"], [IGNORE_COLOR])
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if handles else 0, 1, 1))
    return _save_as_is(fig, out_png, dpi=100)


def _display_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    img = img[..., None] if img.ndim == 2 else img
    return np.clip(np.repeat(img[..., :1], 3, axis=2) if img.shape[2] != 3 else img, 0.0, 1.0)


def _with_ignore(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``rgb`` with the ignore (255) pixels of ``mask`` painted white."""
    from .visualize import IGNORE_COLOR, IGNORE_INDEX

    out = rgb.copy()
    out[np.asarray(mask) == IGNORE_INDEX] = IGNORE_COLOR
    return out


def _save_as_is(fig, out_png: str | Path, dpi: int) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def read_metrics(path: str | Path) -> list[dict]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _plot_steps(ax, records: list[dict], key: str, *fmt: str, percent: bool = False, **style) -> None:
    """``records[i][key]`` (× 100 when ``percent``) against ``records[i]["step"]``; nothing when
    there are no records."""
    if records:
        ax.plot(
            [r["step"] for r in records],
            [100 * r[key] for r in records] if percent else [r[key] for r in records],
            *fmt,
            **style,
        )


def save_compact(fig, out_png: str | Path, dpi: int) -> Path:
    """Save a figure as a 256-colour palette PNG (committed figures stay small) and close it."""
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.open(buffer).convert("RGB").quantize(colors=256).save(out_png, optimize=True)
    return out_png


def _save(fig, out_png: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    return save_compact(fig, out_png, dpi)


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
        ratio = [r for r in train[label] if has_ratio and ratio_key in r]
        for ax, recs, key, percent in ((ax_loss, loss, loss_key, False), (axes[1], ratio, ratio_key, True)):
            marker = "o" if len(recs) == 1 else None  # a line through one point draws nothing
            _plot_steps(ax, recs, key, percent=percent, label=label, color=colour, marker=marker)
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
    return _save(fig, out_png, dpi=110)


def plot_pseudo_label_curves(
    runs: dict[str, str | Path], out_png: str | Path, class_names: list[str] | None = None
) -> Path | None:
    """Per-class pseudo-label diagnostics (``pl_used/<c>``, ``pl_right/<c>``, ``pl_wrong/<c>``, see
    :func:`semiseg.pseudo_labels.pseudo_label_diagnostics`) over training, one column per class:
    top, the share of unlabeled pixels that teach the class; bottom, of the labeled pixels whose
    truth is the class, the share the policy would label right (solid) and wrong (dashed) — a
    minority class collapsing shows as its solid line falling and its dashed line rising.
    ``None`` when no run logged them (runs from before the diagnostics existed)."""
    train = {
        label: [r for r in read_metrics(path) if r.get("kind") == "train"] for label, path in runs.items()
    }
    classes = sorted(
        {
            int(k.split("/", 1)[1])
            for recs in train.values()
            for r in recs
            for k in r
            if k.startswith("pl_used/")
        }
    )
    if not classes:
        return None
    fig, axes = plt.subplots(2, len(classes), figsize=(3.5 * len(classes), 6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, c in enumerate(classes):
        name = class_names[c] if class_names and c < len(class_names) else f"class {c}"
        for i, (label, recs) in enumerate(train.items()):
            colour = colours[i % len(colours)]
            for row, key, style in ((0, "pl_used", "-"), (1, "pl_right", "-"), (1, "pl_wrong", "--")):
                points = [r for r in recs if f"{key}/{c}" in r]
                shown = label if key != "pl_wrong" else None
                _plot_steps(
                    axes[row][col], points, f"{key}/{c}", style, percent=True, color=colour, label=shown
                )
        axes[0][col].set(title=f"{name}: unlabeled pixels teaching it", xlabel="iteration", ylabel="%")
        axes[1][col].set(
            title=f"{name}: labeled truth, right (—) / wrong (--)",
            xlabel="iteration",
            ylabel="% of its pixels",
        )
        axes[0][col].legend(fontsize=7)
    return _save(fig, out_png, dpi=80)
