"""The Python API (semiseg.train / load / Predictor), `semiseg list`, CPU loading, README examples."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_overrides
from PIL import Image

import semiseg
from semiseg import api
from semiseg.cli import main
from semiseg.config import config_to_dict
from semiseg.errors import DataError, SemisegError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny supervised U-Net run on the synthetic data, shared by the tests of this module."""
    run = tmp_path_factory.mktemp("api") / "run"
    result = semiseg.train(overrides=tiny_overrides(), run_dir=run)
    assert result.run_dir == run and result.steps == 4
    return run


def test_import_is_light_and_exposes_the_api():
    code = (
        "import sys, semiseg\n"
        "heavy = [m for m in ('torch', 'numpy', 'semiseg.api', 'semiseg.trainer') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(semiseg.train) and callable(semiseg.load) and 'Predictor' in dir(semiseg)\n"
        "assert semiseg.train is semiseg.api.train\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        semiseg.nope  # noqa: B018


def test_overrides_as_list_mapping_or_nested_mapping():
    cfg = api.load_run_config(
        "demo",
        {
            "train": {"iters": 7, "threads": None},
            "model.widths": (4, 8, 16, 32, 64),
            "optim.lr": 1e-5,
            "data.root": Path("some/where"),
            "name": "yes",  # a string YAML would read as a bool stays a string
            "plugins": {},
        },
    )
    assert cfg.train.iters == 7 and cfg.train.threads is None and cfg.model.widths == [4, 8, 16, 32, 64]
    assert cfg.optim.lr == 1e-5 and cfg.data.root == "some/where" and cfg.name == "yes"
    assert api.load_run_config("demo", ["train.iters=9"]).train.iters == 9
    again = api.load_run_config(cfg, {"seed": 3})  # a RunConfig object, overridden
    assert again.seed == 3 and again.train.iters == 7


def test_config_names_resolve_like_the_cli():
    cfg = api.load_run_config(["protocols/cpu_small", "datasets/chase_db1", "methods/unimatch"])
    assert cfg.method.name == "unimatch" and cfg.data.name == "chase_db1" and cfg.protocol == "cpu-small"
    assert cfg.name == "cpu_small-chase_db1-unimatch"  # several files: named after them
    files = [
        "configs/protocols/cpu_small.yaml",
        "configs/datasets/chase_db1.yaml",
        "configs/methods/unimatch.yaml",
    ]
    again = api.load_run_config(tuple(files), {"seed": 4})  # repository paths, overridden last
    assert config_to_dict(again) == {**config_to_dict(cfg), "seed": 4}
    assert api.load_run_config("methods/unimatch").method.name == "unimatch"
    path = REPO / "src/semiseg/configs/demo.yaml"
    assert api.load_run_config(path).name == "demo"
    with pytest.raises(SemisegError, match="nope: config file not found"):
        api.load_run_config("nope")
    with pytest.raises(SemisegError, match="train.iterz"):
        api.load_run_config("demo", {"train.iterz": 1})


def test_train_returns_result_and_refuses_existing_run(run_dir):
    assert (run_dir / "latest.pt").is_file() and (run_dir / "results.json").is_file()
    with pytest.raises(SemisegError, match="run directory exists"):
        semiseg.train(overrides=tiny_overrides(), run_dir=run_dir)


def test_predict_array_probs_and_overlay(run_dir):
    predictor = semiseg.load(run_dir)
    assert predictor.class_names == ["background", "vessel", "lesion"] and len(predictor.palette) == 3
    assert predictor.in_channels == 3 and predictor.num_classes == 3 and "unet" in repr(predictor)
    image = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    pred = predictor.predict(image)
    assert pred.mask.shape == (37, 53) and pred.mask.dtype == np.int64
    assert pred.probs.shape == (3, 37, 53) and pred.probs.dtype == np.float32
    np.testing.assert_allclose(pred.probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred.mask, pred.probs.argmax(0))
    same = predictor.predict(image.astype(np.float32) / 255.0)  # float in [0, 1] = uint8 / 255
    np.testing.assert_allclose(same.probs, pred.probs, atol=1e-6)
    rgba = np.concatenate([image, np.full((37, 53, 1), 7, np.uint8)], axis=2)  # alpha is dropped
    np.testing.assert_array_equal(predictor(rgba).mask, pred.mask)
    rgb = predictor.overlay(image, pred.mask)
    assert rgb.shape == (37, 53, 3) and rgb.dtype == np.uint8
    with pytest.raises(SemisegError, match="1 channel.*expects 3"):
        predictor.predict(image[..., 0])
    with pytest.raises(SemisegError, match="NaN"):
        predictor.predict(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(SemisegError, match="shape"):
        predictor.predict(np.zeros((2, 3, 4, 5)))


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.resize=0.5", "eval.size_divisor=16"],
        ["data.long_side=40", "eval.mode=sliding", "eval.window=32", "eval.overlap=0.25"],
        ["data.size=[24, 40]", "eval.size_divisor=8"],
    ],
    ids=["whole_resize", "sliding_long_side", "fixed_size"],
)
def test_predict_matches_the_cli(run_dir, tmp_path, capsys, overrides):
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    src.mkdir()
    images = {
        "a": (rng.random((45, 61, 3)) * 255).astype(np.uint8),
        "b": (rng.random((30, 22, 3)) * 255).astype(np.uint8),
    }
    for stem, image in images.items():
        Image.fromarray(image).save(src / f"{stem}.png")
    sets = [x for o in overrides for x in ("--set", o)]
    assert main(["predict", str(run_dir), str(src), str(tmp_path / "out"), *sets]) == 0, capsys.readouterr()
    predictor = semiseg.load(run_dir, overrides=overrides)
    assert predictor.eval_cfg.mode == ("sliding" if "sliding" in overrides[1] else "whole")
    for stem, image in images.items():
        cli_mask = np.asarray(Image.open(tmp_path / "out" / f"{stem}_mask.png"))
        cli_overlay = np.asarray(Image.open(tmp_path / "out" / f"{stem}_overlay.png"))
        for source in (image, src / f"{stem}.png"):
            pred = predictor.predict(source)
            np.testing.assert_array_equal(pred.mask, cli_mask)
            np.testing.assert_array_equal(predictor.overlay(source, pred.mask), cli_overlay)


