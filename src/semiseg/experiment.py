"""Grids of runs: datasets × labeled fractions × methods × seeds under one protocol.

A grid file (YAML)::

    name: table1_cpu_small
    protocol: protocols/cpu_small.yaml      # config files, relative to the grid file or built-in
    datasets: {chase_db1: datasets/chase_db1.yaml, covid_infnet: datasets/covid_infnet.yaml}
    fractions: [0.125, 0.25]
    methods: {supervised: methods/supervised.yaml, unimatch: methods/unimatch.yaml}
    seeds: [0, 1, 2]
    overrides: [train.iters=800]            # applied to every cell (optional)
    output: runs/grids/cpu_small            # one run directory per cell below it (grids may share it)
    reports: benchmarks/results/table1      # tables, records.json, figures (default: <output>/<name>)

Every cell is one ordinary run (``semiseg train``) in ``<output>/<dataset>/<fraction>/<method>/seed<k>``.
The grid is **cached and resumable**: a cell whose ``results.json`` carries the cell's config hash is
never re-run; a cell interrupted mid-way resumes from its ``latest.pt``; a cell whose config changed
is moved aside (``<dir>.stale-<old hash>``, never deleted) and re-run, leaving other cells alone.

Run directories hold checkpoints and are not meant to be committed, but the reports' ``records.json``
is. A cell whose run directory is gone (a fresh clone, another machine) but whose record in
``<reports>/records.json`` carries the cell's current config hash is **recorded**: it counts as done,
is not re-run, and its committed numbers go into the tables. Figures that need the run itself
(training curves, the qualitative grid) are then kept as they are rather than redrawn from fewer
runs. To re-run a recorded cell, delete its record (or the whole ``records.json``).

Several processes may work on one grid at once (``semiseg reproduce`` started N times, on one
machine or on machines sharing the output folder): each claims a cell with a lock file beside its
run directory (``.seed<k>.lock``, holding host and pid) before training it and skips cells another
live process holds. A lock left by a process that died is taken over on the same host; a lock
from another host is respected until deleted by hand.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoint import atomic_write_text, load_checkpoint
from .config import RunConfig, apply_overrides, build_config, config_hash, load_yaml_tree
from .errors import ConfigError, SemisegError

BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class Cell:
    dataset: str
    fraction: float | int
    method: str
    seed: int
    cfg: RunConfig
    run_dir: Path
    base: Cell | None = None  # the cell whose final weights this one starts from (grid `init_from`)

    @property
    def label(self) -> str:
        return f"{self.dataset} {fraction_label(self.fraction)} {self.method} seed {self.seed}"


@dataclass
class Grid:
    name: str
    path: Path
    protocol: str
    output: Path
    reports: Path  # tables, records.json and figures
    cells: list[Cell] = field(default_factory=list)
    baseline: str | None = None  # ablation tables: improvements are relative to this method
    rare_classes: dict[str, list[str]] = field(default_factory=dict)  # dataset -> classes for Table 2


def fraction_label(fraction: float | int) -> str:
    if isinstance(fraction, int):
        return f"{fraction}lab"
    inv = 1 / fraction
    return f"1-{round(inv)}" if abs(inv - round(inv)) < 1e-6 else f"{fraction:g}"


def _resolve(ref: str, grid_dir: Path) -> Path:
    for candidate in (grid_dir / ref, BUILTIN_CONFIGS / ref, Path(ref)):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{grid_dir}: grid refers to {ref!r}, which is neither beside it nor a built-in config")


def _named(value, key: str, path: Path) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {str(v): f"{key}/{v}.yaml" for v in value}
    raise ConfigError(f"{path}: '{key}' must be a list of names or a mapping name -> config file")


GRID_KEYS = {
    "name",
    "protocol",
    "datasets",
    "fractions",
    "methods",
    "seeds",
    "overrides",
    "output",
    "reports",
    "dataset_overrides",
    "init_from",
    "baseline",
    "rare_classes",
}


def load_grid(
    path: str | Path, output: str | Path | None = None, extra_overrides: list[str] | None = None
) -> Grid:
    """Read a grid file and build every cell's validated config (so a typo fails before any run)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: grid file not found")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown grid key {sorted(unknown)[0]!r} (known: {', '.join(sorted(GRID_KEYS))})"
        )
    for key in ("protocol", "datasets", "fractions", "methods", "seeds"):
        if key not in raw:
            raise ConfigError(f"{path}: grid needs '{key}'")
    grid_dir = path.parent
    name = str(raw.get("name", path.stem))
    protocol_file = _resolve(str(raw["protocol"]), grid_dir)
    datasets = _named(raw["datasets"], "datasets", path)
    methods = _named(raw["methods"], "methods", path)
    overrides = [*raw.get("overrides", []), *(extra_overrides or [])]
    per_dataset = raw.get("dataset_overrides", {}) or {}
    chain = raw.get("init_from", {}) or {}
    if not isinstance(chain, dict) or any(
        str(v) not in methods or str(k) not in methods for k, v in chain.items()
    ):
        raise ConfigError(f"{path}: 'init_from' must map grid methods to grid methods (method: base method)")
    out = Path(output or raw.get("output") or Path("runs") / name)
    grid = Grid(
        name,
        path,
        protocol_file.stem,
        out,
        Path(raw["reports"]) if raw.get("reports") else out / name,
        baseline=raw.get("baseline"),
        rare_classes=raw.get("rare_classes", {}) or {},
    )
    protocol_tree = load_yaml_tree(protocol_file)
    for ds_name, ds_ref in datasets.items():
        ds_tree = load_yaml_tree(_resolve(ds_ref, grid_dir))
        for fraction in raw["fractions"]:
            for m_name, m_ref in methods.items():
                m_tree = load_yaml_tree(_resolve(m_ref, grid_dir))
                for seed in raw["seeds"]:
                    tree = _merge_all(protocol_tree, ds_tree, m_tree)
                    run_dir = out / ds_name / fraction_label(fraction) / m_name / f"seed{seed}"
                    base_dir = (
                        out / ds_name / fraction_label(fraction) / str(chain.get(m_name)) / f"seed{seed}"
                    )
                    tree = apply_overrides(
                        tree,
                        [
                            f"data.labeled={fraction}",
                            f"seed={seed}",
                            f"name={name}-{ds_name}-{fraction_label(fraction)}-{m_name}-s{seed}",
                            *overrides,
                            *per_dataset.get(ds_name, []),
                            *([f"train.init_from={base_dir}"] if m_name in chain else []),
                        ],
                    )
                    try:
                        cfg = build_config(tree)
                    except ConfigError as exc:
                        raise ConfigError(
                            f"{path} [{ds_name} {fraction} {m_name} seed {seed}]: {exc}"
                        ) from None
                    grid.cells.append(Cell(ds_name, fraction, m_name, seed, cfg, run_dir))
    by_place = {(c.dataset, c.fraction, c.method, c.seed): c for c in grid.cells}
    for cell in grid.cells:
        if cell.method in chain:
            cell.base = by_place[(cell.dataset, cell.fraction, str(chain[cell.method]), cell.seed)]
            if cell.base.base is not None:
                raise ConfigError(
                    f"{path}: init_from chains one level only ({cell.method} -> {cell.base.method})"
                )
    return grid


