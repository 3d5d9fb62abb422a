"""Paired comparisons in the reports: per-seed differences between two rows of a table, the
95 % interval of their mean (t over seeds) and a bootstrap over test images within seeds
(:mod:`semiseg.experiment.stats`), and their Markdown lines."""

from __future__ import annotations

import math
import statistics

from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, paired_bootstrap, t_interval, verdict


def paired_delta(row: dict, base: dict, cls: str | None) -> tuple[float, list[int]] | None:
    """Mean over the seeds both rows have of ``row − base`` (class ``cls`` IoU, or mIoU for None),
    and those seeds; None when they share no seed with a value. With equal seed sets this is the
    difference of the means; in a grid in progress it stays a paired comparison."""

    def value(r: dict, seed: int) -> float | None:
        rec = r["per_seed"][seed]
        return rec["miou"] if cls is None else rec["iou"].get(cls)

    pairs = {s: (value(row, s), value(base, s)) for s in sorted(set(row["per_seed"]) & set(base["per_seed"]))}
    diffs = {s: a - b for s, (a, b) in pairs.items() if a is not None and b is not None}
    if not diffs:
        return None
    return statistics.mean(diffs.values()), list(diffs)


METRIC_NAMES = {"miou": "mIoU", "mdice": "mDice"}


NO_PER_IMAGE = "n/a (records without per-image results)"


def _seed_value(row: dict, seed: int, metric: str, cls: str | None) -> float | None:
    rec = row["per_seed"][seed]
    return rec["iou"].get(cls) if metric == "iou" else rec.get(metric)


def paired_interval(
    row: dict,
    base: dict,
    metric: str = "miou",
    cls: str | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict | None:
    """``row − base`` paired by seed, for ``metric`` (``miou``, ``mdice``, or ``iou`` of class ``cls``):
    the mean over the seeds both rows have a value for, its 95 % Student t-interval over those seeds
    (``d̄ ± t_{0.975, n−1} s_d / √n``; None for one seed) and the 95 % paired bootstrap over test images
    within seeds (:func:`~semiseg.experiment.stats.paired_bootstrap`; None, with ``bootstrap_note``
    saying why, unless every seed of both rows has ``per_image``). None when no seed pairs up."""
    diffs = {}
    for s in sorted(set(row["per_seed"]) & set(base["per_seed"])):
        a, b = _seed_value(row, s, metric, cls), _seed_value(base, s, metric, cls)
        if a is not None and b is not None and not (math.isnan(a) or math.isnan(b)):
            diffs[s] = a - b
    if not diffs:
        return None
    t = t_interval(list(diffs.values()))
    t_bounds = (t.low, t.high) if t.n > 1 else None
    per_image = [(row["per_seed"][s].get("per_image"), base["per_seed"][s].get("per_image")) for s in diffs]
    bootstrap, note = None, None
    if not any(a or b for a, b in per_image):
        note = NO_PER_IMAGE
    elif not all(a and b for a, b in per_image):
        note = "n/a (some seeds without per-image results)"
    else:
        classes = list(base["per_seed"][next(iter(diffs))]["iou"])
        if metric == "iou" and cls not in classes:
            note = f"n/a (no class {cls!r} in the records)"
        else:
            class_index = classes.index(cls) if metric == "iou" else None
            bootstrap = paired_bootstrap(per_image, metric, class_index, resamples, seed)
            note = None if bootstrap is not None else "n/a (the rows share no test image)"
    return {
        "seeds": list(diffs),
        "mean": t.mean,
        "t": t_bounds,
        "bootstrap": bootstrap,
        "bootstrap_note": note,
        "verdict": verdict([t_bounds, bootstrap]),
    }


def _fmt_interval(bounds: tuple[float, float] | None) -> str:
    return f"[{100 * bounds[0]:+.2f}, {100 * bounds[1]:+.2f}]" if bounds else ""


def paired_table_lines(
    pairs: list[tuple[dict, dict]],
    metrics: list[tuple[str, str | None]],
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> list[str]:
    """A Markdown table of :func:`paired_interval` for every ``(row, reference)`` pair and every
    ``(metric, class)`` in ``metrics``; no lines when nothing pairs up."""
    lines = []
    for row, base in pairs:
        for metric, cls in metrics:
            result = paired_interval(row, base, metric, cls, resamples)
            if result is None:
                continue
            name = f"IoU {cls}" if metric == "iou" else METRIC_NAMES.get(metric, metric)
            n = len(result["seeds"])
            interval = _fmt_interval(result["t"])
            t_text = f"{interval} (t, {n} seeds)" if interval else f"n/a ({n} seed{'s' if n > 1 else ''})"
            boot_text = _fmt_interval(result["bootstrap"]) or result["bootstrap_note"]
            lines.append(
                f"| {row['method']} − {base['method']} | {name} | {', '.join(map(str, result['seeds']))} | "
                f"{100 * result['mean']:+.2f} | {t_text} | {boot_text} | "
                f"{result['verdict']} |"
            )
    if not lines:
        return []
    return [
        "Paired differences, row − reference in points, mean over the seeds both rows have; 95 % "
        "intervals: Student t over seeds, and a bootstrap over test images within seeds "
        f"({resamples} draws). *n.s.*: an interval contains 0, so the difference is neither a gain "
        "nor a loss.",
        "",
        "| row − reference | metric | seeds | Δ | 95 % t-interval | 95 % bootstrap | verdict |",
        "|---|---|---|---:|---|---|---|",
        *lines,
        "",
    ]


def _comparison_pairs(group: list[dict], references: list[str]) -> list[tuple[dict, dict]]:
    """Every other row against each reference present in ``group`` (the first row when none is),
    without repeating a pair the other way round."""
    by_method = {row["method"]: row for row in group}
    refs = [m for m in references if m in by_method] or [group[0]["method"]]
    pairs, seen = [], set()
    for ref in refs:
        for row in group:
            key = frozenset((row["method"], ref))
            if row["method"] == ref or key in seen:
                continue
            seen.add(key)
            pairs.append((row, by_method[ref]))
    return pairs