def test_predict_volume_matches_the_cli(run_dir, tmp_path, capsys):
    """A 1-channel run: ``predict_volume`` of an .h5 file or its array is the CLI's ``<stem>_mask.h5``."""
    import h5py

    run = tmp_path / "run1"
    semiseg.train(
        overrides=tiny_overrides(**{"data.synthetic.channels": 1, "data.size": "[24, 24]"}), run_dir=run
    )
    rng = np.random.default_rng(2)
    volume = (rng.random((3, 30, 20)) * 400 - 100).astype(np.float32)  # outside [0, 1]: min-max per slice
    src = tmp_path / "in"
    src.mkdir()
    with h5py.File(src / "case.h5", "w") as f:
        f.create_dataset("image", data=volume)
    assert main(["predict", str(run), str(src), str(tmp_path / "out")]) == 0, capsys.readouterr()
    with h5py.File(tmp_path / "out" / "case_mask.h5") as f:
        cli_labels = f["label"][()]
    predictor = semiseg.load(run)
    for source in (src / "case.h5", volume):
        labels = predictor.predict_volume(source)
        assert labels.shape == (3, 30, 20) and labels.dtype == np.int64
        np.testing.assert_array_equal(labels, cli_labels)
    with pytest.raises(DataError, match="D×H×W"):
        predictor.predict_volume(volume[0])
    with pytest.raises(DataError, match="1 channel but the model expects 3"):
        semiseg.load(run_dir).predict_volume(volume)  # the module's 3-channel run


def test_load_errors(run_dir, tmp_path):
    with pytest.raises(SemisegError, match="no such run directory, checkpoint or export"):
        semiseg.load(tmp_path / "absent")
    if not torch.cuda.is_available():
        with pytest.raises(SemisegError, match="CUDA is not available"):
            semiseg.load(run_dir, device="cuda")
    with pytest.raises(SemisegError, match="eval.mode"):
        semiseg.load(run_dir, overrides=["eval.mode=blurry"])


def _save_as_if_on_gpu(ckpt: dict, path: Path) -> None:
    """torch.save ``ckpt`` with every storage tagged ``cuda:0``, as a GPU run's checkpoint is."""
    import torch.serialization as ser

    def tag(obj):
        device = getattr(obj, "device", None)
        return "cuda:0" if device is not None and device.type == "cpu" else None

    ser.register_package(1, tag, lambda obj, location: None)
    try:
        torch.save(ckpt, path)
    finally:
        ser._package_registry[:] = [entry for entry in ser._package_registry if entry[1] is not tag]


