"""Paired statistics of the grid reports: Student t quantiles and intervals over seeds, the paired
bootstrap over test images within seeds, and the intervals in the report tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from semiseg.experiment import paired_interval, summarize, table1_markdown, table2_markdown
from semiseg.experiment.stats import (
    betainc,
    min_detectable_difference,
    paired_bootstrap,
    per_image_metric,
    pooled_miou,
    pooled_sd,
    t_cdf,
    t_interval,
    t_quantile,
    verdict,
)
from semiseg.metrics import ConfusionMatrix

# ------------------------------------------------------------------------------------------------
# Student t
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.7062047),
        (0.975, 2, 4.3026527),
        (0.975, 3, 3.1824463),
        (0.975, 4, 2.7764451),
        (0.975, 10, 2.2281389),
        (0.975, 30, 2.0422725),
        (0.995, 10, 3.1692727),
        (0.9, 5, 1.4758840),
        (0.975, 1000, 1.9623391),
    ],
)
def test_t_quantile_matches_published_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-6)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_matches_closed_forms_for_one_and_two_degrees_of_freedom(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)


def test_incomplete_beta_closed_forms_and_bad_arguments():
    assert betainc(1.0, 1.0, 0.3) == pytest.approx(0.3)  # uniform
    assert betainc(2.0, 1.0, 0.3) == pytest.approx(0.09)  # x^a for b = 1
    assert betainc(0.5, 0.5, 0.5) == pytest.approx(0.5)  # symmetric
    assert t_quantile(0.5, 3) == 0.0 and t_cdf(0.0, 7) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_t_interval_by_hand():
    # d = 1, 2, 3: mean 2, s = 1, half-width t_{0.975,2} / √3 = 4.302653 / 1.732051 = 2.484138
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.n == 3 and interval.mean == pytest.approx(2.0)
    assert (interval.low, interval.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # d = 0.01, 0.03, -0.02, 0.04: mean 0.015, s = 0.026458, t_{0.975,3} = 3.182446 → ± 0.042099
    interval = t_interval([0.01, 0.03, -0.02, 0.04])
    assert (interval.low, interval.high) == pytest.approx((0.015 - 0.042099, 0.015 + 0.042099), abs=1e-6)
    one = t_interval([0.5, None])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)


def test_minimum_detectable_difference_and_pooled_sd():
    assert min_detectable_difference(1.0, 3) == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    assert min_detectable_difference(2.0, 5) == pytest.approx(2 * 2.776445 / math.sqrt(5), abs=1e-6)
    with pytest.raises(ValueError):
        min_detectable_difference(1.0, 1)
    # groups (1, 2, 3) and (10, 12): Σ (n−1) s² = 2·1 + 1·2 = 4 over 3 degrees of freedom
    sd, df = pooled_sd([[1, 2, 3], [10, 12], [7]])
    assert df == 3 and sd == pytest.approx(math.sqrt(4 / 3))
    assert math.isnan(pooled_sd([[1.0], []])[0])


def test_verdict_never_calls_an_interval_with_zero_a_difference():
    assert verdict([(0.01, 0.02), None]) == "higher"
    assert verdict([(-0.02, -0.01), (-0.03, -0.001)]) == "lower"
    assert verdict([(-0.01, 0.02)]) == "n.s."
    assert verdict([(0.0, 0.0)]) == "n.s."
    assert verdict([(0.01, 0.02), (-0.01, 0.02)]) == "n.s."  # the bootstrap contains 0
    assert verdict([None, None]) == "n/a"


# ------------------------------------------------------------------------------------------------
# Metrics from per-image counts, paired bootstrap
# ------------------------------------------------------------------------------------------------


def _images(num_classes=3, n=6, seed=0, absent=2):
    """Random per-image predictions and targets; class ``absent`` occurs in neither, some images
    have no class 1 at all."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        target = torch.randint(0, num_classes - 1, (12, 12), generator=g)
        pred = torch.randint(0, num_classes - 1, (12, 12), generator=g)
        if i % 3 == 0:
            target[target == 1], pred[pred == 1] = 0, 0
        target[0, 0] = 255  # ignored pixel
        assert not ((target == absent) | (pred == absent)).any()
        out.append((pred, target))
    return out


def _per_image(pairs, num_classes=3):
    entries = []
    for i, (pred, target) in enumerate(pairs):
        cm = ConfusionMatrix(num_classes)
        cm.update(pred, target)
        m = cm.numpy()
        tp = np.diag(m)
        entries.append(
            {
                "name": f"img{i}",
                "tp": tp.tolist(),
                "fp": (m.sum(0) - tp).tolist(),
                "fn": (m.sum(1) - tp).tolist(),
            }
        )
    return entries


