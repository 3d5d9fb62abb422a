"""Grids: loading a grid file into cells, each cell's state, and running the cells left.

See :mod:`semiseg.experiment` for the grid file and the caching rules; the lock files that let
several processes share a grid are :mod:`semiseg.experiment.locks`, the tables and figures
:mod:`semiseg.experiment.report`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import trainer
from ..checkpoint import load_checkpoint
from ..config import (
    BUILTIN_CONFIGS,
    RunConfig,
    _deep_merge,
    apply_overrides,
    build_config,
    config_hash,
    load_yaml_tree,
)
from ..errors import ConfigError, SemisegError
from .locks import claim_cell, lock_holder, release_cell


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
    # Table 1's paired intervals: every row against each of these methods (default: the baseline)
    compare: list[str] = field(default_factory=list)


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
    "fraction_methods",
    "compare",
    "method_seeds",
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
    only = _fraction_methods(raw.get("fraction_methods") or {}, raw["fractions"], methods, path)
    seeds_of = _method_seeds(raw.get("method_seeds") or {}, raw["seeds"], methods, path)
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
        compare=[str(m) for m in raw.get("compare", []) or []],
    )
    unknown_compare = [m for m in grid.compare if m not in methods]
    if unknown_compare:
        raise ConfigError(f"{path}: compare names unknown method {unknown_compare[0]!r}")
    protocol_tree = load_yaml_tree(protocol_file)
    for ds_name, ds_ref in datasets.items():
        ds_tree = load_yaml_tree(_resolve(ds_ref, grid_dir))
        for fraction in raw["fractions"]:
            for m_name, m_ref in methods.items():
                if fraction in only and m_name not in only[fraction]:
                    continue
                m_tree = load_yaml_tree(_resolve(m_ref, grid_dir))
                for seed in seeds_of.get(m_name, raw["seeds"]):
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


def _fraction_methods(raw, fractions: list, methods: dict[str, str], path: Path) -> dict:
    """``fraction_methods``: fraction -> the grid methods run at it (other fractions run them all)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'fraction_methods' must map fractions to lists of grid methods")
    only = {}
    for fraction, names in raw.items():
        if fraction not in fractions:
            raise ConfigError(f"{path}: fraction_methods names fraction {fraction!r}, not in 'fractions'")
        unknown = [n for n in names or [] if n not in methods]
        if unknown:
            raise ConfigError(f"{path}: fraction_methods[{fraction}] names unknown method {unknown[0]!r}")
        only[fraction] = set(names or [])
    return only


def _method_seeds(raw, seeds: list, methods: dict[str, str], path: Path) -> dict[str, list]:
    """``method_seeds``: grid method -> the seeds it runs (other methods run the grid's ``seeds``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'method_seeds' must map grid methods to lists of seeds")
    for name, chosen in raw.items():
        if name not in methods:
            raise ConfigError(f"{path}: method_seeds names unknown method {name!r}")
        if not isinstance(chosen, list) or not all(isinstance(s, int) for s in chosen):
            raise ConfigError(f"{path}: method_seeds[{name}] must be a list of integer seeds")
    return {str(name): list(chosen) for name, chosen in raw.items()}


def _merge_all(*trees: dict) -> dict:
    merged: dict = {}
    for tree in trees:
        merged = _deep_merge(merged, tree)
    return merged


def load_recorded(grid: Grid) -> dict[tuple, dict]:
    """The committed records keyed like :func:`record_key`: the grid's own ``<reports>/records.json``
    and those of the grid files beside it that write to the same output folder (a cell two grids
    share is one run directory, so a record either of them committed counts for both; the key holds
    the config hash, so a record only ever stands for the exact same config). The grid's own records
    win where both have one."""
    recorded: dict[tuple, dict] = {}
    for reports in [*sibling_reports(grid), grid.reports]:
        recorded.update(_read_records(reports / "records.json"))
    return recorded


def sibling_reports(grid: Grid) -> list[Path]:
    """Reports folders of the other grid files in ``grid``'s folder with the same ``output``."""
    folders = []
    for other in sorted(grid.path.parent.glob("*.yaml")):
        if other.resolve() == grid.path.resolve():
            continue
        try:
            raw = yaml.safe_load(other.read_text()) or {}
        except yaml.YAMLError:
            continue  # not ours to validate: it fails with its own message when it is run
        if not isinstance(raw, dict) or not raw.get("output") or not raw.get("reports"):
            continue
        if Path(str(raw["output"])) == grid.output and Path(str(raw["reports"])) != grid.reports:
            folders.append(Path(str(raw["reports"])))
    return folders


