"""Reporting helpers of :mod:`semiseg.metrics`: NaN-aware means, JSON values, class names, and the
per-class results table (:func:`format_table`, re-exported by :mod:`semiseg.metrics`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _nanmean(values: np.ndarray) -> float:
    """Mean over the non-NaN entries; NaN when there are none (without numpy's warning)."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
    return [str(n) for n in class_names]


def format_table(results: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class table (Markdown pipes, readable in a terminal) in percent with 2 decimals.

    ``results`` is the dict of :meth:`~semiseg.metrics.ConfusionMatrix.results`; ``class_names``
    picks and orders the rows (default: every class of ``results``). Absent classes (``None``/NaN)
    show ``n/a``. The last rows give mIoU / mDice and pixel accuracy. When ``results`` holds
    surface distances (``hd95``), two more columns give HD95 and ASD in pixels (``–`` for the
    background, which is not scored, and ``n/a`` for a class no image was scored on), their
    foreground means on the mIoU row. A volume evaluation (``evaluation: volume``) labels its Dice
    mean as the foreground mean per volume and its distances in voxels.
    """
    names = list(class_names) if class_names is not None else list(results["iou"])
    surface = "hd95" in results

    def missing(v: float | None) -> bool:
        return v is None or (isinstance(v, float) and math.isnan(v))

    def pct(v: float | None) -> str:
        return "n/a" if missing(v) else f"{100.0 * v:.2f}"

    def px(key: str, name: str) -> str:
        counts = results.get("surface_counts", {})
        if name not in counts:
            return "–"
        v = results[key].get(name)
        return "n/a" if missing(v) else f"{v:.2f}"

    def mean_px(key: str) -> str:
        v = results.get(key)
        return "n/a" if missing(v) else f"{v:.2f}"

    rows = [[n, pct(results["iou"].get(n)), pct(results["dice"].get(n))] for n in names]
    volume = results.get("evaluation") == "volume"  # Dice and distances per volume in 3-D, foreground mean
    mean_label = "mIoU / fg mean Dice" if volume else "mIoU / mDice"
    rows_tail = [[mean_label, pct(results.get("miou")), pct(results.get("mdice"))]]
    if "accuracy" in results:
        rows_tail.append(["pixel accuracy", pct(results["accuracy"]), ""])
    header = ["class", "IoU", "Dice"]
    if surface:
        header += ["HD95 vox", "ASD vox"] if volume else ["HD95 px", "ASD px"]
        for row in rows:
            row += [px("hd95", row[0]), px("asd", row[0])]
        rows_tail[0] += [mean_px("mhd95"), mean_px("masd")]
        for row in rows_tail[1:]:
            row += ["", ""]
    width = max(len("class"), *(len(r[0]) for r in rows + rows_tail))
    col = 7

    def line(cells: list[str]) -> str:
        return f"| {cells[0]:<{width}} | " + " | ".join(f"{c:>{col}}" for c in cells[1:]) + " |"

    sep = f"|{'-' * (width + 2)}|" + f"{'-' * (col + 1)}:|" * (len(header) - 1)
    out = [line(header), sep, *(line(r) for r in rows)]
    out += [line(r) for r in rows_tail]
    empty = {
        n: c["empty_prediction"] for n, c in results.get("volume_counts", {}).items() if c["empty_prediction"]
    }
    if empty and surface:
        listed = ", ".join(f"{n} {k}" for n, k in empty.items())
        out.append(
            f"(volumes with an empty prediction, scored Dice 0 and HD95/ASD 0 as in SSL4MIS: {listed})"
        )
    return "\n".join(out)