def _merge_all(*trees: dict) -> dict:
    from .config import _deep_merge

    merged: dict = {}
    for tree in trees:
        merged = _deep_merge(merged, tree)
    return merged


def load_recorded(grid: Grid) -> dict[tuple, dict]:
    """The grid's committed records (``<reports>/records.json``) keyed like :func:`record_key`."""
    path = grid.reports / "records.json"
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
        keys = [_key(r["dataset"], r["fraction"], r["method"], r["seed"], r["config_hash"]) for r in records]
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise ConfigError(f"{path}: not a list of run records ({exc!r}); fix or delete it") from None
    return dict(zip(keys, records))


def _key(dataset: str, fraction: float | int, method: str, seed: int, digest: str) -> tuple:
    return dataset, fraction_label(fraction), method, int(seed), digest


def record_key(cell: Cell) -> tuple:
    """A cell's identity in ``records.json``: its place in the grid plus its config hash."""
    return _key(cell.dataset, cell.fraction, cell.method, cell.seed, config_hash(cell.cfg))


def _lock_path(cell: Cell) -> Path:
    return cell.run_dir.with_name(f".{cell.run_dir.name}.lock")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _me() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def lock_holder(cell: Cell) -> str | None:
    """``"host pid"`` of another live process training ``cell`` (None: free, held by this
    process, or its holder died on this host)."""
    try:
        holder = _lock_path(cell).read_text().strip()
    except FileNotFoundError:
        return None
    host, _, pid = holder.partition(" ")
    if holder == _me() or (host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))):
        return None
    return holder or "unknown holder"


