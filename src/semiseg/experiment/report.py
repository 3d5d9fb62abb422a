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

SURFACE_RECORD_KEYS = ("hd95", "asd", "assd", "mhd95", "masd", "massd", "surface_counts")


def collect_records(grid: Grid) -> list[dict]:
    """One record per finished cell with the keys of the benchmark files: read from the cell's
    ``results.json``, or, for a recorded cell, its committed record unchanged."""
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
            "miou": mean_std([r["miou"] for r in recs]),
            "iou": {c: mean_std([r["iou"].get(c) for r in recs]) for c in classes},
            "seconds": mean_std([r["seconds"] for r in recs]),
            "per_seed": {r["seed"]: {"miou": r["miou"], "iou": r["iou"]} for r in recs},
            **_surface_summary(recs, classes),
        }
        rows.append(row)
    return rows


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


def surface_table_lines(group: list[dict], dataset: str, fraction: float | int) -> list[str]:
    """HD95 / ASD (pixels) per foreground class, mean ± std over the seeds that have them, for one
    table block; no lines when no run of the block has surface distances. A method whose runs
    predate them shows ``–``."""
    classes = list(dict.fromkeys(c for row in group for c in row.get("hd95", {})))
    if not classes:
        return []
    means = len(classes) > 1
    header = [f"{c} {m}" for c in classes for m in ("HD95", "ASD")] + (["mean HD95", "mean ASD"] * means)
    out = [
        f"**{dataset}, {fraction_label(fraction)} labeled** (HD95 / ASD in pixels at the evaluated "
        "resolution, per test image then averaged; mean ± std over seeds; lower is better)",
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
    return out


def table1_markdown(rows: list[dict], caption: str) -> str:
    """Paper Table 1 style: per-class IoU ± std and mIoU ± std, per dataset and fraction; then, when
    runs have them, HD95 / ASD per foreground class (:func:`surface_table_lines`)."""
    out = [caption, ""]
    keyed: dict[tuple, list[dict]] = {}
    for row in rows:
        keyed.setdefault((row["dataset"], row["fraction"]), []).append(row)
    for (dataset, fraction), group in keyed.items():
        classes = list(group[0]["iou"])
        out.append(f"**{dataset}, {fraction_label(fraction)} labeled** (IoU %, mean ± std over seeds)")
        out.append("")
        out.append("| method | seeds | " + " | ".join(classes) + " | mIoU |")
        out.append("|---|---|" + "---|" * (len(classes) + 1))
        for row in group:
            cells = [_fmt(*row["iou"][c]) for c in classes]
            out.append(
                f"| {row['method']} | {', '.join(map(str, row['seeds']))} | "
                + " | ".join(cells)
                + f" | **{_fmt(*row['miou'])}** |"
            )
        out.append("")
        out.extend(_seed_note(group))
        out.extend(surface_table_lines(group, dataset, fraction))
    return "\n".join(out)


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


def table2_markdown(rows: list[dict], baseline: str, rare: dict[str, list[str]], caption: str) -> str:
    """Paper Table 2 style: rare-class IoU and mIoU (means over seeds), with the improvement over
    ``baseline`` in parentheses, paired by seed (:func:`paired_delta`); when the pair's seeds are not
    all of both rows' seeds, the seeds used are named in the cell."""
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
        out.extend(_seed_note(list(by_method.values())))
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
    grid: Grid, records: list[dict], out_dir: Path | None = None, figures: bool = True
) -> dict[str, Path]:
    """records.json, table1.md (+ table2.md with a baseline), summary.csv, split files used."""
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
    atomic_write_text(table1_markdown(rows, caption) + "\n", paths["table1"])
    atomic_write_text(rows_csv(rows), paths["csv"])
    if grid.baseline:
        paths["table2"] = out_dir / "table2.md"
        atomic_write_text(
            table2_markdown(rows, grid.baseline, grid.rare_classes, caption) + "\n", paths["table2"]
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
