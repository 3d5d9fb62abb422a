"""The grid runner: cached (a second run does nothing), resumable (an interrupted cell continues
from its checkpoint), invalidation per cell, and aggregation checked against the per-run JSON."""

import json
import statistics

import pytest
import yaml
from helpers import tiny_overrides

import semiseg.trainer as trainer_module
from semiseg.config import apply_overrides
from semiseg.experiment import (
    collect_records,
    load_grid,
    paired_delta,
    paired_interval,
    run_grid,
    run_order,
    seed_major,
    summarize,
    table1_markdown,
    table2_markdown,
    write_reports,
)


def write_grid(tmp_path, methods=("supervised", "fixmatch"), extra=""):
    """A grid of tiny synthetic runs: 1 dataset × 1 fraction × methods × 2 seeds."""
    protocol = apply_overrides({"protocol": "tiny"}, tiny_overrides(iters=4))
    (tmp_path / "tiny_protocol.yaml").write_text(yaml.safe_dump(protocol))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: tiny\nprotocol: tiny_protocol.yaml\ndatasets: {synthetic: datasets/synthetic.yaml}\n"
        f"fractions: [0.5]\nmethods: [{', '.join(methods)}]\nseeds: [0, 1]\n"
        f"overrides: [train.iters=4]\noutput: {tmp_path / 'runs'}\nreports: {tmp_path / 'reports'}\n" + extra
    )
    return grid


@pytest.fixture
def count_trains(monkeypatch):
    calls = []
    original = trainer_module.train

    def counting(cfg, run_dir=None, resume=False):
        calls.append((str(run_dir), resume))
        return original(cfg, run_dir, resume)

    monkeypatch.setattr(trainer_module, "train", counting)
    return calls


def test_grid_is_cached_resumable_and_aggregates_correctly(tmp_path, monkeypatch, count_trains):
    grid = load_grid(write_grid(tmp_path))
    assert len(grid.cells) == 4

    # Interrupt the third cell to run (seed-major order) after its step-2 checkpoint.
    original_step = trainer_module.Trainer.train_step
    target = seed_major(grid.cells)[2].run_dir

    def flaky(self, batch, info):
        if self.run_dir == target and info.step == 3:
            raise KeyboardInterrupt
        return original_step(self, batch, info)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, log=lambda *_: None)
    assert len(count_trains) == 3
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original_step)

    messages = []
    run_grid(load_grid(write_grid(tmp_path)), log=messages.append)
    assert count_trains[3] == (str(target), True)  # resumed, not restarted
    assert any("resuming" in m for m in messages)
    assert json.loads((target / "results.json").read_text())["steps"] == 4
    assert len(count_trains) == 5

    # A second run does nothing.
    run_grid(load_grid(write_grid(tmp_path)), log=lambda *_: None)
    assert len(count_trains) == 5

    # Aggregation: mean and sample std recomputed from each run's own results.json.
    grid = load_grid(write_grid(tmp_path))
    records = collect_records(grid)
    assert {r["method"] for r in records} == {"supervised", "fixmatch"} and len(records) == 4
    for row in summarize(records):
        per_run = [
            json.loads((c.run_dir / "results.json").read_text())["results"]["test"]
            for c in grid.cells
            if c.method == row["method"]
        ]
        mious = [r["miou"] for r in per_run]
        assert row["miou"][0] == pytest.approx(statistics.mean(mious))
        assert row["miou"][1] == pytest.approx(statistics.stdev(mious))
        vessel = [r["iou"]["vessel"] for r in per_run]
        assert row["iou"]["vessel"][0] == pytest.approx(statistics.mean(vessel))
    paths = write_reports(grid, records)
    table = paths["table1"].read_text()
    assert "| supervised | 0, 1 |" in table and "±" in table
    assert "different seeds" not in table  # both methods finished the same seeds
    figures = [path for key, path in paths.items() if key.split("_")[0] in ("curves", "qualitative", "bars")]
    assert len(figures) == 3 and all(p.read_bytes().startswith(b"\x89PNG") for p in figures)
    saved = json.loads(paths["records"].read_text())
    for record in saved:
        for key in ("dataset", "fraction", "method", "seed", "protocol", "miou", "iou", "steps", "seconds"):
            assert key in record


