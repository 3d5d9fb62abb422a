import json
import re
from pathlib import Path

import pytest

from semiseg.config import (
    RunConfig,
    apply_overrides,
    build_config,
    config_hash,
    config_to_dict,
    load_config,
    load_yaml_tree,
)
from semiseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "semiseg" / "configs"


def test_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "supervised"
    assert cfg.data.name == "synthetic"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.iterz=5", "train.iterz"),
        ("train.iters=abc", "train.iters"),
        ("train.amp=1", "train.amp"),
        ("data.strong.cutmix_p=[1]", "data.strong.cutmix_p"),
        ("model.name=vgg", "model.name"),
        ("method.name=nope", "method.name"),
        ("plugins.nope={}", "plugins.nope"),
        ("data.labeled=1.5", "data.labeled"),
        ("data.labeled=0", "data.labeled"),
        ("eval.overlap=1.0", "eval.overlap"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_int_accepted_for_float_but_bool_is_not_an_int():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.iters"):
        load_config(None, ["train.iters=true"])


def test_inheritance_merges_deeply(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  iters: 50\n  amp: true\ndata:\n  crop_size: 64\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  iters: 7\n")
    cfg = load_config(tmp_path / "child.yaml", ["data.crop_size=32"])
    assert (cfg.train.iters, cfg.train.amp, cfg.data.crop_size) == (7, True, 32)


def test_circular_and_missing_bases(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_yaml_tree(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml_tree(tmp_path / "missing.yaml")


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_override_into_non_section():
    with pytest.raises(ConfigError, match="train.iters"):
        apply_overrides({"train": {"iters": 3}}, ["train.iters.x=1"])


def test_resolved_config_round_trips_and_hash_is_stable():
    cfg = load_config(None, ["train.iters=9", "name=a"])
    again = build_config(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)
    renamed = load_config(None, ["train.iters=9", "name=b", "train.log_every=3"])
    assert config_hash(renamed) == config_hash(cfg)  # names and logging do not change results
    assert config_hash(load_config(None, ["train.iters=10"])) != config_hash(cfg)


def test_hash_neutral_option_at_default_leaves_the_hash_unchanged():
    """An option added later (SupMix's ``source``) must not invalidate cached cells at its default."""
    base = ["method.name=unimatch", "method.mix=supmix", "plugins.sufd={}"]
    cfg = load_config(None, base)
    tree = config_to_dict(cfg)
    assert tree["method"]["mixer"]["source"] == "weak"
    mixer = {k: v for k, v in tree["method"]["mixer"].items() if k != "source"}
    dropped = dict(tree, method=dict(tree["method"], mixer=mixer))
    assert config_hash(build_config(dropped)) == config_hash(cfg)  # absent == default
    assert config_hash(load_config(None, [*base, "method.mixer.source=strong"])) != config_hash(cfg)
    for changed in ("method.warmup_iters=5", "method.pseudo.mask=freematch", "train.init_from=x"):
        assert config_hash(load_config(None, [*base, changed])) != config_hash(cfg), changed


def test_mixer_options_live_in_the_mixers_section_and_old_flat_keys_still_load():
    """``method.mixer`` is validated against the chosen mixer's Config; a config written when the
    options were flat method fields (every saved run config lists them all) loads to the same
    config and the same hash."""
    new = load_config(None, ["method.name=unimatch", "method.mix=supmix", "method.mixer={p: 0.7}"])
    assert new.method.mixer.p == 0.7 and new.method.mixer.fallback == "cutmix"
    flat = {
        "name": "unimatch",
        "mix": "supmix",
        "supmix_p": 0.7,
        "classmix_p": 0.5,
        "classmix_rounding": "ceil",
    }
    old = build_config({"method": flat})
    assert old.method.mixer == new.method.mixer and config_hash(old) == config_hash(new)
    assert config_hash(load_config(None, ["method.name=unimatch"])) == config_hash(
        build_config({"method": {"name": "unimatch", "supmix_p": 0.5, "supmix_exclude": [0]}})
    )
    cases = {
        "method.mixer={p: 0.3}": "method.mixer.p",  # cutmix takes no such option
        "method.supmix_p=0.3": "an option of mixer 'supmix', but method.mix is 'cutmix'",
        "method.mixer={p: 2.0}": None,
    }
    for override, match in cases.items():
        sets = ["method.name=unimatch", override] + (["method.mix=supmix"] if match is None else [])
        with pytest.raises(ConfigError, match=re.escape(match or "method.mixer.p: must be in [0, 1]")):
            load_config(None, sets)
    both = ["method.name=unimatch", "method.mix=supmix", "method.mixer={p: 0.5}", "method.supmix_p=0.7"]
    with pytest.raises(ConfigError, match="disagree"):
        load_config(None, both)


GRIDS_DIR = REPO / "benchmarks" / "grids"  # the studies' grids (the package ships none)
GRIDS = sorted(p.stem for p in GRIDS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("grid", GRIDS)
def test_committed_grid_records_keep_their_config_hashes(grid):
    """Every committed record of every grid in benchmarks/grids still matches one of its cells'
    config hashes, so new options (at their defaults) and refactors never make finished cells run again."""
    from semiseg.experiment import load_grid

    loaded = load_grid(GRIDS_DIR / f"{grid}.yaml")
    path = REPO / loaded.reports / "records.json"
    if not path.is_file():
        pytest.skip(f"{path} not committed")
    records = json.loads(path.read_text())
    hashes = {config_hash(cell.cfg) for cell in loaded.cells}
    stale = [(r["method"], r["fraction"], r["seed"]) for r in records if r["config_hash"] not in hashes]
    assert records and not stale, stale


def _leaf_configs():
    return sorted(
        p
        for p in CONFIGS.rglob("*.yaml")
        if "methods" not in p.parts
        and "protocols" not in p.parts
        and "datasets" not in p.parts
        and "recipes" not in p.parts
    )


@pytest.mark.parametrize("recipe", sorted((CONFIGS / "recipes").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "mean_teacher"])
def test_recipes_overlay_every_semi_supervised_method(recipe, method):
    """``configs/recipes/*`` are overlays of ``method`` options: valid on every semi-supervised method."""
    tree = load_yaml_tree(recipe)
    tree["method"]["name"] = method
    cfg = build_config(tree)
    assert cfg.method.dice_weight == 1.0 and cfg.method.dice_squared


@pytest.mark.parametrize("grid", sorted(GRIDS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_grid_builds_all_its_cells(grid):
    """Each grid of benchmarks/grids resolves every cell's config (protocol, dataset, method,
    overrides, chains): its references resolve beside it first, then as built-in configs."""
    from semiseg.experiment import load_grid

    loaded = load_grid(grid)
    assert loaded.cells and all(c.cfg.seed == c.seed for c in loaded.cells)
    for cell in loaded.cells:
        assert (cell.base is not None) == bool(cell.cfg.train.init_from), cell.method


@pytest.mark.parametrize("path", _leaf_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path):
    load_config(path)
