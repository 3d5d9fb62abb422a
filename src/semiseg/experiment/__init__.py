"""Grids of runs: datasets × labeled fractions × methods × seeds under one protocol.

A grid file (YAML)::

    name: table1_cpu_small
    protocol: protocols/cpu_small.yaml      # config files, relative to the grid file or built-in
    datasets: {chase_db1: datasets/chase_db1.yaml, covid_infnet: datasets/covid_infnet.yaml}
    fractions: [0.125, 0.25]
    methods: {supervised: methods/supervised.yaml, unimatch: methods/unimatch.yaml}
    seeds: [0, 1, 2]
    overrides: [train.iters=800]            # applied to every cell (optional)
    fraction_methods: {0.25: [supervised]}  # optional: only these methods at that fraction
    method_seeds: {unimatch: [0, 1, 2, 3, 4]}  # optional: a method's own seeds (default: seeds)
    compare: [supervised, unimatch]         # optional: Table 1's paired intervals against these
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
runs. Grid files in one folder that write to the same ``output`` share cells, so the records of each
count for the others (matched by config hash). To re-run a recorded cell, delete its record (from
every grid that has it).

Several processes may work on one grid at once (``semiseg reproduce`` started N times, on one
machine or on machines sharing the output folder): each claims a cell with a lock file beside its
run directory (``.seed<k>.lock``, holding host and pid) before training it and skips cells another
live process holds. A lock left by a process that died is taken over on the same host; a lock
from another host is respected until deleted by hand.
"""

from ..config import BUILTIN_CONFIGS
from .grid import (
    FINISHED,
    GRID_KEYS,
    Cell,
    Grid,
    cell_state,
    eta_text,
    fraction_label,
    load_grid,
    load_recorded,
    record_key,
    run_grid,
    run_order,
    seed_major,
)
from .locks import claim_cell, lock_holder, release_cell
from .paired import paired_delta, paired_interval, paired_table_lines
from .report import (
    PER_IMAGE_RECORD_KEYS,
    SURFACE_RECORD_KEYS,
    collect_records,
    headline_metric,
    mean_std,
    rows_csv,
    summarize,
    surface_table_lines,
    table1_markdown,
    table2_markdown,
    write_reports,
)

__all__ = [
    "BUILTIN_CONFIGS",
    "FINISHED",
    "GRID_KEYS",
    "PER_IMAGE_RECORD_KEYS",
    "SURFACE_RECORD_KEYS",
    "Cell",
    "Grid",
    "cell_state",
    "claim_cell",
    "collect_records",
    "eta_text",
    "fraction_label",
    "headline_metric",
    "load_grid",
    "load_recorded",
    "lock_holder",
    "mean_std",
    "paired_delta",
    "paired_interval",
    "paired_table_lines",
    "record_key",
    "release_cell",
    "rows_csv",
    "run_grid",
    "run_order",
    "seed_major",
    "summarize",
    "surface_table_lines",
    "table1_markdown",
    "table2_markdown",
    "write_reports",
]
