"""Every committed method config loads, validates and declares the method, mixer, plug-ins and
network its name promises (the recipe rows their recipe); every per-dataset config declares what its
method config does; every shipped combination trains from the CLI on the synthetic default (CI-sized)."""

import json

import pytest
from helpers import REPO, Pointwise, tiny_overrides

from semiseg.cli import main
from semiseg.config import load_config
from semiseg.inference import method_label
from semiseg.methods import METHODS, build_method

CONFIGS = REPO / "src" / "semiseg" / "configs"
METHOD_CONFIGS = CONFIGS / "methods"

#: What each committed method config declares: (method.name, method.mix, plug-ins, model.name);
#: mix None: the method has no mixer. guidedmix/network_cpu_small is only the network (so supervised).
DECLARED = {
    "bcp": ("bcp", None, (), "unet"),
    "fixmatch": ("fixmatch", "cutmix", (), "unet"),
    "guidedmix": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/hard_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/lambda_max_0.1_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/lambda_max_0.2_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/lambda_max_0.3_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/lambda_max_0.4_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/network_cpu_small": ("supervised", None, (), "guidedmix"),
    "guidedmix/no_mitrans_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/random_pairs_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/released": ("guidedmix", None, (), "guidedmix"),
    "guidedmix/supervised_net_cpu_small": ("supervised", None, (), "guidedmix"),
    "guidedmix/unmix_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "mean_teacher": ("mean_teacher", None, (), "unet"),
    "recipe/fixmatch": ("fixmatch", "cutmix", (), "unet"),
    "recipe/guidedmix_cpu_small": ("guidedmix", None, (), "guidedmix"),
    "recipe/mean_teacher": ("mean_teacher", None, (), "unet"),
    "recipe/supervised": ("supervised", None, (), "unet"),
    "recipe/supervised_continued": ("supervised", None, (), "unet"),
    "recipe/supervised_gmnet_cpu_small": ("supervised", None, (), "guidedmix"),
    "recipe/unimatch": ("unimatch", "cutmix", (), "unet"),
    "recipe/unimatch_classmix": ("unimatch", "classmix", (), "unet"),
    "recipe/unimatch_from_supervised": ("unimatch", "cutmix", (), "unet"),
    "recipe/unimatch_mpmc": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "recipe/unimatch_mpmc_l": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "recipe/unimatch_mpmc_presence": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "recipe/unimatch_mpmc_ul": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "recipe/unimatch_sufd": ("unimatch", "cutmix", ("sufd",), "unet"),
    "recipe/unimatch_supmix": ("unimatch", "supmix", (), "unet"),
    "recipe/unimatch_supmix_sufd": ("unimatch", "supmix", ("sufd",), "unet"),
    "recipe/unimatch_supmix_sufd_from_supervised": ("unimatch", "supmix", ("sufd",), "unet"),
    "recipe/unimatch_supmix_sufd_half": ("unimatch", "supmix", ("sufd",), "unet"),
    "recipe/unimatch_supmix_sufd_mpmc": ("unimatch", "supmix", ("mpmc", "sufd"), "unet"),
    "supervised": ("supervised", None, (), "unet"),
    "unimatch": ("unimatch", "cutmix", (), "unet"),
    "unimatch_classmix": ("unimatch", "classmix", (), "unet"),
    "unimatch_mpmc": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "unimatch_mpmc_l": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "unimatch_mpmc_presence": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "unimatch_mpmc_ul": ("unimatch", "cutmix", ("mpmc",), "unet"),
    "unimatch_sufd": ("unimatch", "cutmix", ("sufd",), "unet"),
    "unimatch_supmix": ("unimatch", "supmix", (), "unet"),
    "unimatch_supmix_sufd": ("unimatch", "supmix", ("sufd",), "unet"),
    "unimatch_supmix_sufd_mpmc": ("unimatch", "supmix", ("mpmc", "sufd"), "unet"),
}