def test_changed_config_invalidates_only_its_cells(tmp_path, count_trains):
    run_grid(load_grid(write_grid(tmp_path, methods=("supervised",))), log=lambda *_: None)
    assert len(count_trains) == 2
    # Same grid plus a method: only the new cells run.
    run_grid(load_grid(write_grid(tmp_path, methods=("supervised", "fixmatch"))), log=lambda *_: None)
    assert len(count_trains) == 4
    # A changed override for every cell re-runs them, keeping the old runs aside.
    grid = load_grid(write_grid(tmp_path, methods=("supervised",)), extra_overrides=["optim.lr=0.02"])
    messages = []
    run_grid(grid, log=messages.append)
    assert len(count_trains) == 6
    assert sum("previous run moved" in m for m in messages) == 2
    assert len(list((tmp_path / "runs" / "synthetic" / "1-2" / "supervised").glob("seed0.stale-*"))) == 1


def test_committed_records_stand_in_for_deleted_runs(tmp_path, count_trains):
    """A fresh clone has the reports' records.json but no run directories: finished cells are not
    re-run, their committed numbers are reported, and run-based figures are kept, not redrawn."""
    import shutil

    run_grid(load_grid(write_grid(tmp_path)), log=lambda *_: None)
    grid = load_grid(write_grid(tmp_path))
    paths = write_reports(grid, collect_records(grid))
    before = json.loads(paths["records"].read_text())
    qualitative = paths["qualitative_synthetic_1-2"]
    figure_bytes = qualitative.read_bytes()
    assert len(count_trains) == 4

    seed0_fixmatch = next(c for c in grid.cells if c.method == "fixmatch" and c.seed == 0).run_dir
    shutil.rmtree(seed0_fixmatch)
    messages = []
    run_grid(load_grid(write_grid(tmp_path)), log=messages.append)
    assert len(count_trains) == 4  # nothing re-run
    assert "4 done (1 recorded in" in messages[0]
    run_grid(load_grid(write_grid(tmp_path)), dry_run=True, log=messages.append)
    assert sum("[recorded]" in m for m in messages) == 1

    grid = load_grid(write_grid(tmp_path))
    records = collect_records(grid)
    key = lambda r: (r["method"], r["seed"])  # noqa: E731
    assert sorted(records, key=key) == sorted(before, key=key)
    qualitative.write_bytes(b"committed figure")
    paths = write_reports(grid, records)
    assert "qualitative_synthetic_1-2" not in paths and qualitative.read_bytes() == b"committed figure"
    assert paths["bars_synthetic_1-2"].read_bytes().startswith(b"\x89PNG")
    assert figure_bytes.startswith(b"\x89PNG")

    # A changed config no longer matches the record: that cell (and only cells like it) re-runs.
    grid = load_grid(write_grid(tmp_path), extra_overrides=["optim.lr=0.02"])
    run_grid(grid, dry_run=True, log=messages.append)
    listing = messages[-4:]
    assert sum("[new     ]" in m for m in listing) == 1 and sum("[stale   ]" in m for m in listing) == 3