def test_pooled_miou_equals_the_confusion_matrix_on_the_same_counts():
    pairs = _images()
    whole = ConfusionMatrix(3)
    for pred, target in pairs:
        whole.update(pred, target)
    entries = _per_image(pairs)
    assert math.isnan(whole.iou()[2])  # the absent class is left out of both means
    assert per_image_metric(entries) == pytest.approx(whole.miou(), abs=1e-12)
    assert per_image_metric(entries, "iou", 1) == pytest.approx(whole.iou()[1], abs=1e-12)
    tp, fp, fn = (np.array([e[k] for e in entries]).sum(0) for k in ("tp", "fp", "fn"))
    assert pooled_miou(tp, fp, fn) == pytest.approx(whole.miou(), abs=1e-12)
    # a subset with repeats (one bootstrap draw) pools the same way as a matrix of those images
    draw = [0, 0, 3, 5, 5, 5]
    again = ConfusionMatrix(3)
    for i in draw:
        again.update(*pairs[i])
    assert per_image_metric([entries[i] for i in draw]) == pytest.approx(again.miou(), abs=1e-12)


def test_bootstrap_of_identical_rows_is_exactly_zero_even_in_another_order():
    seeds = [_per_image(_images(seed=s)) for s in range(3)]
    pairs = [(list(reversed(entries)), entries) for entries in seeds]  # matched by name, not position
    assert paired_bootstrap(pairs, resamples=500) == (0.0, 0.0)
    assert paired_bootstrap(pairs, "iou", 1, resamples=500) == (0.0, 0.0)


def test_bootstrap_of_a_constant_per_volume_shift_is_that_shift():
    """Volumes whose foreground Dice is 0.1 higher in one seed (5 volumes) and 0.3 higher in the other
    (3 volumes): every draw's mean over seeds is 0.2 (pooling the volumes would give 0.175)."""
    rng = np.random.default_rng(1)

    def volumes(dice):
        return [
            {"name": f"v{i}", "tp": [1, 1, 1], "fp": [0, 0, 0], "fn": [0, 0, 0], "dice": [None, *d.tolist()]}
            for i, d in enumerate(dice)
        ]

    pairs = []
    for count, shift in ((5, 0.1), (3, 0.3)):
        dice = rng.uniform(0.3, 0.6, size=(count, 2))
        pairs.append((volumes(dice + shift), volumes(dice)))
    low, high = paired_bootstrap(pairs, "mdice", resamples=1000)
    assert low == pytest.approx(0.2, abs=1e-12) and high == pytest.approx(0.2, abs=1e-12)


def test_bootstrap_of_identical_images_has_no_width_and_a_real_difference_has_some():
    same = {"tp": [90, 40], "fp": [10, 10], "fn": [10, 10]}
    better = {"tp": [95, 45], "fp": [5, 5], "fn": [10, 10]}
    base = [{"name": f"i{k}", **same} for k in range(4)]
    row = [{"name": f"i{k}", **better} for k in range(4)]
    expected = per_image_metric(row) - per_image_metric(base)
    assert expected > 0
    low, high = paired_bootstrap([(row, base)], resamples=300)
    assert low == pytest.approx(expected, abs=1e-12) and high == pytest.approx(expected, abs=1e-12)
    # different images: a non-empty interval around the full-sample difference
    pairs = [(_per_image(_images(seed=s + 10)), _per_image(_images(seed=s))) for s in range(2)]
    full = np.mean([per_image_metric(a) - per_image_metric(b) for a, b in pairs])
    low, high = paired_bootstrap(pairs, resamples=2000)
    assert low < full < high and high - low > 1e-3


def test_bootstrap_is_reproducible_with_a_fixed_seed():
    pairs = [(_per_image(_images(seed=s + 10)), _per_image(_images(seed=s))) for s in range(2)]
    first = paired_bootstrap(pairs, resamples=400, seed=3)
    assert paired_bootstrap(pairs, resamples=400, seed=3) == first
    assert paired_bootstrap(pairs, resamples=400, seed=4) != first
    assert paired_bootstrap([(pairs[0][0], [{"name": "other", "tp": [1], "fp": [0], "fn": [0]}])]) is None


