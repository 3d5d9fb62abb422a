"""Noise budget: how far initialisation alone and the labeled-set draw move a method's test metric,
and the smallest paired difference that 3 and 5 seeds can detect.

    python benchmarks/noise_budget.py benchmarks/results/table1_cpu_small_recipe/records.json \\
        benchmarks/results/full_supervision_cpu_small/records.json --baseline supervised+cedice \\
        --out benchmarks/results/noise_budget_cpu_small

Records (``records.json`` of grids) are of two kinds:

* **init runs** share one labeled set and differ only in the training seed (initialisation,
  augmentation, batch order): records with a ``split_seed`` (the config's ``data.split_seed``; one
  labeled set per split seed), records of fully labeled runs (fraction 1.0: the seed cannot change
  the labeled set) and every record of a file given with ``--init``;
* **draw runs**, all the others: their seed draws the labeled set and initialises the network.

Per (dataset, method): the **init spread** is the pooled within-labeled-set sample std
``√(Σ_g (n_g − 1) s_g² / Σ_g (n_g − 1))`` over the init runs (a group: one fraction and labeled set),
the **draw spread** the same over the draw runs (a group: one fraction). The **minimum detectable
difference** of a two-sided paired t-test at 95 % with ``n`` seeds is
``MDD_n = t_{0.975, n−1} · sd_paired / √n``, the half-width of the paired t-interval: a smaller mean
paired difference is never significant (and one of that size is detected about half the time).
``sd_paired`` is the std of the paired differences against ``--baseline`` over the seeds (or labeled
set and seeds) both have, when there are at least two pairs; otherwise ``√2 · sd`` of the spread,
a conservative bound unless two methods' errors on one seed are negatively correlated.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import fmean

from common import load_records

from semiseg.experiment.stats import min_detectable_difference, pooled_sd, t_quantile

KINDS = ("init", "draw")
METRIC_NAMES = {"miou": "mIoU", "mdice": "mDice"}
MDD_FORMULA = (
    "t_{0.975,n-1} * sd_paired / sqrt(n): two-sided paired t-test at 95 %; sd_paired = std of the paired "
    "differences against the baseline, else sqrt(2) * spread"
)


def fraction_text(fraction: float | int) -> str:
    """``1/8`` for 0.125, ``1/1`` for every image, ``5 labeled`` for a count."""
    if isinstance(fraction, int):
        return f"{fraction} labeled"
    inverse = 1 / fraction
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{fraction:g}"


def labeled_set(record: dict, init_file: Path | None) -> tuple[str, str | None]:
    """``("init", labeled-set id)`` for a run whose labeled set does not depend on its seed, else
    ``("draw", None)``."""
    if record.get("split_seed") is not None:
        return "init", f"split seed {record['split_seed']}"
    fraction = record["fraction"]
    if isinstance(fraction, float) and fraction >= 1.0:
        return "init", "all labeled"
    if init_file is not None:
        return "init", f"one split ({init_file.name})"
    return "draw", None


def classify(files: list[tuple[Path, bool]], metric: str) -> list[dict]:
    """Every record with ``metric``, tagged with its kind and labeled set; one record per run."""
    seen: dict[tuple, dict] = {}
    for path, init in files:
        for record in load_records(path):
            value = record.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            kind, labels = labeled_set(record, path if init else None)
            key = (record["dataset"], record["fraction"], record["method"], record["seed"], kind, labels)
            seen.setdefault(key, {**record, "kind": kind, "labeled_set": labels, "value": value})
    return list(seen.values())


def _group_key(record: dict) -> tuple:
    return (record["fraction"], record["labeled_set"])


def spread(records: list[dict]) -> dict | None:
    """Pooled within-group std of one kind's runs (points), with what it was computed from."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault(_group_key(r), []).append(100 * r["value"])
    sd, df = pooled_sd(list(groups.values()))
    if df == 0:
        return None
    fractions = sorted({r["fraction"] for r in records})
    return {
        "sd": sd,
        "df": df,
        "runs": len(records),
        "groups": len(groups),
        "fractions": [fraction_text(f) for f in fractions],
        "mean": fmean(100 * r["value"] for r in records),
    }


def paired_sd(records: list[dict], base: list[dict]) -> tuple[float, int] | None:
    """Pooled std of the paired differences ``record − base`` (points) matched on fraction, labeled
    set and seed, groups by fraction and labeled set; None with fewer than two pairs in a group."""
    by_key = {(*_group_key(r), r["seed"]): 100 * r["value"] for r in base}
    groups: dict[tuple, list[float]] = {}
    for r in records:
        other = by_key.get((*_group_key(r), r["seed"]))
        if other is not None:
            groups.setdefault(_group_key(r), []).append(100 * r["value"] - other)
    sd, df = pooled_sd(list(groups.values()))
    return None if df == 0 else (sd, sum(len(g) for g in groups.values()))