def claim_cell(cell: Cell) -> bool:
    """Atomically take ``cell``'s lock for this process (False: another live process holds it)."""
    path = _lock_path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if lock_holder(cell) is not None:
                return False
            path.unlink(missing_ok=True)  # left by a process that died on this host
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(_me() + "\n")
        return True
    return False


def release_cell(cell: Cell) -> None:
    path = _lock_path(cell)
    try:
        if path.read_text().strip() == _me():
            path.unlink()
    except FileNotFoundError:
        pass


def cell_state(cell: Cell, recorded: dict[tuple, dict] | None = None) -> str:
    """``done`` (results for this exact config), ``running`` (locked by another live process),
    ``partial`` (resumable), ``stale``, ``new``, or ``recorded`` (no run directory, but
    ``recorded`` holds this exact config's numbers)."""
    want = config_hash(cell.cfg)
    results = cell.run_dir / "results.json"
    if results.is_file():
        try:
            have = json.loads(results.read_text()).get("config_hash")
        except json.JSONDecodeError:
            have = None
        if have == want:
            return "done"
    if lock_holder(cell) is not None:
        return "running"
    if results.is_file():
        return "stale"
    latest = cell.run_dir / "latest.pt"
    if latest.is_file():
        try:
            have = load_checkpoint(latest).get("config_hash")
        except SemisegError:
            have = None
        return "partial" if have == want else "stale"
    if cell.run_dir.exists() and any(cell.run_dir.iterdir()):
        return "stale"
    return "recorded" if recorded and record_key(cell) in recorded else "new"


FINISHED = ("done", "recorded")


def seed_major(cells: list[Cell], grid_order: list[Cell] | None = None) -> list[Cell]:
    """Cells in seed-major order: seed 0 of every fraction × dataset × method, then seed 1, ...

    An interrupted grid therefore always holds complete method comparisons for the seeds it
    finished. Within a seed the grid file's order is kept (fraction, dataset, method). Ranks come
    from ``grid_order`` (the whole grid; default ``cells``), so sorting a subset — the cells left
    to run — gives the same order as sorting the whole grid and dropping the finished ones."""
    reference = cells if grid_order is None else grid_order

    def rank(key) -> dict:
        return {v: i for i, v in enumerate(dict.fromkeys(key(c) for c in reference))}

    seed, fraction = rank(lambda c: c.seed), rank(lambda c: c.fraction)
    dataset, method = rank(lambda c: c.dataset), rank(lambda c: c.method)
    return sorted(
        cells, key=lambda c: (seed[c.seed], fraction[c.fraction], dataset[c.dataset], method[c.method])
    )