def test_records_of_a_grid_sharing_the_output_folder_count(tmp_path, count_trains):
    """Two grid files beside each other writing to one output folder share cells: a cell one of them
    committed is recorded for the other too (same config hash), so a fresh clone runs it once; a
    grid with another output folder does not borrow it."""
    import shutil

    first = load_grid(write_grid(tmp_path))
    run_grid(first, log=lambda *_: None)
    write_reports(first, collect_records(first))
    shutil.rmtree(tmp_path / "runs")
    second_file = tmp_path / "second.yaml"
    text = write_grid(tmp_path).read_text().replace("name: tiny", "name: second")
    reports = f"reports: {tmp_path / 'reports'}"
    second_file.write_text(text.replace(reports, f"reports: {tmp_path / 'second'}"))
    messages = []
    run_grid(load_grid(second_file), dry_run=True, log=messages.append)
    assert "4 done (4 recorded in" in messages[0]
    assert str(tmp_path / "reports" / "records.json") in messages[0]
    records = collect_records(load_grid(second_file))
    assert sorted((r["method"], r["seed"]) for r in records) == sorted(
        (c.method, c.seed) for c in first.cells
    )
    # Another output folder: nothing is shared (and nothing was trained by the dry runs).
    elsewhere = text.replace(f"output: {tmp_path / 'runs'}", f"output: {tmp_path / 'other_runs'}")
    second_file.write_text(elsewhere.replace(reports, f"reports: {tmp_path / 'o'}"))
    run_grid(load_grid(second_file), dry_run=True, log=messages.append)
    assert sum("[new     ]" in m for m in messages[-4:]) == 4
    assert len(count_trains) == 4


def test_processes_sharing_a_grid_skip_cells_another_live_process_holds(tmp_path, count_trains):
    """Two workers on one grid never train the same cell; a lock whose process died is taken over."""
    import socket
    import subprocess
    import sys

    from semiseg.experiment import cell_state, claim_cell

    grid = load_grid(write_grid(tmp_path, methods=("supervised",)))
    held, orphaned = grid.cells
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for cell, proc in ((held, holder), (orphaned, dead)):
            lock = cell.run_dir.with_name(f".{cell.run_dir.name}.lock")
            lock.parent.mkdir(parents=True, exist_ok=True)
            lock.write_text(f"{socket.gethostname()} {proc.pid}\n")
        assert cell_state(held) == "running" and cell_state(orphaned) == "new"
        assert not claim_cell(held)
        messages = []
        run_grid(load_grid(write_grid(tmp_path, methods=("supervised",))), log=messages.append)
        assert count_trains == [(str(orphaned.run_dir), False)]
        assert "1 running in other processes" in messages[0]
        assert any("skipping" in m and "seed 0" in m for m in messages)
        assert not orphaned.run_dir.with_name(f".{orphaned.run_dir.name}.lock").exists()  # released
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its cell is free again and runs.
    run_grid(load_grid(write_grid(tmp_path, methods=("supervised",))), log=lambda *_: None)
    assert [run for run, _ in count_trains] == [str(orphaned.run_dir), str(held.run_dir)]


def test_a_cell_finished_by_another_process_meanwhile_is_not_run_again(tmp_path, monkeypatch):
    grid = load_grid(write_grid(tmp_path, methods=("supervised",)))
    first, second = grid.cells
    original = trainer_module.train
    trained = []

    def train_and_meanwhile_the_other_worker_finishes_second(cfg, run_dir=None, resume=False):
        trained.append(str(run_dir))
        result = original(cfg, run_dir, resume)
        if str(run_dir) == str(first.run_dir):
            original(second.cfg, second.run_dir)  # "another process", not through the grid
        return result

    monkeypatch.setattr(trainer_module, "train", train_and_meanwhile_the_other_worker_finishes_second)
    messages = []
    run_grid(grid, log=messages.append)
    assert trained == [str(first.run_dir)]
    assert any("finished by another process" in m for m in messages)


