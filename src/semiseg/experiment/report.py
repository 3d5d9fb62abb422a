"""Reports of a grid: the records of finished cells, Table 1 / Table 2 markdown, ``summary.csv``,
``records.json``, the split files used and the figures."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ..checkpoint import atomic_write_text
from ..inference import json_safe
from .grid import Cell, Grid, cell_state, fraction_label, load_recorded, record_key
from .paired import (
    _comparison_pairs,
    paired_delta,
    paired_table_lines,
)
from .stats import BOOTSTRAP_RESAMPLES

SURFACE_RECORD_KEYS = ("hd95", "asd", "assd", "mhd95", "masd", "massd", "surface_counts", "volume_counts")
# Copied from a run's test results into its record when present: per-image counts (and per-volume
# Dice / HD95) for the paired bootstrap, how the test set was evaluated, and the mean Dice.
PER_IMAGE_RECORD_KEYS = ("mdice", "evaluation", "per_image")


def collect_records(grid: Grid) -> list[dict]:
    """One record per finished cell with the keys of the benchmark files: read from the cell's
    ``results.json``, or, for a recorded cell, its committed record unchanged.

    Optional keys, present when the run has them: :data:`SURFACE_RECORD_KEYS`,
    :data:`PER_IMAGE_RECORD_KEYS` (``per_image``: one ``{"name", "tp", "fp", "fn"}`` per test image,
    class order that of ``iou``, plus ``dice`` and ``hd95`` per volume when ``evaluation`` is
    ``"volume"``) and ``split_seed`` (the config's ``data.split_seed``, when it sets one: the runs
    of one split seed share their labeled set)."""
    recorded = load_recorded(grid)
    records = []
    for cell in grid.cells:
        path = cell.run_dir / "results.json"
        state = cell_state(cell, recorded)
        if state == "recorded":
            records.append(recorded[record_key(cell)])
        if state != "done":
            continue
        payload = json.loads(path.read_text())
        test = payload["results"].get("test")
        if test is None:
            continue
        split_seed = cell.cfg.data.split_seed
        records.append(
            {
                "dataset": cell.dataset,
                "fraction": cell.fraction,
                "method": cell.method,
                "seed": cell.seed,
                "protocol": grid.protocol,
                "miou": test["miou"],
                "iou": test["iou"],
                "dice": test.get("dice"),
                # HD95 / ASD / ASSD (pixels) of runs evaluated with surface metrics; absent in older runs
                **{k: test[k] for k in SURFACE_RECORD_KEYS if k in test},
                **{k: test[k] for k in PER_IMAGE_RECORD_KEYS if k in test},
                **({"split_seed": split_seed} if split_seed is not None else {}),
                "steps": payload["steps"],
                "seconds": payload["seconds"],
                "config_hash": payload["config_hash"],
                "weights": payload.get("weights", "final"),
                "run_dir": str(cell.run_dir),
            }
        )
    return records


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    """Mean and sample std (n−1; 0 for one value) over the non-missing values."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.mean(vals), std, len(vals)


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "–"
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def _surface_summary(recs: list[dict], classes: list[str]) -> dict:
    """Mean/std over seeds of HD95 and ASD (pixels) per scored (foreground) class and of their
    foreground means, from the records that have them (older runs have none: empty dicts)."""
    with_surface = [r for r in recs if r.get("surface_counts")]
    scored = {c for r in with_surface for c in r["surface_counts"]}
    surface_classes = [c for c in classes if c in scored]
    return {
        "surface_seeds": sorted(r["seed"] for r in with_surface),
        "hd95": {c: mean_std([(r.get("hd95") or {}).get(c) for r in with_surface]) for c in surface_classes},
        "asd": {c: mean_std([(r.get("asd") or {}).get(c) for r in with_surface]) for c in surface_classes},
        "mhd95": mean_std([r.get("mhd95") for r in with_surface]),
        "masd": mean_std([r.get("masd") for r in with_surface]),
    }