def run_grid(grid: Grid, dry_run: bool = False, log=print) -> None:
    """Run every cell that is not done yet, in order (``dry_run``: only list the cells' states).

    A chained cell (grid ``init_from``) starts only once its base cell is done in this output
    folder; a base known only from ``records.json`` is trained again for it. With several
    processes, one whose remaining cells all wait on bases running elsewhere polls every 30 s."""
    recorded = load_recorded(grid)
    states = {id(c): cell_state(c, recorded) for c in grid.cells}
    todo = seed_major([c for c in grid.cells if states[id(c)] not in FINISHED], grid.cells)
    done = len(grid.cells) - len(todo)
    from_records = sum(s == "recorded" for s in states.values())
    note = f" ({from_records} from {grid.reports / 'records.json'})" if from_records else ""
    elsewhere = sum(s == "running" for s in states.values())
    busy = f" ({elsewhere} running in other processes)" if elsewhere else ""
    log(
        f"grid {grid.name}: {len(grid.cells)} cells, {done} done{note}, {len(todo)} to run{busy} "
        f"-> {grid.output}"
    )
    finished = list(recorded.values()) + [
        {"dataset": c.dataset, "method": c.method, **json.loads((c.run_dir / "results.json").read_text())}
        for c in grid.cells
        if states[id(c)] == "done"
    ]
    if todo:
        log(f"  {eta_text(todo, finished)}")
    if dry_run:
        for c in seed_major(grid.cells):
            log(f"  [{states[id(c)]:8s}] {c.label}")
        return
    # A chained cell needs its base's run directory (its final weights), not just its record.
    needed = {id(c.base): c.base for c in todo if c.base is not None and states[id(c.base)] != "done"}
    todo = seed_major(list({id(c): c for c in [*needed.values(), *todo]}.values()), grid.cells)
    position = done
    while todo:
        deferred, progressed = [], False
        for cell in todo:
            if cell.base is not None and cell_state(cell.base) != "done":
                deferred.append(cell)  # its base is not trained yet (later in this pass, or elsewhere)
                continue
            position += 1
            progressed |= _run_cell(cell, recorded, id(cell) in needed, position, len(grid.cells), log)
        todo = [c for c in deferred if cell_state(c, recorded) not in FINISHED]
        if todo and not progressed:
            waiting = [c for c in todo if cell_state(c.base) == "running"]
            if not waiting:
                names = ", ".join(f"{c.label} (base: {c.base.method})" for c in todo)
                raise SemisegError(f"grid {grid.name}: cannot start {names}: the base runs did not finish")
            log(f"  waiting for {len(waiting)} base run(s) in other processes ...")
            time.sleep(30)


def _run_cell(cell: Cell, recorded: dict, rerun_recorded: bool, position: int, total: int, log) -> bool:
    """Claim, (re)start or resume one cell; False when another process has it or it is finished."""
    from .trainer import train

    if not claim_cell(cell):
        log(f"  skipping {cell.label}: running in another process")
        return False
    try:
        state = cell_state(cell, recorded)  # now that it is ours: another process may have finished it
        if state == "done" or (state == "recorded" and not rerun_recorded):
            log(f"  skipping {cell.label}: finished by another process")
            return False
        if state == "stale":
            old = cell.run_dir
            aside = old.with_name(f"{old.name}.stale-{int(time.time())}")
            old.rename(aside)
            log(f"  config changed for {cell.label}: previous run moved to {aside}")
        why = " (recorded; its weights are needed by a chained cell)" if state == "recorded" else ""
        log(f"[{position}/{total}] {'resuming' if state == 'partial' else 'running'} {cell.label}{why}")
        train(cell.cfg, cell.run_dir, resume=state == "partial")
        return True
    finally:
        release_cell(cell)


def eta_text(todo: list[Cell], finished: list[dict]) -> str:
    """Time left for ``todo`` in one process, from the durations (``seconds``) of finished runs of
    the same dataset and method; cells with no such run are counted, not guessed."""
    durations: dict[tuple, list[float]] = {}
    for record in finished:
        durations.setdefault((record["dataset"], record["method"]), []).append(record["seconds"])
    known = [statistics.mean(durations[key]) for c in todo if (key := (c.dataset, c.method)) in durations]
    unknown = len(todo) - len(known)
    if not known:
        return f"ETA unknown: no finished run of the same dataset and method timed yet ({unknown} cells)"
    text = f"ETA ≈ {sum(known) / 3600:.1f} h of one process for {len(known)} of {len(todo)} cells"
    text += " (mean duration of finished runs of the same dataset and method"
    return text + (f"; {unknown} without one)" if unknown else ")")


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
    from .trainer import json_safe

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
    from .figures import curves_figure, iou_bar_chart, pseudo_label_figure, qualitative_figure

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