def test_workers_share_a_grid_and_train_each_cell_once(tmp_path, capsys):
    from semiseg.cli import main

    grid_file = write_grid(tmp_path)
    assert main(["reproduce", str(grid_file), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    started = [line for line in out.splitlines() if "] running synthetic" in line]
    assert len(started) == 4 and {line.split()[0] for line in started} <= {"[w1]", "[w2]"}
    assert len({line.split("running ")[1].split(" (")[0] for line in started}) == 4  # 4 distinct cells
    runs = tmp_path / "runs"
    assert len(list(runs.rglob("results.json"))) == 4
    assert not list(runs.rglob("*.lock")) and not list(runs.rglob("*.stale-*"))
    assert len(json.loads((tmp_path / "reports" / "records.json").read_text())) == 4
    # Nothing left: a second run with workers trains nothing.
    assert main(["reproduce", str(grid_file), "--workers", "2", "--no-report"]) == 0
    assert "] running synthetic" not in capsys.readouterr().out
    assert main(["reproduce", str(grid_file), "--workers", "0"]) == 2
    assert "--workers 0: must be at least 1" in capsys.readouterr().err


def test_reproduce_takes_a_grid_path_or_a_bare_name_under_benchmarks_grids(tmp_path, capsys, monkeypatch):
    """``semiseg reproduce`` reads a grid file by path, or a bare name as ./benchmarks/grids/<name>.yaml;
    anything else (a missing file, the package's old ``grids/<name>``) is a one-line error."""
    from helpers import expect_error

    from semiseg.cli import main

    grids = tmp_path / "benchmarks" / "grids"
    grids.mkdir(parents=True)
    grid_file = write_grid(tmp_path).rename(grids / "tiny.yaml")
    (tmp_path / "tiny_protocol.yaml").rename(grids / "tiny_protocol.yaml")  # found beside the grid
    monkeypatch.chdir(tmp_path)
    for name in (str(grid_file), "benchmarks/grids/tiny.yaml", "tiny", "tiny.yaml"):
        assert main(["reproduce", name, "--dry-run"]) == 0, name
        assert "grid tiny: 4 cells" in capsys.readouterr().out, name
    expect_error(capsys, ["reproduce", "nope"], "nope: grid not found", "benchmarks/grids/nope.yaml")
    expect_error(capsys, ["reproduce", "some/where.yaml"], "some/where.yaml: grid file not found")
    expect_error(capsys, ["reproduce", "grids/table1_cpu_small"], "benchmarks/grids/table1_cpu_small.yaml")


def test_eta_uses_durations_of_finished_runs_of_the_same_dataset_and_method():
    from types import SimpleNamespace

    from semiseg.experiment import eta_text

    finished = [
        {"dataset": "d", "method": "m", "seconds": 1800.0},
        {"dataset": "d", "method": "m", "seconds": 5400.0},  # mean 1 h
        {"dataset": "e", "method": "m", "seconds": 99999.0},  # other dataset: not used
    ]
    todo = [SimpleNamespace(dataset="d", method="m")] * 3 + [SimpleNamespace(dataset="d", method="x")]
    assert eta_text(todo, finished).startswith("ETA ≈ 3.0 h of one process for 3 of 4 cells")
    assert eta_text(todo, finished).endswith("; 1 without one)")


def test_unreadable_records_file_is_a_clear_error(tmp_path):
    from semiseg.errors import ConfigError

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "records.json").write_text('[{"method": "supervised"}]')
    with pytest.raises(ConfigError, match="records.json: not a list of run records"):
        run_grid(load_grid(write_grid(tmp_path)), dry_run=True, log=lambda *_: None)


def _record(method: str, seed: int, miou: float, rare: float) -> dict:
    return {"dataset": "d", "fraction": 0.125, "method": method, "seed": seed, "miou": miou,
            "iou": {"bg": 0.9, "rare": rare}, "seconds": 1.0}  # fmt: skip


def test_table2_reports_improvement_over_baseline():
    rows = summarize([_record("base", 0, 0.5, 0.1), _record("ours", 0, 0.6, 0.3)])
    text = table2_markdown(rows, "base", {"d": ["rare"]}, "caption")
    assert "| ours | 30.00 (+20.00) | 60.00 (+10.00) |" in text
    assert "| base | 10.00 | 50.00 |" in text
    assert "different seeds" not in text
    # A grid in progress: the baseline has a second seed; Δ stays paired on seed 0 and says so.
    rows = summarize(
        [_record("base", 0, 0.5, 0.1), _record("base", 1, 0.7, 0.5), _record("ours", 0, 0.6, 0.3)]
    )
    text = table2_markdown(rows, "base", {"d": ["rare"]}, "c")
    assert "| ours | 30.00 (+20.00, seed 0) | 60.00 (+10.00, seed 0) |" in text  # not 30 − mean(10, 50)
    assert "| base | 30.00 | 60.00 |" in text
    for report in (text, table1_markdown(rows, "c")):
        assert "*Methods averaged over different seeds (base: 0, 1; ours: 0)" in report


def test_paired_delta_equals_difference_of_means_on_equal_seeds():
    recs = [_record("base", s, 0.5 + 0.1 * s, 0.1 * s) for s in range(3)]
    recs += [_record("ours", s, 0.4 + 0.3 * s, 0.2 + 0.05 * s) for s in range(3)]
    base, ours = summarize(recs)
    diff, seeds = paired_delta(ours, base, "rare")
    assert seeds == [0, 1, 2]
    assert diff == pytest.approx(ours["iou"]["rare"][0] - base["iou"]["rare"][0])
    diff, _ = paired_delta(ours, base, None)
    assert diff == pytest.approx(ours["miou"][0] - base["miou"][0])


def test_only_selects_cells(tmp_path):
    from semiseg.cli import select_cells
    from semiseg.errors import SemisegError

    grid = load_grid(write_grid(tmp_path))
    subset = select_cells(grid, ["method=fixmatch", "seed=1"])
    assert [(c.method, c.seed) for c in subset.cells] == [("fixmatch", 1)]
    assert len(grid.cells) == 4  # the full grid is untouched (reports aggregate every finished cell)
    with pytest.raises(SemisegError, match="matches no cell"):
        select_cells(grid, ["method=nope"])
    with pytest.raises(SemisegError, match="KEY=VALUE"):
        select_cells(grid, ["colour=red"])


def test_cells_run_seed_major(tmp_path, count_trains):
    """All methods of seed 0 run before any cell of seed 1, so a partial grid compares methods."""
    run_grid(load_grid(write_grid(tmp_path)), log=lambda *_: None)
    order = [(run_dir.split("/")[-2], run_dir.split("/")[-1]) for run_dir, _ in count_trains]
    assert order == [
        ("supervised", "seed0"),
        ("fixmatch", "seed0"),
        ("supervised", "seed1"),
        ("fixmatch", "seed1"),
    ]


def test_seed_major_order_of_the_cells_left_follows_the_whole_grid(tmp_path):
    """Regression: when seed 0 of the first method is finished, the cells left must still start
    with seed 0 (ranking seeds by their order in the to-do subset put seed 0 last)."""
    grid = load_grid(write_grid(tmp_path))
    left = [c for c in grid.cells if (c.method, c.seed) != ("supervised", 0)]
    order = [(c.method, c.seed) for c in seed_major(left, grid.cells)]
    assert order == [("fixmatch", 0), ("supervised", 1), ("fixmatch", 1)]


def test_within_a_seed_the_longest_cells_run_first(tmp_path):
    """Expected durations (finished runs of the same dataset and method) order the cells of a seed,
    longest first, a cell with no timed run before all, a cell being resumed before those; seeds stay
    in order."""
    grid = load_grid(write_grid(tmp_path, methods=("supervised", "fixmatch", "unimatch")))
    timed = [
        {"dataset": "synthetic", "method": "supervised", "seconds": 10.0},
        {"dataset": "synthetic", "method": "fixmatch", "seconds": 30.0},
        {"dataset": "synthetic", "method": "fixmatch", "seconds": 50.0},
    ]
    order = [(c.method, c.seed) for c in run_order(grid.cells, grid.cells, timed)]
    assert order == [
        ("unimatch", 0),
        ("fixmatch", 0),
        ("supervised", 0),
        ("unimatch", 1),
        ("fixmatch", 1),
        ("supervised", 1),
    ]
    untimed = [(c.method, c.seed) for c in run_order(grid.cells, grid.cells, [])]
    assert untimed == [(c.method, c.seed) for c in seed_major(grid.cells)]
    resumed = [c for c in grid.cells if (c.method, c.seed) == ("supervised", 1)]
    again = [(c.method, c.seed) for c in run_order(grid.cells, grid.cells, timed, resumed)]
    assert again[3:] == [("supervised", 1), ("unimatch", 1), ("fixmatch", 1)]  # resumed first


def test_chained_cells_start_from_their_base_runs(tmp_path, count_trains):
    """Grid ``init_from``: the fixmatch cell starts from the same seed's supervised weights, runs after
    it, and a base known only from records.json is trained again when a chained cell needs it."""
    import shutil

    import torch

    from semiseg.trainer import load_trained_model

    path = write_grid(tmp_path, extra="init_from: {fixmatch: supervised}\n")
    grid = load_grid(path)
    chained = [c for c in grid.cells if c.method == "fixmatch"]
    assert all(
        c.base is not None and c.base.method == "supervised" and c.base.seed == c.seed for c in chained
    )
    assert all(c.cfg.train.init_from == str(c.base.run_dir) for c in chained)
    run_grid(grid, log=lambda *_: None)
    order = [run for run, _ in count_trains]
    for c in chained:
        assert order.index(str(c.base.run_dir)) < order.index(str(c.run_dir))
    reported = load_grid(path)
    write_reports(reported, collect_records(reported))
    # Fresh clone: the supervised seed-0 run directory is gone, its record stays, fixmatch seed 0 has
    # neither: the base is trained again (same config: same weights) before the chained cell.
    base0 = next(c for c in grid.cells if c.method == "supervised" and c.seed == 0)
    _, before, _ = load_trained_model(base0.run_dir / "latest.pt")
    shutil.rmtree(base0.run_dir)
    shutil.rmtree(next(c for c in chained if c.seed == 0).run_dir)
    records_path = tmp_path / "reports" / "records.json"
    kept = [r for r in json.loads(records_path.read_text()) if (r["method"], r["seed"]) != ("fixmatch", 0)]
    records_path.write_text(json.dumps(kept))
    count_trains.clear()
    run_grid(load_grid(path), log=lambda *_: None)
    assert [run for run, _ in count_trains] == [str(base0.run_dir), str(chained[0].run_dir)]
    _, after, _ = load_trained_model(base0.run_dir / "latest.pt")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_bad_init_from_grid_key_is_one_line(tmp_path):
    from semiseg.errors import ConfigError

    with pytest.raises(ConfigError, match="init_from"):
        load_grid(write_grid(tmp_path, extra="init_from: {fixmatch: unimatch}\n"))


def _fake_results(cell, test: dict) -> None:
    """A finished cell's ``results.json`` without training it (the cell's own config hash)."""
    from semiseg.config import config_hash

    cell.run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"results": {"test": test}, "steps": 4, "seconds": 1.0, "config_hash": config_hash(cell.cfg)}
    (cell.run_dir / "results.json").write_text(json.dumps(payload))