def _read_records(path: Path) -> dict[tuple, dict]:
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


def expected_seconds(finished: list[dict]) -> dict[tuple[str, str], float]:
    """Mean duration (``seconds``) of the finished runs of each (dataset, method)."""
    durations: dict[tuple[str, str], list[float]] = {}
    for record in finished:
        durations.setdefault((record["dataset"], record["method"]), []).append(record["seconds"])
    return {key: statistics.mean(values) for key, values in durations.items()}


def run_order(
    cells: list[Cell], grid_order: list[Cell], finished: list[dict], resuming: Sequence[Cell] = ()
) -> list[Cell]:
    """:func:`seed_major`, and within a seed the cells being resumed first, then the longest: by the
    mean duration of finished runs of the same dataset and method, a cell with none first (it may be
    the longest), ties in the grid file's order. With several workers the long cells then start early
    instead of finishing alone at the end; an interrupted grid still holds whole seeds."""
    expected = expected_seconds(finished)
    resumed = {id(c) for c in resuming}
    ordered = seed_major(cells, grid_order)
    seed_rank = {seed: i for i, seed in enumerate(dict.fromkeys(c.seed for c in ordered))}

    def rank(c: Cell) -> tuple:  # sorted() is stable: ties keep the seed-major (grid file) order
        return seed_rank[c.seed], id(c) not in resumed, -expected.get((c.dataset, c.method), float("inf"))

    return sorted(ordered, key=rank)


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
    files = [r / "records.json" for r in [grid.reports, *sibling_reports(grid)]]
    sources = ", ".join(str(f) for f in files if f.is_file())
    note = f" ({from_records} recorded in {sources})" if from_records else ""
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
    partial = [c for c in grid.cells if states[id(c)] == "partial"]
    if dry_run:
        for c in run_order(grid.cells, grid.cells, finished, partial):
            log(f"  [{states[id(c)]:8s}] {c.label}")
        return
    # A chained cell needs its base's run directory (its final weights), not just its record.
    needed = {id(c.base): c.base for c in todo if c.base is not None and states[id(c.base)] != "done"}
    cells = list({id(c): c for c in [*needed.values(), *todo]}.values())
    todo = run_order(cells, grid.cells, finished, partial)
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
        trainer.train(cell.cfg, cell.run_dir, resume=state == "partial")  # looked up now (tests patch it)
        return True
    finally:
        release_cell(cell)


def eta_text(todo: list[Cell], finished: list[dict]) -> str:
    """Time left for ``todo`` in one process, from the durations (``seconds``) of finished runs of
    the same dataset and method; cells with no such run are counted, not guessed."""
    expected = expected_seconds(finished)
    known = [expected[key] for c in todo if (key := (c.dataset, c.method)) in expected]
    unknown = len(todo) - len(known)
    if not known:
        return f"ETA unknown: no finished run of the same dataset and method timed yet ({unknown} cells)"
    text = f"ETA ≈ {sum(known) / 3600:.1f} h of one process for {len(known)} of {len(todo)} cells"
    text += " (mean duration of finished runs of the same dataset and method"
    return text + (f"; {unknown} without one)" if unknown else ")")