def budget(records: list[dict], baseline: str | None, seeds: list[int]) -> list[dict]:
    """One row per (dataset, method): both spreads and, per kind, the MDD at each of ``seeds``."""
    cells: dict[tuple, dict[str, list[dict]]] = {}
    for r in records:
        cells.setdefault((r["dataset"], r["method"]), {k: [] for k in KINDS})[r["kind"]].append(r)
    rows = []
    for (dataset, method), by_kind in sorted(cells.items()):
        row: dict = {"dataset": dataset, "method": method}
        for kind in KINDS:
            row[kind] = spread(by_kind[kind])
            base = cells.get((dataset, baseline), {}).get(kind, []) if baseline and method != baseline else []
            paired = paired_sd(by_kind[kind], base) if base else None
            if paired is not None:
                sd, source = paired[0], f"paired vs {baseline}, {paired[1]} pairs"
            elif row[kind] is not None:
                sd, source = math.sqrt(2) * row[kind]["sd"], f"√2 · {row[kind]['sd']:.2f}"
            else:
                row[f"mdd_{kind}"] = None
                continue
            row[f"mdd_{kind}"] = {
                "sd_paired": sd,
                "source": source,
                **{f"n{n}": min_detectable_difference(sd, n) for n in seeds},
            }
        rows.append(row)
    return rows


def _spread_cell(s: dict | None) -> str:
    if s is None:
        return "–"
    sets = f", {s['groups']} groups" if s["groups"] > 1 else ""
    return f"{s['sd']:.2f} ({s['runs']} runs{sets}, {', '.join(s['fractions'])})"


def _mdd_cell(m: dict | None, seeds: list[int]) -> str:
    if m is None:
        return "–"
    return " / ".join(f"{m[f'n{n}']:.2f}" for n in seeds) + f" (sd {m['sd_paired']:.2f}: {m['source']})"


def markdown(rows: list[dict], metric: str, seeds: list[int], command: str) -> str:
    at = " / ".join(map(str, seeds))
    quantiles = ", ".join(f"t_{{0.975,{n - 1}}} = {t_quantile(0.975, n - 1):.3f}" for n in seeds)
    name = METRIC_NAMES.get(metric, metric)
    lines = [
        f"Noise budget of test {name} (points). Command: `{command}`",
        "",
        "Spread: pooled within-group sample std. **init**: runs sharing one labeled set (split seed "
        "fixed, or every image labeled), only initialisation and augmentation change; **draw**: the "
        "seed draws the labeled set too (the tables' protocol). MDD at n seeds: the smallest mean "
        f"paired difference a two-sided 95 % paired t-test over n seeds can call significant, "
        f"`t_{{0.975,n−1}} · sd_paired / √n` ({quantiles}); sd_paired from the paired differences "
        "against the baseline where both exist, else `√2 · sd` (a bound assuming the two methods' "
        "seed effects are not negatively correlated). A true difference of the MDD is detected "
        "about half the time.",
        "",
        f"| dataset | method | init spread | draw spread | MDD at {at} seeds (draw) "
        f"| MDD at {at} seeds (init) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['method']} | {_spread_cell(row['init'])} | "
            f"{_spread_cell(row['draw'])} | {_mdd_cell(row['mdd_draw'], seeds)} | "
            f"{_mdd_cell(row['mdd_init'], seeds)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="*", help="records.json files (init or draw by record)")
    parser.add_argument(
        "--init", type=Path, nargs="+", default=[], help="records.json files whose runs share one labeled set"
    )
    parser.add_argument("--baseline", help="method the paired differences are taken against")
    parser.add_argument("--metric", default="miou", help="record key of the metric (miou, mdice)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5], help="seed counts of the MDD")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not args.records and not args.init:
        parser.error("give at least one records.json file")
    if any(n < 2 for n in args.seeds):
        parser.error("--seeds: a paired t-interval needs at least 2 seeds")
    files = [(p, False) for p in args.records] + [(p, True) for p in args.init]
    records = classify(files, args.metric)
    rows = budget(records, args.baseline, args.seeds)
    if not any(row[kind] for row in rows for kind in KINDS):
        raise SystemExit(f"error: no (dataset, method) has two runs of one kind with '{args.metric}'")
    command = "python benchmarks/noise_budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, args.metric, args.seeds, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "command": command,
            "metric": args.metric,
            "seeds": args.seeds,
            "mdd": MDD_FORMULA,
            "rows": rows,
        }
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