def test_records_carry_per_image_results_and_the_split_seed(tmp_path):
    """Per-image counts, the evaluation unit and mDice reach the records; so does ``data.split_seed``
    when the config sets it, and the table gets a bootstrap interval from them."""
    grid = load_grid(write_grid(tmp_path), extra_overrides=["data.split_seed=7"])
    for cell in grid.cells:
        shift = 5 * (cell.method == "fixmatch") + cell.seed
        per_image = [
            {
                "name": f"v{i}",
                "tp": [90, 40 + shift + i],
                "fp": [10, 10],
                "fn": [10, 10 - i],
                "dice": [None, 0.5],
            }
            for i in range(3)
        ]
        test = {"miou": 0.6 + 0.01 * shift, "iou": {"background": 0.8, "vessel": 0.4}, "mdice": 0.5,
                "evaluation": "volume", "per_image": per_image, "confusion": [[1]]}  # fmt: skip
        _fake_results(cell, test)
    records = collect_records(grid)
    assert len(records) == 4
    for record in records:
        assert record["split_seed"] == 7 and record["evaluation"] == "volume" and record["mdice"] == 0.5
        assert record["per_image"][0]["name"] == "v0" and "confusion" not in record
    table = write_reports(grid, records, figures=False)["table1"].read_text()
    assert "| fixmatch − supervised | mDice | 0, 1 | +0.00 |" in table  # the records' own metric
    rows = summarize(records)
    result = paired_interval(rows[1], rows[0], "miou")
    assert result["mean"] == pytest.approx(0.05) and result["bootstrap"] is not None
    assert result["bootstrap"][0] > 0 and result["verdict"] == "higher"

    (tmp_path / "plain").mkdir()
    plain = load_grid(write_grid(tmp_path / "plain"))
    for cell in plain.cells:
        _fake_results(cell, {"miou": 0.6, "iou": {"background": 0.8, "vessel": 0.4}})
    records = collect_records(plain)
    assert all("split_seed" not in r and "per_image" not in r for r in records)
    table = write_reports(plain, records, figures=False)["table1"].read_text()
    assert "n/a (records without per-image results)" in table