def summarize(records: list[dict]) -> list[dict]:
    """Group by (dataset, fraction, method): mean/std of mIoU and per-class IoU over seeds (and of
    HD95 / ASD over the seeds whose records have them: :func:`_surface_summary`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["fraction"], r["method"]), []).append(r)
    rows = []
    for (dataset, fraction, method), recs in groups.items():
        classes = list(recs[0]["iou"])
        row = {
            "dataset": dataset,
            "fraction": fraction,
            "method": method,
            "seeds": sorted(r["seed"] for r in recs),
            "metric": headline_metric(recs),
            "miou": mean_std([r["miou"] for r in recs]),
            "mdice": mean_std([r.get("mdice") for r in recs]),
            "iou": {c: mean_std([r["iou"].get(c) for r in recs]) for c in classes},
            "dice": {c: mean_std([(r.get("dice") or {}).get(c) for r in recs]) for c in classes},
            "seconds": mean_std([r["seconds"] for r in recs]),
            "per_seed": {
                r["seed"]: {
                    "miou": r["miou"],
                    "iou": r["iou"],
                    **{k: r[k] for k in PER_IMAGE_RECORD_KEYS if k in r},
                }
                for r in recs
            },
            **_surface_summary(recs, classes),
        }
        counted = [r["volume_counts"] for r in recs if r.get("volume_counts")]
        if counted:  # volumes scored with SSL4MIS's Dice 0 / HD95 0 for an empty prediction
            row["empty_predictions"] = {
                c: sum(vc[c]["empty_prediction"] for vc in counted) for c in counted[0]
            }
        rows.append(row)
    return rows


def headline_metric(records: list[dict]) -> str:
    """``mdice`` when every record was evaluated by volume and carries ``mdice``, else ``miou``."""
    by_volume = all(r.get("evaluation") == "volume" and r.get("mdice") is not None for r in records)
    return "mdice" if records and by_volume else "miou"


def _seed_note(group: list[dict]) -> list[str]:
    """A warning line when the methods of one table block were averaged over different seeds
    (a grid in progress): their means are then not a paired comparison."""
    seed_sets = {tuple(row["seeds"]) for row in group}
    if len(seed_sets) <= 1:
        return []
    per_method = "; ".join(f"{row['method']}: {', '.join(map(str, row['seeds']))}" for row in group)
    return [f"*Methods averaged over different seeds ({per_method}); compare on the common seeds.*", ""]


def _fmt_px(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def surface_table_lines(
    group: list[dict], dataset: str, fraction: float | int, by_volume: bool = False
) -> list[str]:
    """HD95 / ASD (pixels) per foreground class, mean ± std over the seeds that have them, for one
    table block; no lines when no run of the block has surface distances. A method whose runs
    predate them shows ``–``."""
    classes = list(dict.fromkeys(c for row in group for c in row.get("hd95", {})))
    if not classes:
        return []
    means = len(classes) > 1
    header = [f"{c} {m}" for c in classes for m in ("HD95", "ASD")] + (["mean HD95", "mean ASD"] * means)
    unit = (
        "in voxels of the original volumes (spacing 1), per test volume in 3-D"
        if by_volume
        else "in pixels at the evaluated resolution, per test image"
    )
    out = [
        f"**{dataset}, {fraction_label(fraction)} labeled** (HD95 / ASD {unit}, then averaged; "
        "mean ± std over seeds; lower is better)",
        "",
        "| method | seeds | " + " | ".join(header) + " |",
        "|---|---|" + "---|" * len(header),
    ]
    empty = (math.nan, math.nan, 0)
    for row in group:
        cells = [_fmt_px(*row.get(metric, {}).get(c, empty)) for c in classes for metric in ("hd95", "asd")]
        if means:
            cells += [_fmt_px(*row.get("mhd95", empty)), _fmt_px(*row.get("masd", empty))]
        seeds = ", ".join(map(str, row.get("surface_seeds", []))) or "–"
        out.append(f"| {row['method']} | {seeds} | " + " | ".join(cells) + " |")
    out.append("")
    empties = [
        f"{row['method']}: " + ", ".join(f"{c} {n}" for c, n in row["empty_predictions"].items() if n)
        for row in group
        if any(row.get("empty_predictions", {}).values())
    ]
    if empties:
        out += [
            "Test volumes with an empty prediction of a class, summed over seeds (scored Dice 0 and "
            "HD95 = ASD = 0, the SSL4MIS convention, which flatters the distances): " + "; ".join(empties),
            "",
        ]
    return out


def table1_markdown(
    rows: list[dict],
    caption: str,
    references: list[str] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> str:
    """Paper Table 1 style: per-class IoU ± std and mIoU ± std (and mDice ± std for datasets evaluated
    by volume), per dataset and fraction; the paired differences of the headline metric (mDice by
    volume, else mIoU) against each of ``references`` (default: the block's first method) with 95 %
    intervals (:func:`paired_table_lines`); then, when runs have them, HD95 / ASD per foreground
    class (:func:`surface_table_lines`)."""
    out = [caption, ""]
    keyed: dict[tuple, list[dict]] = {}
    for row in rows:
        keyed.setdefault((row["dataset"], row["fraction"]), []).append(row)
    for (dataset, fraction), group in keyed.items():
        classes = list(group[0]["iou"])
        metric = _block_metric(group)
        dice = metric == "mdice"
        if dice:  # by volume: per-class 3-D Dice of the foreground classes, as the field reports
            classes = [c for c in classes if any(row["dice"][c][2] for row in group)]
            title = "per-class Dice per volume %, mean ± std over seeds; mDice = foreground mean"
        else:
            title = "IoU %, mean ± std over seeds"
        out.append(f"**{dataset}, {fraction_label(fraction)} labeled** ({title})")
        out.append("")
        out.append("| method | seeds | " + " | ".join(classes) + " | mIoU |" + " mDice |" * dice)
        out.append("|---|---|" + "---|" * (len(classes) + 1 + dice))
        for row in group:
            cells = [_fmt(*row["dice" if dice else "iou"][c]) for c in classes]
            out.append(
                f"| {row['method']} | {', '.join(map(str, row['seeds']))} | "
                + " | ".join(cells)
                + f" | **{_fmt(*row['miou'])}** |"
                + f" **{_fmt(*row['mdice'])}** |" * dice
            )
        out.append("")
        out.extend(_seed_note(group))
        pairs = _comparison_pairs(group, references or [])
        out.extend(paired_table_lines(pairs, [(metric, None)], resamples))
        out.extend(surface_table_lines(group, dataset, fraction, by_volume=dice))
    return "\n".join(out)


def _block_metric(group: list[dict]) -> str:
    return "mdice" if group and all(row.get("metric") == "mdice" for row in group) else "miou"


def table2_markdown(
    rows: list[dict],
    baseline: str,
    rare: dict[str, list[str]],
    caption: str,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> str:
    """Paper Table 2 style: rare-class IoU and mIoU (means over seeds), with the difference from
    ``baseline`` in parentheses, paired by seed (:func:`paired_delta`); when the pair's seeds are not
    all of both rows' seeds, the seeds used are named in the cell. Below each block, the same
    differences (and mDice for datasets evaluated by volume) with 95 % intervals
    (:func:`paired_table_lines`)."""
    out = [caption, ""]
    keyed: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        keyed.setdefault((row["dataset"], row["fraction"]), {})[row["method"]] = row
    for (dataset, fraction), by_method in keyed.items():
        base = by_method.get(baseline)
        classes = rare.get(dataset) or [c for c in next(iter(by_method.values()))["iou"]][1:]
        out.append(
            f"**{dataset}, {fraction_label(fraction)} labeled** "
            f"(IoU %, mean over seeds; (Δ) vs {baseline}, paired by seed)"
        )
        out.append("")
        out.append("| method | " + " | ".join(classes) + " | mIoU |")
        out.append("|---|" + "---|" * (len(classes) + 1))
        for method, row in by_method.items():
            cells = []
            for c in [*classes, None]:
                m = row["miou"][0] if c is None else row["iou"][c][0]
                text = f"{100 * m:.2f}"
                delta = paired_delta(row, base, c) if base is not None and method != baseline else None
                if delta is not None:
                    diff, seeds = delta
                    complete = seeds == row["seeds"] == base["seeds"]
                    plural = "s" if len(seeds) > 1 else ""
                    on = "" if complete else f", seed{plural} {', '.join(map(str, seeds))}"
                    text += f" ({100 * diff:+.2f}{on})"
                cells.append(text)
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
        group = list(by_method.values())
        out.extend(_seed_note(group))
        if base is not None:
            pairs = _comparison_pairs(group, [baseline])
            metrics = [("iou", c) for c in classes] + [("miou", None)]
            if _block_metric(group) == "mdice":
                metrics.append(("mdice", None))
            out.extend(paired_table_lines(pairs, metrics, resamples))
    return "\n".join(out)


def rows_csv(rows: list[dict]) -> str:
    lines = ["dataset,fraction,method,n_seeds,metric,mean,std"]
    for row in rows:
        n = len(row["seeds"])
        lines.append(
            f"{row['dataset']},{row['fraction']},{row['method']},{n},miou,{row['miou'][0]:.6f},{row['miou'][1]:.6f}"
        )
        for c, (m, s, _) in row["iou"].items():
            lines.append(f"{row['dataset']},{row['fraction']},{row['method']},{n},iou/{c},{m:.6f},{s:.6f}")
        # HD95 / ASD in pixels (not fractions), n = the seeds that have them; absent for older runs
        surface = [(f"{k}/{c}", v) for k in ("hd95", "asd") for c, v in row.get(k, {}).items()]
        surface += [(k, row[k]) for k in ("mhd95", "masd") if k in row]
        for metric, (m, s, k) in surface:
            if k:
                lines.append(
                    f"{row['dataset']},{row['fraction']},{row['method']},{k},{metric},{m:.6f},{s:.6f}"
                )
    return "\n".join(lines) + "\n"


def write_reports(
    grid: Grid,
    records: list[dict],
    out_dir: Path | None = None,
    figures: bool = True,
    references: list[str] | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Path]:
    """records.json, table1.md (+ table2.md with a baseline), summary.csv, split files used. Table 1's
    paired intervals are against ``references`` (default: the grid's ``compare`` methods, else its
    baseline, else each block's first method); ``resamples``: draws of the paired bootstrap."""
    out_dir = out_dir or grid.reports
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    weights = {r["weights"] for r in records} or {"final"}
    caption = (
        f"*{grid.name}* — protocol `{grid.protocol}`; test split evaluated with the "
        f"{'/'.join(sorted(weights))} weights (no checkpoint selection on test)."
    )
    paths = {
        "records": out_dir / "records.json",
        "table1": out_dir / "table1.md",
        "csv": out_dir / "summary.csv",
    }
    atomic_write_text(json.dumps(json_safe(records), indent=1), paths["records"])
    references = references or grid.compare or ([grid.baseline] if grid.baseline else None)
    atomic_write_text(table1_markdown(rows, caption, references, resamples) + "\n", paths["table1"])
    atomic_write_text(rows_csv(rows), paths["csv"])
    if grid.baseline:
        paths["table2"] = out_dir / "table2.md"
        atomic_write_text(
            table2_markdown(rows, grid.baseline, grid.rare_classes, caption, resamples) + "\n",
            paths["table2"],
        )
    paths.update(_write_split_copies(grid, out_dir))
    if figures and records:
        paths.update(_write_figures(grid, rows, out_dir))
    return paths


def _finished_cells(grid: Grid) -> list[Cell]:
    return [c for c in grid.cells if cell_state(c) == "done"]


def _write_split_copies(grid: Grid, out_dir: Path) -> dict[str, Path]:
    """The split files each (dataset, fraction, seed) used, next to the results."""
    written = {}
    seen = set()
    for cell in _finished_cells(grid):
        key = (cell.dataset, fraction_label(cell.fraction), cell.seed)
        if key in seen:
            continue
        seen.add(key)
        target = out_dir / "splits" / f"{cell.dataset}_{key[1]}_seed{cell.seed}"
        for part in ("labeled", "unlabeled", "val", "test"):
            src = cell.run_dir / "splits" / f"{part}.txt"
            if src.is_file():
                atomic_write_text(src.read_text(), target / f"{part}.txt")
        written[f"splits/{target.name}"] = target
    return written


def _write_figures(grid: Grid, rows: list[dict], out_dir: Path) -> dict[str, Path]:
    """Per (dataset, fraction): IoU bars, and from each method's lowest-seed run the training
    curves and the qualitative grid. Those two need the runs themselves: when one of them is only
    recorded (its run directory is gone), the existing figure is kept, not redrawn from other seeds."""
    from ..figures import (  # matplotlib loads only when figures are drawn
        curves_figure,
        iou_bar_chart,
        pseudo_label_figure,
        qualitative_figure,
    )

    written: dict[str, Path] = {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["fraction"]), []).append(row)
    done = {(c.dataset, c.fraction, c.method, c.seed): c.run_dir for c in _finished_cells(grid)}
    for (dataset, fraction), group in groups.items():
        tag = f"{dataset}_{fraction_label(fraction)}"
        title = f"{dataset}, {fraction_label(fraction)} labeled ({grid.protocol})"
        written[f"bars_{tag}"] = iou_bar_chart(group, out_dir / f"iou_{tag}.png", title)
        first_seed = {
            row["method"]: done.get((dataset, fraction, row["method"], min(row["seeds"]))) for row in group
        }
        if None in first_seed.values():
            continue  # some lowest-seed run is only recorded: keep the committed curves and grid
        curve = curves_figure(first_seed, out_dir / f"curves_{tag}.png")
        if curve:
            written[f"curves_{tag}"] = curve
        pseudo = pseudo_label_figure(first_seed, out_dir / f"pseudo_labels_{tag}.png", list(group[0]["iou"]))
        if pseudo:
            written[f"pseudo_labels_{tag}"] = pseudo
        written[f"qualitative_{tag}"] = qualitative_figure(
            first_seed, out_dir / f"qualitative_{tag}.png", title=title
        )
    return written
