"""What enters a run's config hash is declared once, by field metadata: ``VOLATILE`` settings
(worker / thread counts, logging and checkpoint intervals, names) never change it, so resuming or
finishing a grid with other settings of those never re-runs a cell."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from helpers import tiny_overrides

import semiseg.config as config_module
from semiseg.config import (
    HASH_NEUTRAL,
    VOLATILE,
    HashedAs,
    RunConfig,
    apply_overrides,
    config_hash,
    hashed_tree,
    load_config,
    volatile,
)

#: Every volatile setting, with a value other than its default.
VOLATILE_CHANGES = {
    "name": "another-name",
    "run_dir": "somewhere/else",
    "data.num_workers": 3,
    "data.resize_crop_only": "true",
    "train.threads": 7,
    "train.log_every": 3,
    "train.ckpt_every": 9,
    "train.progress": "bar",
    "train.channels_last": "true",
    "train.compile": "true",
}


def volatile_keys(cls: type = RunConfig, prefix: str = "") -> set[str]:
    """Dotted keys of the fields marked VOLATILE, through the nested sections."""
    keys = set()
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if f.metadata.get(VOLATILE):
            keys.add(dotted)
        elif isinstance(f.type, str) and f.type.endswith("Config"):
            keys |= volatile_keys(getattr(config_module, f.type), f"{dotted}.")
    return keys


def test_volatile_settings_are_exactly_the_documented_ones():
    assert volatile_keys() == set(VOLATILE_CHANGES)


def test_no_volatile_setting_changes_the_hash_and_other_settings_do():
    base = load_config(None, ["method.name=unimatch"])
    for key, value in VOLATILE_CHANGES.items():
        changed = load_config(None, ["method.name=unimatch", f"{key}={value}"])
        assert config_hash(changed) == config_hash(base), key
    changed = load_config(None, ["method.name=unimatch", *(f"{k}={v}" for k, v in VOLATILE_CHANGES.items())])
    assert config_hash(changed) == config_hash(base)
    for key, value in {"train.eval_every": 5, "train.iters": 9, "data.batch_size": 3, "seed": 1}.items():
        changed = load_config(None, ["method.name=unimatch", f"{key}={value}"])
        assert config_hash(changed) != config_hash(base), key


def test_a_volatile_field_once_hashed_keeps_its_old_value_in_the_hash():
    """``data.num_workers`` was hashed before it was volatile (0 in every cached cell): it is
    hashed as that constant, so old hashes stay valid whatever the value now."""
    tree = hashed_tree(load_config(None, ["data.num_workers=4"]))
    assert tree["data"]["num_workers"] == 0
    assert "threads" not in tree["train"] and "name" not in tree and "run_dir" not in tree
    assert "eval_every" in tree["train"]  # what a run records (validation curve, best.pt) depends on it


def test_config_hash_holds_no_key_list():
    source = inspect.getsource(config_module.config_hash) + inspect.getsource(config_module._hash_view)
    for key in ("num_workers", "threads", "log_every", "ckpt_every", "progress", "run_dir"):
        assert f'"{key}"' not in source


def test_the_metadata_mechanism_works_for_any_dataclass():
    @dataclasses.dataclass
    class Inner:
        kept: int = 1
        noisy: int = volatile(5)
        legacy: int = volatile(2, hashed_as=2)
        later: str = dataclasses.field(default="old", metadata={HASH_NEUTRAL: True})

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        plugins: dict = dataclasses.field(default_factory=dict)

    obj = Outer(Inner(noisy=9, legacy=8), {"p": Inner(later="new")})
    assert hashed_tree(obj) == {
        "inner": {"kept": 1, "legacy": 2},
        "plugins": {"p": {"kept": 1, "legacy": 2, "later": "new"}},
    }
    assert HashedAs(0) == HashedAs(0)


# ----------------------------------------------------------------------------------------------
# Grids: another worker / thread count never re-runs a cell
# ----------------------------------------------------------------------------------------------


def write_grid(tmp_path):
    import yaml

    protocol = apply_overrides({"protocol": "tiny"}, tiny_overrides(iters=4))
    (tmp_path / "tiny_protocol.yaml").write_text(yaml.safe_dump(protocol))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: tiny\nprotocol: tiny_protocol.yaml\ndatasets: {synthetic: datasets/synthetic.yaml}\n"
        "fractions: [0.5]\nmethods: [supervised]\nseeds: [0]\n"
        f"output: {tmp_path / 'runs'}\nreports: {tmp_path / 'reports'}\n"
    )
    return grid


def test_resuming_or_finishing_a_grid_with_other_worker_counts_never_reruns_a_cell(tmp_path, monkeypatch):
    import semiseg.trainer as trainer_module
    from semiseg.experiment import cell_state, load_grid, run_grid

    grid_file = write_grid(tmp_path)
    (cell,) = load_grid(grid_file).cells

    # Interrupted after its step-2 checkpoint, under one worker count ...
    original_step = trainer_module.Trainer.train_step

    def interrupted(self, batch, info):
        if info.step == 3:
            raise KeyboardInterrupt
        return original_step(self, batch, info)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(load_grid(grid_file), log=lambda *_: None)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original_step)
    assert cell_state(cell) == "partial"

    # ... resumed (not restarted) with other worker, thread and logging settings ...
    other = ["train.threads=2", "data.num_workers=1", "train.log_every=2", "train.progress=log"]
    trained = []
    original_train = trainer_module.train

    def counting(cfg, run_dir=None, resume=False):
        trained.append(resume)
        return original_train(cfg, run_dir, resume)

    monkeypatch.setattr(trainer_module, "train", counting)
    regrid = load_grid(grid_file, extra_overrides=other)
    assert cell_state(regrid.cells[0]) == "partial"
    run_grid(regrid, log=lambda *_: None)
    assert trained == [True]
    assert json.loads((cell.run_dir / "results.json").read_text())["steps"] == 4

    # ... and finished: done under any of them.
    for overrides in ([], other, ["train.threads=1", "train.ckpt_every=1"]):
        assert cell_state(load_grid(grid_file, extra_overrides=overrides).cells[0]) == "done"
    run_grid(load_grid(grid_file, extra_overrides=["train.threads=1"]), log=lambda *_: None)
    assert trained == [True]