def test_fraction_methods_restrict_cells_and_compare_names_grid_methods(tmp_path):
    from semiseg.errors import ConfigError

    grid_file = write_grid(tmp_path, extra="compare: [supervised]\n")
    text = grid_file.read_text().replace("fractions: [0.5]", "fractions: [0.5, 1.0]")
    grid_file.write_text(text + "fraction_methods: {1.0: [supervised]}\n")
    grid = load_grid(grid_file)
    assert sorted({(c.fraction, c.method) for c in grid.cells}) == [
        (0.5, "fixmatch"),
        (0.5, "supervised"),
        (1.0, "supervised"),
    ]
    assert grid.compare == ["supervised"]
    (tmp_path / "seeds").mkdir()
    per_method = load_grid(write_grid(tmp_path / "seeds", extra="method_seeds: {fixmatch: [1]}\n"))
    assert sorted((c.method, c.seed) for c in per_method.cells) == [
        ("fixmatch", 1),
        ("supervised", 0),
        ("supervised", 1),
    ]
    for number, (bad, match) in enumerate(
        (
            ("fraction_methods: {0.25: [supervised]}\n", "not in 'fractions'"),
            ("fraction_methods: {0.5: [nope]}\n", "unknown method 'nope'"),
            ("compare: [nope]\n", "compare names unknown method"),
            ("method_seeds: {nope: [0]}\n", "method_seeds names unknown method 'nope'"),
            ("method_seeds: {fixmatch: 0}\n", "must be a list of integer seeds"),
        ),
    ):
        folder = tmp_path / f"bad{number}"
        folder.mkdir()
        with pytest.raises(ConfigError, match=match):
            load_grid(write_grid(folder, extra=bad))


