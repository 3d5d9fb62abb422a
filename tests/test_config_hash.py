"""What enters a run's config hash is decided in one module (``semiseg.config_hashing``):
``VOLATILE`` settings (worker / thread counts, logging and checkpoint intervals, names) never change
it, and the versioned ``MIGRATIONS`` keep every earlier record's hash valid while new options at
their no-op values leave it alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import tiny_overrides

import semiseg.config_hashing as hashing
from semiseg.config import (
    FLAT_MODEL_DEFAULTS,
    MIGRATIONS,
    PINNED,
    SCHEMA_VERSION,
    VOLATILE,
    Added,
    Moved,
    Split,
    apply_overrides,
    build_config,
    config_hash,
    hashed_tree,
    load_config,
    version_one_view,
)
from semiseg.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src" / "semiseg"

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


def test_volatile_settings_are_exactly_the_documented_ones():
    assert (set(VOLATILE) | set(PINNED)) - {"plugins.sufd.fused"} == set(VOLATILE_CHANGES)


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
    sufd = ["method.name=unimatch", "plugins.sufd.lambda_adv=0.1"]
    fused = load_config(None, [*sufd, "plugins.sufd.fused=true"])
    assert config_hash(fused) == config_hash(load_config(None, sufd))


def test_a_volatile_field_once_hashed_keeps_its_old_value_in_the_hash():
    """``data.num_workers`` was hashed before it was volatile (0 in every cached cell): it is
    hashed as that constant, so old hashes stay valid whatever the value now."""
    tree = hashed_tree(load_config(None, ["data.num_workers=4"]))
    assert tree["data"]["num_workers"] == 0
    assert "threads" not in tree["train"] and "name" not in tree and "run_dir" not in tree
    assert "eval_every" in tree["train"]  # what a run records (validation curve, best.pt) depends on it


def test_no_config_class_carries_hash_markers():
    """The rules live in config_hashing only: no field metadata or helper elsewhere decides them."""
    for path in SRC.rglob("*.py"):
        if path.name == "config_hashing.py":
            continue
        text = path.read_text()
        assert not re.search(r"HASH_NEUTRAL|HashedAs|volatile\(", text), path


def test_migrations_are_ordered_and_versioned():
    versions = [m.version for m in MIGRATIONS]
    assert versions == sorted(versions) and min(versions) >= 2 and max(versions) == SCHEMA_VERSION
    paths = [(m.path, getattr(m, "method", None), getattr(m, "other_than", ())) for m in MIGRATIONS]
    assert len(paths) == len(set(paths))


#: For each option a migration added: the overrides that make a config holding it, and a value
#: other than its no-op one.
ADDED_OPTIONS = {
    "data.size": ([], "[32, 32]"),
    "data.mask_values": ([], "{vessel: 255}"),
    "model.backbone_widths": (["model.name=guidedmix"], "[8, 8, 8, 8]"),
    "model.psp_bins": (["model.name=guidedmix"], "[1, 2]"),
    "model.psp_channels": (["model.name=guidedmix"], "64"),
    "model.decoder_channels": (["model.name=guidedmix"], "[8, 8, 8, 8, 8]"),
    "model.mitrans": (["model.name=guidedmix"], "false"),
    "model.mitrans_levels": (["model.name=guidedmix"], "[0]"),
    "model.mitrans_zero_init": (["model.name=guidedmix"], "true"),
    "train.init_from": ([], "runs/base"),
    "eval.surface_metrics": ([], "false"),
    "eval.unit": ([], "image"),
    "eval.ema": ([], "true"),
    "eval.ema_decay": ([], "0.9"),
    "eval.ema_start": ([], "5"),
    "eval.ema_warmup": ([], "false"),
    "eval.ema_bn_batches": ([], "3"),
    "method.dice_squared": (["method.name=supervised"], "true"),
    "method.pseudo": (["method.name=unimatch"], "{mask: freematch}"),
    "method.warmup_iters": (["method.name=unimatch"], "5"),
    "method.rampup_iters": (["method.name=unimatch"], "5"),
    "method.labeled_weight": (["method.name=unimatch"], "2.0"),
    "method.unlabeled_loss": (["method.name=unimatch"], "dice"),
    "method.diagnostics": (["method.name=unimatch"], "false"),
    "method.supmix_source": (["method.name=unimatch", "method.mix=supmix"], "strong"),
    "method.teacher": (["method.name=unimatch"], "ema"),
    "method.teacher_decay": (["method.name=unimatch"], "0.9"),
    "method.unmix": (["method.name=guidedmix", "model.name=guidedmix"], "true"),
    "plugins.sufd.input_scale": (["method.name=unimatch", "plugins.sufd.lambda_adv=0.1"], "0.5"),
    "plugins.mpmc.lambda_s": (["method.name=unimatch", "plugins.mpmc.beta=0.25"], "presence"),
}


def test_every_added_option_is_listed_here():
    assert {m.path for m in MIGRATIONS if isinstance(m, Added)} == set(ADDED_OPTIONS)


@pytest.mark.parametrize("path", sorted(ADDED_OPTIONS))
def test_an_added_option_at_its_no_op_value_leaves_the_hash_alone(path):
    place, other = ADDED_OPTIONS[path]
    base = load_config(None, place)
    parent, key = hashing._parent(hashed_tree(base), path)
    assert parent is not None and key not in parent, "at its no-op value the option is left out"
    key = {"method.supmix_source": "method.mixer.source"}.get(path, path)  # its place since version 3
    changed = load_config(None, [*place, f"{key}={other}"])
    parent, key = hashing._parent(hashed_tree(changed), path)
    assert parent is not None and key in parent and config_hash(changed) != config_hash(base)


def test_an_option_whose_no_op_value_differs_between_methods():
    """``method.dice_squared``: BCP's runs always had it on, the other methods' off."""
    bcp = load_config(None, ["method.name=bcp"])
    assert "dice_squared" not in hashed_tree(bcp)["method"]
    off = load_config(None, ["method.name=bcp", "method.dice_squared=false"])
    assert hashed_tree(off)["method"]["dice_squared"] is False


def test_the_migration_mechanism_on_plain_trees():
    tree = {
        "method": {"name": "m", "new": 1, "opt": {"p": 0.5}},
        "name": "x",
        "train": {"threads": 4, "iters": 3},
        "data": {"num_workers": 8},
    }
    migrations = (
        Added(2, "method.new", 1),
        Added(2, "method.absent", 0),
        Added(3, "method.new", 1, method="other"),
        Moved(3, "method.opt", lambda section, parent: {f"opt_{k}": v for k, v in section.items()}),
    )
    original = hashing.MIGRATIONS
    try:
        hashing.MIGRATIONS = migrations
        view = version_one_view(tree)
    finally:
        hashing.MIGRATIONS = original
    assert view == {"method": {"name": "m", "opt_p": 0.5}, "train": {"iters": 3}, "data": {"num_workers": 0}}
    assert tree["method"]["opt"] == {"p": 0.5} and tree["name"] == "x", "the input is not modified"
    assert Added(2, "method.new", 1, other_than=("m",)).undo(tree) is None and tree["method"]["new"] == 1


def test_a_split_section_is_flattened_onto_its_old_defaults_on_plain_trees():
    """``Split``: the section of the chosen choice, every other old key at its frozen old default;
    the ``Added`` entries of older versions then apply to that flat view."""
    old = {"name": "a", "a_opt": 1, "b_opt": [1, 2], "b_new": 0}
    migrations = (
        Added(2, "model.b_new", 0),
        Split(3, "model", lambda tree: {**old, "a_opt": tree.get("protocol", 1)}),
    )
    original = hashing.MIGRATIONS
    try:
        hashing.MIGRATIONS = migrations
        plain = version_one_view({"model": {"name": "b", "b_opt": [3]}})
        labelled = version_one_view({"protocol": 7, "model": {"name": "b", "b_new": 5}})
        absent = version_one_view({"data": {}})
    finally:
        hashing.MIGRATIONS = original
    assert plain == {"model": {"name": "b", "a_opt": 1, "b_opt": [3]}}
    assert labelled == {"protocol": 7, "model": {"name": "b", "a_opt": 7, "b_opt": [1, 2], "b_new": 5}}
    assert absent == {"data": {}}


def test_each_model_hashes_as_the_flat_section_of_version_two():
    """Version 3 gave each model its own section: the view is the old flat ``model`` mapping, every
    other model's option at its old default (the U-Net widths of the cpu-small protocol file, which
    its GuidedMix-Net runs recorded unread)."""
    for name in ("unet", "deeplabv3plus", "guidedmix"):
        view = hashed_tree(load_config(None, [f"model.name={name}"]))["model"]
        dropped = {"backbone_widths", "psp_bins", "psp_channels", "decoder_channels", "mitrans"}
        dropped |= {"mitrans_levels", "mitrans_zero_init"}  # version 2 Added, at their no-op values
        assert view == {k: v for k, v in FLAT_MODEL_DEFAULTS.items() if k not in dropped} | {"name": name}
    small = hashed_tree(load_config(None, ["protocol=cpu-small", "model.name=guidedmix"]))["model"]
    assert small["widths"] == [8, 16, 32, 64, 128]


def test_options_of_another_model_load_only_at_the_value_old_runs_recorded():
    """A saved run config of version 2 lists every model's options: those the chosen model does not
    own load while they hold the old default (and keep the hash); any other value is an unknown key."""
    flat = dict(FLAT_MODEL_DEFAULTS, name="deeplabv3plus", backbone="resnet18")
    cfg = build_config({"model": flat})
    assert type(cfg.model).__name__ == "DeepLabV3PlusConfig" and not hasattr(cfg.model, "widths")
    assert config_hash(cfg) == config_hash(
        load_config(None, ["model.name=deeplabv3plus", "model.backbone=resnet18"])
    )
    small = build_config(
        {"protocol": "cpu-small", "model": dict(flat, name="guidedmix", widths=[8, 16, 32, 64, 128])}
    )
    assert small.model.name == "guidedmix"
    with pytest.raises(ConfigError, match=r"^model\.psp_bins: unknown config key"):
        load_config(None, ["model.psp_bins=[1, 2]"])
    with pytest.raises(ConfigError, match=r"^model\.widths: unknown config key"):
        build_config({"model": dict(flat, widths=[8, 16])})


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
    results = json.loads((cell.run_dir / "results.json").read_text())
    assert results["steps"] == 4 and results["config_version"] == SCHEMA_VERSION

    # ... and finished: done under any of them.
    for overrides in ([], other, ["train.threads=1", "train.ckpt_every=1"]):
        assert cell_state(load_grid(grid_file, extra_overrides=overrides).cells[0]) == "done"
    run_grid(load_grid(grid_file, extra_overrides=["train.threads=1"]), log=lambda *_: None)
    assert trained == [True]
