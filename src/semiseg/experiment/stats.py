"""Paired statistics for grid reports and noise budgets (numpy; t quantiles from scipy).

* **Student t over seeds.** For the paired differences ``d_s = row_s − base_s`` over the ``n`` seeds
  both rows have, the 95 % interval is ``d̄ ± t_{0.975, n−1} · s_d / √n`` (``s_d``: sample std,
  ``n − 1`` in the denominator); the t quantile is ``scipy.stats.t.ppf``.
* **Paired bootstrap over test images within seeds.** ``B`` times, for every seed, draw the seed's
  test images with replacement (the same draw for both rows, images matched by name), recompute
  both rows' metric on the draw and take the difference; average over seeds. The 2.5 / 97.5
  percentiles of the ``B`` averages form the interval. It measures how much the test images
  alone move the mean paired difference; the training seeds stay fixed.
* Metrics on a draw: ``mIoU = mean_c tp_c / (tp_c + fp_c + fn_c)`` over the pooled counts of the
  drawn images, leaving out classes with a zero denominator (as :meth:`ConfusionMatrix.miou`); per
  class IoU likewise; for volume-evaluated records ``mDice`` = the mean over the drawn volumes of
  each volume's mean foreground Dice (``None`` entries skipped).
* **Minimum detectable difference** of a two-sided paired t-test at 95 % with ``n`` seeds:
  ``MDD = t_{0.975, n−1} · sd_paired / √n`` (the half-width of the interval above: a smaller mean
  difference is never significant).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0`` (scipy)."""
    from scipy import special

    return float(special.betainc(a, b, min(max(x, 0.0), 1.0)))