COMMITTED = sorted(
    p.relative_to(METHOD_CONFIGS).with_suffix("").as_posix() for p in METHOD_CONFIGS.rglob("*.yaml")
)
#: Per-dataset configs (protocol × dataset × method), named after their method config.
CELLS = sorted(p for protocol in ("cpu_small", "paper") for p in (CONFIGS / protocol).glob("*/*.yaml"))
NAMES = sorted(p.stem for p in (CONFIGS / "cpu_small" / "synthetic").glob("*.yaml"))


def declared(cfg) -> tuple:
    return cfg.method.name, getattr(cfg.method, "mix", None), tuple(sorted(cfg.plugins)), cfg.model.name


def test_every_committed_method_config_is_declared():
    assert sorted(DECLARED) == COMMITTED


@pytest.mark.parametrize("name", COMMITTED)
def test_method_config_loads_and_declares_its_method_mix_plugins_and_network(name):
    cfg = load_config(METHOD_CONFIGS / f"{name}.yaml")  # validated against the registered schemas
    assert declared(cfg) == DECLARED[name]
    method = build_method(cfg, Pointwise(), 3)  # what the trainer builds (plug-ins attached)
    assert type(method) is METHODS[cfg.method.name]
    assert set(method.extra_optimizers()) == set(cfg.plugins)
    if name.startswith("recipe/"):  # configs/recipes/labeled_cedice.yaml, and adaptive.yaml's policy
        assert (cfg.method.dice_weight, cfg.method.dice_squared) == (1.0, True)
        if hasattr(cfg.method, "pseudo"):
            assert (cfg.method.pseudo.mask, cfg.method.pseudo.align) == ("freematch", "labeled_prior")


@pytest.mark.parametrize("path", CELLS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_per_dataset_config_declares_what_its_method_config_does(path):
    cfg = load_config(path)
    assert declared(cfg)[:3] == DECLARED[path.stem][:3]
    assert cfg.data.name == path.parent.name and cfg.protocol == path.parent.parent.name.replace("_", "-")


def test_the_paper_rows_are_all_shipped():
    for name in (
        "supervised",
        "fixmatch",
        "unimatch",
        "unimatch_classmix",
        "unimatch_supmix",
        "unimatch_sufd",
        "unimatch_supmix_sufd",
        "mean_teacher",
    ):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_method_trains_from_the_cli(tmp_path, capsys, name):
    config = CONFIGS / "cpu_small" / "synthetic" / f"{name}.yaml"
    sets = tiny_overrides(iters=3, **{"train.eval_every": -1})
    overrides = [x for o in sets for x in ("--set", o)]
    run = tmp_path / name
    code = main(["train", "--config", str(config), *overrides, "--run-dir", str(run)])
    _, err = capsys.readouterr()
    assert code == 0, err
    cfg = load_config(config, sets)
    payload = json.loads((run / "results.json").read_text())
    assert payload["steps"] == 3 and payload["results"]["test"]["miou"] is not None
    assert payload["method"] == method_label(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(isinstance(r["total"], float) for r in train)
    for plugin in cfg.plugins:  # each plug-in's own terms and its optimizer's loss are logged
        assert f"total/{plugin}" in train[-1], plugin
        assert any(key.startswith(f"{plugin}/") for key in train[-1]), plugin


def test_amp_on_cpu_uses_bfloat16_and_trains(tmp_path, capsys):
    overrides = [x for o in tiny_overrides(iters=2, **{"train.amp": "true"}) for x in ("--set", o)]
    code = main(
        [
            "train",
            "--config",
            "cpu_small/synthetic/unimatch_supmix_sufd",
            *overrides,
            "--run-dir",
            str(tmp_path / "amp"),
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_supmix_from_a_strong_labeled_view_trains_from_the_cli(tmp_path, capsys):
    """``method.supmix_source=strong``: the trainer feeds the labeled strong view the mixer pastes."""
    sets = tiny_overrides(iters=2, **{"method.supmix_p": "1.0", "method.supmix_source": "strong"})
    overrides = [x for o in sets for x in ("--set", o)]
    run = tmp_path / "strong_source"
    config = "cpu_small/synthetic/unimatch_supmix"
    code = main(["train", "--config", config, *overrides, "--run-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "results.json").read_text())["steps"] == 2
