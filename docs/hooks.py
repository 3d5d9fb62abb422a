"""MkDocs hook: the results pages, generated from the committed records on every build.

For every grid file in ``benchmarks/grids/``, :func:`on_pre_build` writes
``docs/generated/<grid>.md``: what the grid compares, the command that reproduces it, and its tables
built from ``<reports>/records.json`` by :func:`semiseg.experiment.report.summarize`,
:func:`~semiseg.experiment.report.table1_markdown` and, for ablation grids,
:func:`~semiseg.experiment.report.table2_markdown` — the functions ``semiseg reproduce --report-only``
uses, so the pages show what the reports show, paired 95 % intervals included. Nothing is copied by
hand. :func:`on_files` adds the figures of each results folder to the site (they stay where they are).

``docs/generated/`` is git-ignored; a file is rewritten only when its text changes, so ``mkdocs
serve`` does not rebuild in a loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GRIDS = ROOT / "benchmarks" / "grids"
OUT = ROOT / "docs" / "generated"
FIGURES = "generated/figures"  # where the results folders' PNGs appear in the site

# What each grid is for, in one or two sentences (the grid file's own header is used for others).
ABOUT = {
    "table1_cpu_small_recipe": (
        "The SupMix paper's Table 1 rows on the cpu-small protocol with the unlabeled-loss recipe "
        "chosen on validation images (`configs/recipes/adaptive.yaml`); the supervised row trains with "
        "the same labeled loss. Analysis: [Table 1 with the recipe](../studies/table1-recipe.md)."
    ),
    "table2_cpu_small_recipe": (
        "The SupMix paper's Table 2 ablation on UniMatch (CutMix, ClassMix, SupMix, SUFD, SupMix + SUFD) "
        "under the chosen recipe, CHASE_DB1 1/8. Analysis: "
        "[Table 2 with the recipe](../studies/table2-recipe.md)."
    ),
    "full_supervision_cpu_small": (
        "The full-label ceiling: the supervised baseline with the recipe's labeled loss trained on every "
        "image of the training pool, same budget and seeds. Analysis: "
        "[the seed-2 bar](../studies/table1-recipe.md#the-seed-2-bar-and-the-full-label-ceiling)."
    ),
    "mpmc_cpu_small": (
        "MPMC (Beyond Pixels) as a plug-in on UniMatch and on UniMatch + SupMix + SUFD, with the recipe, "
        "CHASE_DB1 and COVID 1/8. Analysis: [MPMC study](../studies/mpmc.md)."
    ),
    "mpmc_ablation_cpu_small": (
        "Beyond Pixels' Table 6 ablation (MPMC-L, MPMC-UL, both) plus the `lambda_s: presence` row, "
        "CHASE_DB1 1/8. Analysis: [MPMC study](../studies/mpmc.md#table-6-ablation)."
    ),
    "guidedmix_cpu_small": (
        "GuidedMix-Net next to the supervised baseline (U-Net and its own network) and UniMatch, all "
        "with the recipe's labeled loss, CHASE_DB1 and COVID 1/8. Analysis: "
        "[GuidedMix-Net study](../studies/guidedmix.md)."
    ),
    "guidedmix_ablation_cpu_small": (
        "GuidedMix-Net's Table 2 ablation (random pairs, MITrans off, hard decoupling) plus the `unmix` "
        "row, CHASE_DB1 1/8. Analysis: [GuidedMix-Net study](../studies/guidedmix.md#table-2-ablation)."
    ),
    "sufd_input_scale_cpu_small": (
        "UniMatch + SupMix + SUFD with the recipe, the paper's discriminator against one that reads "
        "probability maps down-sampled ×0.5 (`plugins.sufd.input_scale: 0.5`), CHASE_DB1 1/8."
    ),
    "acdc_cpu_small": (
        "ACDC at the published labeled sets (3 and 7 cases) with per-volume 3-D Dice, and the full-label "
        "ceiling. Protocol and calibration: [ACDC cpu-small](../studies/acdc.md)."
    ),
    "table1_cpu_small": (
        "The SupMix paper's Table 1 on cpu-small with each paper's own recipe (fixed τ = 0.95, CE). "
        "Analysis: [Table 1 with the paper recipe](../studies/table1-paper-recipe.md)."
    ),
    "table2_cpu_small": (
        "The SupMix paper's Table 2 ablation on cpu-small with the paper recipe; superseded by the "
        "recipe's Table 2 and stopped after 9 cells."
    ),
    "supervised_cpu_small": (
        "The first supervised baseline (seed 0, 1/8 and 1/4). Analysis: "
        "[protocols and calibration](../studies/calibration.md)."
    ),
}


def _write(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _header_comment(grid_file: Path) -> str:
    lines = []
    for line in grid_file.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _figures(reports: Path) -> list[Path]:
    return sorted(reports.glob("*.png")) if reports.is_dir() else []


def grid_page(grid_file: Path) -> str:
    """The Markdown page of one grid (see the module docstring)."""
    from semiseg.experiment.report import summarize, table1_markdown, table2_markdown

    raw = yaml.safe_load(grid_file.read_text()) or {}
    name = str(raw.get("name", grid_file.stem))
    reports = ROOT / str(raw.get("reports") or f"runs/{name}")
    rel = reports.relative_to(ROOT) if reports.is_relative_to(ROOT) else reports
    out = [f"# {name}", "", ABOUT.get(grid_file.stem) or _header_comment(grid_file), ""]
    out += [
        f"Reproduce: `semiseg reproduce benchmarks/grids/{grid_file.stem}.yaml` (`--dry-run` lists the cells and their "
        f"state, `--report-only` rebuilds the committed tables). Results folder: `{rel}/`.",
        "",
        '!!! note "Generated page"',
        "    Built by `docs/hooks.py` from the committed `records.json` on every docs build, with the "
        "functions that write the grid's own reports. Every difference comes with its paired 95 % "
        "intervals; a difference marked *n.s.* is not a gain or a loss.",
        "",
    ]
    records_file = reports / "records.json"
    if not records_file.is_file():
        out += ["No records are committed for this grid yet.", ""]
        return "\n".join(out)
    records = json.loads(records_file.read_text())
    rows = summarize(records)
    weights = {r.get("weights", "final") for r in records} or {"final"}
    caption = (
        f"Protocol `{raw.get('protocol', '?')}`; test split, {'/'.join(sorted(weights))} weights "
        f"(no checkpoint selection on test); {len(records)} records."
    )
    baseline = raw.get("baseline")
    compare = [str(m) for m in raw.get("compare", []) or []] or ([baseline] if baseline else None)
    out += ["## Per-class results", "", table1_markdown(rows, caption, compare), ""]
    out += ["## Per seed", "", *per_seed_lines(rows), ""]
    if baseline:
        rare = raw.get("rare_classes", {}) or {}
        out += [f"## Ablation against {baseline}", "", table2_markdown(rows, baseline, rare, caption), ""]
    figures = _figures(reports)
    if figures:
        out += ["## Figures", ""]
        for png in figures:
            out += [f"![{png.stem}](figures/{grid_file.stem}/{png.name})", ""]
    return "\n".join(out)


def per_seed_lines(rows: list[dict]) -> list[str]:
    """Each row's headline metric (mDice by volume, else mIoU) and minority-class IoU per seed: the
    numbers the paired differences are made of."""
    from semiseg.experiment.grid import fraction_label

    out: list[str] = []
    keyed: dict[tuple, list[dict]] = {}
    for row in rows:
        keyed.setdefault((row["dataset"], row["fraction"]), []).append(row)
    for (dataset, fraction), group in keyed.items():
        seeds = sorted({s for row in group for s in row["per_seed"]})
        metric = "mdice" if all(row.get("metric") == "mdice" for row in group) else "miou"
        classes = [] if metric == "mdice" else list(group[0]["iou"])[1:]
        what = "mDice % per volume" if metric == "mdice" else "mIoU %, foreground IoU % in parentheses"
        out += [
            f"**{dataset}, {fraction_label(fraction)} labeled** ({what})",
            "",
            "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---:|" * len(seeds),
        ]
        for row in group:
            cells = []
            for s in seeds:
                rec = row["per_seed"].get(s)
                if rec is None or rec.get(metric) is None:
                    cells.append("–")
                    continue
                fg = " / ".join(
                    f"{100 * rec['iou'][c]:.2f}" if rec["iou"].get(c) is not None else "–" for c in classes
                )
                cells.append(f"{100 * rec[metric]:.2f}" + (f" ({fg})" if fg else ""))
            out.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _grid_files() -> list[Path]:
    return sorted(GRIDS.glob("*.yaml"))


def overview() -> str:
    """``generated/overview.md``: one line per grid, with its record count and the mean headline
    metric of every row (included by ``docs/results.md``)."""
    from semiseg.experiment.grid import fraction_label
    from semiseg.experiment.report import summarize

    out = [
        "| grid | dataset, labeled | rows: mean over seeds (seeds) | records |",
        "|---|---|---|---:|",
    ]
    for grid_file in _grid_files():
        raw = yaml.safe_load(grid_file.read_text()) or {}
        reports = ROOT / str(raw.get("reports") or f"runs/{raw.get('name', grid_file.stem)}")
        link = f"[{grid_file.stem}](generated/{grid_file.stem}.md)"
        records_file = reports / "records.json"
        if not records_file.is_file():
            out.append(f"| {link} | – | no records committed yet | 0 |")
            continue
        records = json.loads(records_file.read_text())
        blocks: dict[tuple, list[str]] = {}
        for row in summarize(records):
            metric = "mdice" if row.get("metric") == "mdice" else "miou"
            mean = 100 * row[metric][0]
            text = f"{row['method']} {mean:.2f} ({len(row['seeds'])})"
            blocks.setdefault((row["dataset"], row["fraction"]), []).append(text)
        for i, ((dataset, fraction), texts) in enumerate(blocks.items()):
            first = link if i == 0 else ""
            count = str(len(records)) if i == 0 else ""
            out.append(f"| {first} | {dataset} {fraction_label(fraction)} | {'; '.join(texts)} | {count} |")
    return "\n".join(out)


def on_pre_build(config, **kwargs) -> None:
    for grid_file in _grid_files():
        _write(OUT / f"{grid_file.stem}.md", grid_page(grid_file) + "\n")
    _write(OUT / "overview.md", overview() + "\n")


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    for grid_file in _grid_files():
        raw = yaml.safe_load(grid_file.read_text()) or {}
        reports = ROOT / str(raw.get("reports") or f"runs/{raw.get('name', grid_file.stem)}")
        for png in _figures(reports):
            files.append(
                File.generated(config, f"{FIGURES}/{grid_file.stem}/{png.name}", abs_src_path=str(png))
            )
    return files
