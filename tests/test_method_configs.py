"""Every committed method config loads, validates and declares the method, mixer, plug-ins and
network its name promises (the recipe rows their recipe); every protocol × dataset × method
composition (``semiseg train -c PROTOCOL -c DATASET -c METHOD``) validates and declares what its
method config does; every paper row trains from the CLI on the synthetic dataset (CI-sized)."""

import json

import pytest
from helpers import REPO, Pointwise, composed, tiny_overrides

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
PROTOCOLS = sorted(p.stem for p in (CONFIGS / "protocols").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONFIGS / "datasets").glob("*.yaml"))
#: The method configs run on the cpu-small protocol (GuidedMix-Net's is its cpu-small network).
NAMES = [
    "fixmatch",
    "guidedmix/cpu_small",
    "mean_teacher",
    "supervised",
    "unimatch",
    "unimatch_classmix",
    "unimatch_mpmc",
    "unimatch_mpmc_l",
    "unimatch_mpmc_presence",
    "unimatch_mpmc_ul",
    "unimatch_sufd",
    "unimatch_supmix",
    "unimatch_supmix_sufd",
    "unimatch_supmix_sufd_mpmc",
]


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


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_composition_validates_and_declares_what_its_method_config_does(protocol, dataset):
    """Each protocol × dataset × method composition builds a valid config: the method's method,
    mixer and plug-ins, the dataset's data, the protocol's name; the name joins the three files'."""
    data = load_config(CONFIGS / "datasets" / f"{dataset}.yaml").data
    for method in COMMITTED:
        cfg = load_config(composed(protocol, dataset, method))
        assert declared(cfg)[:3] == DECLARED[method][:3], method
        assert cfg.data.name == data.name and cfg.data.root == data.root, method
        assert cfg.protocol == protocol.replace("_", "-"), method
        assert cfg.name == f"{protocol}-{dataset}-{method.replace('/', '_')}"  # sub-folders kept


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
        assert name in NAMES and name in COMMITTED


@pytest.mark.parametrize("name", NAMES)
def test_method_trains_from_the_cli(tmp_path, capsys, name):
    config = composed("cpu_small", "synthetic", name)
    # the model the config declares: tiny_overrides sets the U-Net widths only for a U-Net
    sets = tiny_overrides(iters=3, **{"train.eval_every": -1, "model.name": DECLARED[name][3]})
    overrides = [x for o in sets for x in ("--set", o)]
    run = tmp_path / name
    files = [x for path in config for x in ("-c", str(path))]
    code = main(["train", *files, *overrides, "--run-dir", str(run)])
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
            "-c",
            "protocols/cpu_small",
            "-c",
            "datasets/synthetic",
            "-c",
            "methods/unimatch_supmix_sufd",
            *overrides,
            "--run-dir",
            str(tmp_path / "amp"),
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_supmix_from_a_strong_labeled_view_trains_from_the_cli(tmp_path, capsys):
    """``method.mixer.source=strong``: the trainer feeds the labeled strong view the mixer pastes."""
    sets = tiny_overrides(iters=2, **{"method.mixer.p": "1.0", "method.mixer.source": "strong"})
    overrides = [x for o in sets for x in ("--set", o)]
    run = tmp_path / "strong_source"
    config = ["-c", "protocols/cpu_small", "-c", "datasets/synthetic", "-c", "methods/unimatch_supmix"]
    code = main(["train", *config, *overrides, "--run-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "results.json").read_text())["steps"] == 2