# ------------------------------------------------------------------------------------------------
# Report tables
# ------------------------------------------------------------------------------------------------


def _record(method, seed, miou, per_image=None, **extra):
    rec = {"dataset": "d", "fraction": 0.125, "method": method, "seed": seed, "miou": miou,
           "iou": {"bg": 0.9, "fg": miou}, "seconds": 1.0, **extra}  # fmt: skip
    if per_image is not None:
        rec["per_image"] = per_image
    return rec


def test_report_prints_the_t_interval_and_says_when_there_is_no_bootstrap():
    # paired differences 0.02, 0.04, 0.00: mean 2.00 points, s = 2 points,
    # half-width 4.302653 · 2 / √3 = 4.97 points → [-2.97, +6.97], which contains 0
    recs = [_record("base", s, v) for s, v in enumerate((0.50, 0.60, 0.70))]
    recs += [_record("ours", s, v) for s, v in enumerate((0.52, 0.64, 0.70))]
    text = table1_markdown(summarize(recs), "c")
    line = next(ln for ln in text.splitlines() if ln.startswith("| ours − base | mIoU"))
    assert line == (
        "| ours − base | mIoU | 0, 1, 2 | +2.00 | [-2.97, +6.97] (t, 3 seeds) | "
        "n/a (records without per-image results) | n.s. |"
    )
    assert "gain" not in line and "loss" not in line
    # Table 2: the rare class and mIoU, with the same interval
    text = table2_markdown(summarize(recs), "base", {"d": ["fg"]}, "c")
    assert "| ours − base | IoU fg | 0, 1, 2 | +2.00 | [-2.97, +6.97] (t, 3 seeds) |" in text
    assert "| ours − base | mIoU | 0, 1, 2 | +2.00 | [-2.97, +6.97] (t, 3 seeds) |" in text


def test_report_compares_against_the_references_and_one_seed_has_no_t_interval():
    recs = [_record(m, 0, v) for m, v in (("sup", 0.5), ("a", 0.6), ("b", 0.7))]
    text = table1_markdown(summarize(recs), "c", references=["sup", "a"])
    assert "| a − sup | mIoU | 0 | +10.00 | n/a (1 seed) |" in text
    assert "| b − sup |" in text and "| b − a |" in text and "| sup − a |" not in text
    default = table1_markdown(summarize(recs), "c")
    assert "| b − sup |" in default and "| b − a |" not in default  # first method by default


def test_report_bootstrap_interval_from_per_image_results():
    seeds = range(3)
    per = {("base", s): _per_image(_images(seed=s)) for s in seeds} | {
        ("ours", s): _per_image(_images(seed=s + 10)) for s in seeds
    }
    recs = [
        _record(m, s, per_image_metric(per[(m, s)]), per[(m, s)]) for m in ("base", "ours") for s in seeds
    ]
    rows = summarize(recs)
    expected = paired_bootstrap([(per[("ours", s)], per[("base", s)]) for s in seeds])
    result = paired_interval(rows[1], rows[0])
    assert result["bootstrap"] == expected and result["bootstrap_note"] is None
    text = table1_markdown(rows, "c")
    assert f"| [{100 * expected[0]:+.2f}, {100 * expected[1]:+.2f}] |" in text
    # a seed without per-image results: no bootstrap, and the table says why
    recs[-1].pop("per_image")
    result = paired_interval(*reversed(summarize(recs)))
    assert result["bootstrap"] is None and "some seeds" in result["bootstrap_note"]


def test_volume_records_tabulate_mean_foreground_dice():
    def volume_record(method, seed, shift):
        counts = {"tp": [5, 5], "fp": [1, 1], "fn": [1, 1]}
        per = [{"name": f"v{i}", **counts, "dice": [None, 0.5 + shift + 0.01 * i]} for i in range(4)]
        mdice = float(np.mean([e["dice"][1] for e in per]))
        return _record(method, seed, 0.6, per, evaluation="volume", mdice=mdice)

    recs = [volume_record("base", s, 0.0) for s in range(2)] + [
        volume_record("ours", s, 0.05) for s in range(2)
    ]
    rows = summarize(recs)
    assert rows[0]["metric"] == "mdice"
    text = table1_markdown(rows, "c")
    assert "per-class Dice per volume" in text and "| mDice |" in text and "**51.50 ± 0.00**" in text
    assert (
        "| ours − base | mDice | 0, 1 | +5.00 | [+5.00, +5.00] (t, 2 seeds) | [+5.00, +5.00] | higher |"
        in text
    )