def test_volume_records_table_shows_foreground_dice_and_empty_predictions():
    def record(method, seed, rv):
        return {
            "dataset": "acdc",
            "fraction": 3,
            "method": method,
            "seed": seed,
            "miou": 0.5,
            "iou": {"background": 0.9, "RV": 0.2, "LV": 0.4},
            "dice": {"background": None, "RV": rv, "LV": 0.6},
            "mdice": (rv + 0.6) / 2,
            "evaluation": "volume",
            "hd95": {"background": None, "RV": 10.0, "LV": 20.0},
            "mhd95": 15.0,
            "surface_counts": {"RV": {"images": 4, "one_empty": seed}, "LV": {"images": 4, "one_empty": 0}},
            "volume_counts": {
                "RV": {"volumes": 4, "empty_prediction": seed, "empty_reference": 0},
                "LV": {"volumes": 4, "empty_prediction": 0, "empty_reference": 0},
            },
            "seconds": 1.0,
            "weights": "final",
        }

    rows = summarize([record("sup", s, 0.3 + 0.1 * s) for s in range(2)])
    text = table1_markdown(rows, "caption")
    assert "| method | seeds | RV | LV | mIoU | mDice |" in text  # foreground Dice, no background column
    assert "| sup | 0, 1 | 35.00 ± 7.07 | 60.00 ± 0.00 |" in text
    assert "voxels" in text and "sup: RV 1" in text