def t_cdf(t: float, df: float) -> float:
    """Student t CDF with ``df`` degrees of freedom (scipy)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    from scipy import stats

    return float(stats.t.cdf(t, df))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_{0.975, 2} = 4.3027``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    from scipy import stats

    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class TInterval:
    """Mean of ``n`` paired differences and its two-sided t-interval (NaN bounds for ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> TInterval:
    """``d̄ ± t_{(1+level)/2, n−1} · s_d / √n`` over the paired differences ``diffs``."""
    values = [float(d) for d in diffs if d is not None and not math.isnan(d)]
    n = len(values)
    if n == 0:
        return TInterval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n < 2:
        return TInterval(mean, math.nan, math.nan, n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return TInterval(mean, mean - half, mean + half, n)


def min_detectable_difference(sd_paired: float, n: int, level: float = LEVEL) -> float:
    """``t_{(1+level)/2, n−1} · sd_paired / √n``: the smallest mean paired difference over ``n`` seeds
    whose two-sided ``level`` t-interval excludes 0."""
    if n < 2:
        raise ValueError(f"a paired t-interval needs at least 2 seeds, got {n}")
    return t_quantile(0.5 + level / 2.0, n - 1) * sd_paired / math.sqrt(n)


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """Pooled within-group std ``√(Σ_g (n_g − 1) s_g² / Σ_g (n_g − 1))`` and its degrees of freedom
    ``Σ_g (n_g − 1)``; groups of one value add nothing. ``(nan, 0)`` without any pair."""
    sum_sq, df = 0.0, 0
    for group in groups:
        values = [float(v) for v in group if v is not None and not math.isnan(v)]
        if len(values) > 1:
            sum_sq += (len(values) - 1) * statistics.variance(values)
            df += len(values) - 1
    return (math.sqrt(sum_sq / df), df) if df else (math.nan, 0)


# ---------------------------------------------------------------------------------------------
# Metrics recomputed from per-image results
# ---------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean_last(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the non-NaN entries; NaN where there are none."""
    valid = ~np.isnan(values)
    total = np.where(valid, values, 0.0).sum(-1)
    count = valid.sum(-1)
    return _ratio(total, count.astype(np.float64))


def pooled_iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class ``tp / (tp + fp + fn)`` of counts summed over images (last axis = class); NaN for a
    zero denominator."""
    return _ratio(tp, tp + fp + fn)


def pooled_miou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray | float:
    """Mean over classes of :func:`pooled_iou`, NaN classes left out (as ``ConfusionMatrix.miou``)."""
    out = _nanmean_last(pooled_iou(np.asarray(tp, float), np.asarray(fp, float), np.asarray(fn, float)))
    return float(out) if np.ndim(out) == 0 else out


def volume_foreground_dice(dice: Sequence[float | None]) -> float:
    """One volume's mean foreground Dice: the mean of ``dice[1:]`` without ``None``/NaN; NaN if none."""
    values = [float(v) for v in dice[1:] if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def per_image_metric(entries: Sequence[dict], metric: str = "miou", class_index: int | None = None) -> float:
    """The metric of a whole per-image list: pooled mIoU (``miou``), pooled IoU of ``class_index``
    (``iou``) or the mean over volumes of their mean foreground Dice (``mdice``)."""
    table = _metric_table(entries, metric, class_index)
    weights = np.ones((1, len(entries)))
    return float(_metric_on_draws(table, weights, metric, class_index)[0])


def _metric_table(entries: Sequence[dict], metric: str, class_index: int | None) -> dict[str, np.ndarray]:
    """The per-image arrays a metric needs: ``tp``/``fp``/``fn`` (images × classes) or ``dice`` (volumes)."""
    if metric == "mdice":
        return {"dice": np.array([volume_foreground_dice(e["dice"]) for e in entries], dtype=np.float64)}
    if metric not in ("miou", "iou"):
        raise ValueError(f"unknown metric {metric!r} (miou, iou, mdice)")
    if metric == "iou" and class_index is None:
        raise ValueError("metric 'iou' needs a class_index")
    return {
        k: np.array([e[k] for e in entries], dtype=np.float64).reshape(len(entries), -1)
        for k in ("tp", "fp", "fn")
    }


def _metric_on_draws(
    table: dict[str, np.ndarray], weights: np.ndarray, metric: str, class_index: int | None
) -> np.ndarray:
    """The metric for each row of ``weights`` (draws × images: how often each image is drawn)."""
    if metric == "mdice":
        dice = table["dice"]
        valid = ~np.isnan(dice)
        return _ratio(weights @ np.where(valid, dice, 0.0), weights @ valid.astype(np.float64))
    tp, fp, fn = (weights @ table[k] for k in ("tp", "fp", "fn"))
    if metric == "iou":
        return pooled_iou(tp[:, class_index], fp[:, class_index], fn[:, class_index])
    return _nanmean_last(pooled_iou(tp, fp, fn))


def paired_bootstrap(
    pairs: Sequence[tuple[Sequence[dict], Sequence[dict]]],
    metric: str = "miou",
    class_index: int | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> tuple[float, float] | None:
    """Percentile interval of the mean over seeds of ``metric(row) − metric(base)`` when each seed's
    test images are drawn with replacement (one draw for both rows, images matched by name).

    ``pairs``: per seed, the two rows' ``per_image`` lists. The generator is seeded with ``seed`` on
    every call, so an interval does not depend on what else a report computes. None when a seed's
    rows share no image or no draw gives a value."""
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for row_entries, base_entries in pairs:
        by_name = {e["name"]: e for e in row_entries}
        base_matched = [e for e in base_entries if e["name"] in by_name]
        if not base_matched:
            return None
        row_matched = [by_name[e["name"]] for e in base_matched]
        n = len(base_matched)
        draws = rng.integers(0, n, size=(resamples, n))
        flat = (np.arange(resamples)[:, None] * n + draws).ravel()
        weights = np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)
        row_values = _metric_on_draws(
            _metric_table(row_matched, metric, class_index), weights, metric, class_index
        )
        base_values = _metric_on_draws(
            _metric_table(base_matched, metric, class_index), weights, metric, class_index
        )
        total += row_values - base_values
    means = total / len(pairs)
    means = means[~np.isnan(means)]
    if means.size == 0:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def verdict(intervals: Sequence[tuple[float, float] | None]) -> str:
    """``higher`` / ``lower`` when every available interval lies strictly above / below 0, ``n.s.``
    when one contains 0 (or they disagree), ``n/a`` without any interval."""
    present = [iv for iv in intervals if iv is not None and not any(math.isnan(v) for v in iv)]
    if not present:
        return "n/a"
    if all(low > 0 for low, _ in present):
        return "higher"
    if all(high < 0 for _, high in present):
        return "lower"
    return "n.s."