def test_gpu_checkpoint_with_unavailable_weights_loads_on_cpu(run_dir, tmp_path):
    """A checkpoint written on a GPU by a run that started from ImageNet / a local weights file loads on
    a CPU-only machine without the network or that file."""
    from semiseg.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir / "latest.pt")
    ckpt["config"]["model"]["weights"] = str(tmp_path / "gone" / "resnet.pth")
    gpu = tmp_path / "gpu.pt"
    _save_as_if_on_gpu(ckpt, gpu)
    if not torch.cuda.is_available():  # the simulation is real: a plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu, weights_only=True)
    image = (np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8)
    expected = semiseg.load(run_dir).predict(image)
    got = semiseg.load(gpu, device="cpu").predict(image)
    np.testing.assert_array_equal(got.probs, expected.probs)
    assert next(semiseg.load(gpu).model.parameters()).device.type == "cpu"


def test_registered_and_cli_list(capsys):
    reg = semiseg.registered()
    assert {"supervised", "fixmatch", "unimatch", "mean_teacher"} <= set(reg["methods"])
    assert {"cutmix", "classmix", "supmix", "none"} == set(reg["mixers"])
    assert {"sufd", "mpmc"} <= set(reg["plugins"])
    assert {"fixed", "freematch", "flexmatch"} == set(reg["pseudo_label_masks"])
    assert {"none", "labeled_prior"} == set(reg["pseudo_label_alignment"])
    assert {"synthetic", "folder", "chase_db1", "covid_infnet", "acdc"} <= set(reg["datasets"])
    assert {"unet", "deeplabv3plus"} <= set(reg["models"])
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for label, key in api.REGISTRY_KEYS.values():
        line = next(line for line in out.splitlines() if line.startswith(f"{label}:"))
        assert key in line
    assert "supmix" in out and "freematch" in out and "(data.name)" in out
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == reg


# ----------------------------------------------------------------------------- README examples


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, flags=re.S | re.M)


@pytest.mark.slow
def test_readme_python_api_and_export_examples_run(tmp_path, monkeypatch, capsys):
    """Run the README's Python API and Export examples as written, in a fresh folder; only the
    training budget is shrunk (tiny_overrides are appended to the example's own overrides)."""
    real_train = api.train

    def quick_train(config=None, overrides=None, run_dir=None, resume=False):
        return real_train(config, [*api.override_list(overrides), *tiny_overrides()], run_dir, resume)

    monkeypatch.setattr(semiseg, "train", quick_train, raising=False)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    python_api = code_blocks(readme_section("Python API"), "python")
    assert python_api, "no python example under '## Python API'"
    for block in python_api:
        exec(compile(block, "README.md:Python API", "exec"), namespace)
    assert (tmp_path / "runs/api_demo/latest.pt").is_file()
    assert not (tmp_path / "overlay.png").exists()  # the snippet writes its picture to a temp folder

    export = readme_section("Export")
    commands = [
        shlex.split(line, comments=True)
        for block in code_blocks(export, "bash")
        for line in block.splitlines()
        if line.startswith("semiseg ")
    ]
    assert commands, "no semiseg command under '## Export'"
    for command in commands:
        assert main(command[1:]) == 0, capsys.readouterr().err
    for block in code_blocks(export, "python"):
        exec(compile(block, "README.md:Export", "exec"), namespace)
    assert (tmp_path / "runs/exported/demo/model.safetensors").is_file()


def test_composed_names_tell_built_in_method_files_in_sub_folders_apart():
    plain = api.load_run_config(["protocols/cpu_small", "datasets/chase_db1", "methods/unimatch"])
    recipe = api.load_run_config(["protocols/cpu_small", "datasets/chase_db1", "methods/recipe/unimatch"])
    guided = api.load_run_config(
        ["protocols/cpu_small", "datasets/covid_infnet", "methods/guidedmix/cpu_small"]
    )
    assert plain.name == "cpu_small-chase_db1-unimatch"
    assert recipe.name == "cpu_small-chase_db1-recipe_unimatch"
    assert guided.name == "cpu_small-covid_infnet-guidedmix_cpu_small"
