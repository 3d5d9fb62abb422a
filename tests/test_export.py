"""`semiseg export`: safetensors + model.yaml round trips per model, torch.export, ONNX refusal,
and a loader that needs none of the training code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, tiny_overrides

import semiseg
from semiseg.cli import main
from semiseg.config import config_to_dict, load_config
from semiseg.data.base import default_palette
from semiseg.errors import SemisegError
from semiseg.export import SPEC_FILE, WEIGHTS_FILE, LogitsModel, export_model, load_exported, onnx_missing
from semiseg.models import build_model

GUIDEDMIX_TINY = {
    "model.name": "guidedmix",
    "model.backbone": "resnet18",
    "model.backbone_widths": "[16, 32, 64, 128]",
    "model.output_stride": 32,
    "model.psp_channels": 32,
    "model.decoder_channels": "[32, 16, 16, 8, 8]",
    "eval.size_divisor": 32,
}
MODELS = {
    "unet": {"model.name": "unet"},  # tiny_overrides' 4-8-16-32-64 U-Net
    "deeplabv3plus": {"model.name": "deeplabv3plus", "model.backbone": "resnet18", "model.pretrained": False},
    "guidedmix": GUIDEDMIX_TINY,
}


def randomized(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state with every float entry replaced by random values (variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=gen) * 0.2
            value = noise.abs() + 0.5 if key.endswith("running_var") else value + noise
        state[key] = value.clone()
    return state


def fake_checkpoint(path: Path, overrides: dict, seed: int = 0, teacher: bool = False) -> dict:
    """A checkpoint as the trainer writes it (config, metadata, method state) with random weights.
    With ``teacher`` the method holds a student (``model.``) and the evaluated teacher (``teacher.``)."""
    cfg = load_config(None, tiny_overrides(**overrides))
    model = build_model(cfg.model, 3, 3)
    evaluated = randomized(model, seed)
    state = {f"model.{k}": v for k, v in evaluated.items()}
    if teacher:
        state = {f"model.{k}": v for k, v in randomized(model, seed + 1).items()}
        state.update({f"teacher.{k}": v for k, v in evaluated.items()})
    ckpt = {
        "format": 1,
        "step": 4,
        "model": state,
        "eval_prefix": "teacher." if teacher else "model.",
        "config": config_to_dict(cfg),
        "config_hash": "0123456789ab",
        "class_names": ["background", "vessel", "lesion"],
        "palette": [list(c) for c in default_palette(3)],
        "in_channels": 3,
        "num_classes": 3,
    }
    torch.save(ckpt, path)
    return evaluated


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_per_model(name, tmp_path, capsys):
    ckpt = tmp_path / "latest.pt"
    weights = fake_checkpoint(ckpt, MODELS[name])
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), str(out)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE, SPEC_FILE]
    spec_tree = yaml.safe_load((out / SPEC_FILE).read_text())
    assert spec_tree["model"]["name"] == name and spec_tree["num_classes"] == 3
    assert spec_tree["class_names"] == ["background", "vessel", "lesion"]
    assert spec_tree["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert spec_tree["eval"]["size_divisor"] == (32 if name == "guidedmix" else 16)
    assert spec_tree["model"]["pretrained"] is False and spec_tree["model"]["weights"] is None
    assert spec_tree["format_version"] == 1 and spec_tree["data"]["size"] is None  # readable by 1.x

    model, spec = load_exported(out)
    assert not model.training and spec.palette == [tuple(c) for c in default_palette(3)]
    reference = build_model(spec.model, 3, 3)
    reference.load_state_dict(weights)
    reference.eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = LogitsModel(reference)(x)
        torch.testing.assert_close(LogitsModel(model)(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(LogitsModel(build_model(spec.model, 3, 3).eval())(x), expected)

    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    from_ckpt = semiseg.load(ckpt).predict(image)
    from_export = semiseg.load(out).predict(image)
    np.testing.assert_allclose(from_export.probs, from_ckpt.probs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(from_export.mask, from_ckpt.mask)


def test_fixed_input_size_travels_with_the_export(tmp_path, capsys):
    """``data.size`` (ACDC's fixed 128×128) reaches the export, and both predictors use it."""
    ckpt = tmp_path / "latest.pt"
    fake_checkpoint(ckpt, MODELS["unet"])
    saved = torch.load(ckpt, weights_only=False)
    saved["config"]["data"]["size"] = [24, 40]
    torch.save(saved, ckpt)
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), str(out)]) == 0, capsys.readouterr().err
    tree = yaml.safe_load((out / SPEC_FILE).read_text())
    assert tree["data"]["size"] == [24, 40] and tree["format_version"] == 2  # older readers refuse it
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    predictions = []
    for source in (ckpt, out):
        predictor = semiseg.load(source)
        assert predictor.data_cfg.size == [24, 40]
        predictions.append(predictor.predict(image))
    np.testing.assert_array_equal(predictions[0].mask, predictions[1].mask)
    resized = semiseg.load(out, overrides=["data.size=[32, 32]"])
    assert resized.data_cfg.size == [32, 32]
    with pytest.raises(SemisegError, match="data.size must be"):
        semiseg.load(out, overrides=["data.size=[0, 32]"])


def test_mean_teacher_exports_the_evaluated_network(tmp_path):
    teacher = fake_checkpoint(tmp_path / "mt.pt", {}, seed=3, teacher=True)
    model, _ = load_exported(export_model(tmp_path / "mt.pt", tmp_path / "out"))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, teacher[key])


@pytest.mark.slow
def test_trained_run_and_torch_export(tmp_path, capsys):
    run = tmp_path / "run"
    semiseg.train(overrides=tiny_overrides(), run_dir=run)
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out), "--torch-export"]) == 0, capsys.readouterr().err
    assert "exported to" in capsys.readouterr().out
    spec_tree = yaml.safe_load((out / SPEC_FILE).read_text())
    assert spec_tree["source"]["step"] == 4 and spec_tree["files"]["torch_export"]["file"] == "model.pt2"
    model, spec = load_exported(out)
    program = torch.export.load(str(out / "model.pt2")).module()
    assert spec_tree["files"]["torch_export"]["dynamic"]  # the U-Net: dynamic batch and sides
    for n, h, w in [(1, 48, 80), (3, 32, 32)]:  # sides: multiples of eval.size_divisor (16)
        x = torch.randn(n, spec.in_channels, h, w)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-4)
    # exports are never silently replaced
    assert main(["export", str(run), str(out)]) == 2
    assert "model.safetensors: exists" in capsys.readouterr().err
    assert main(["export", str(run), str(out), "--overwrite"]) == 0


@pytest.mark.skipif(onnx_missing() is None, reason="onnx and onnxscript are installed here")
def test_onnx_without_the_package_is_one_clear_line(tmp_path, capsys):
    fake_checkpoint(tmp_path / "c.pt", {})
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "c.pt"), str(out), "--onnx"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: --onnx: the onnx") and "not installed" in err[0]
    assert not out.exists()  # refused before anything was written


def test_loader_needs_no_training_code(tmp_path):
    fake_checkpoint(tmp_path / "c.pt", {})
    out = export_model(tmp_path / "c.pt", tmp_path / "exported")
    code = f"""
import sys
import numpy as np
import torch

TRAINING = ("semiseg.trainer", "semiseg.methods", "semiseg.plugins", "semiseg.checkpoint",
            "semiseg.experiment", "semiseg.losses", "semiseg.mixers", "semiseg.pseudo_labels")

def loaded():
    return sorted(m for m in sys.modules if m.startswith(TRAINING))

from semiseg.export import load_exported
model, spec = load_exported({str(out)!r})
with torch.no_grad():
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
assert not loaded(), loaded()
import semiseg
pred = semiseg.load({str(out)!r}).predict(np.zeros((20, 30, 3), np.uint8))
assert pred.mask.shape == (20, 30)
assert not loaded(), loaded()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_broken_exports_are_one_line_errors(tmp_path):
    fake_checkpoint(tmp_path / "c.pt", {})
    out = export_model(tmp_path / "c.pt", tmp_path / "exported")
    spec_path = out / SPEC_FILE
    good = spec_path.read_text()
    tree = yaml.safe_load(good)
    tree["num_classes"] = 4
    tree["class_names"].append("extra")
    tree["palette"].append([1, 2, 3])
    spec_path.write_text(yaml.safe_dump(tree))
    with pytest.raises(SemisegError, match="does not match the network"):
        load_exported(out)
    tree = yaml.safe_load(good)
    tree["model"]["widthz"] = [1]
    spec_path.write_text(yaml.safe_dump(tree))
    with pytest.raises(SemisegError, match=r"model\.yaml: model\.widthz: unknown config key"):
        load_exported(out)
    spec_path.write_text("format: something-else\n")
    with pytest.raises(SemisegError, match="not a semiseg export"):
        load_exported(out)
    spec_path.write_text(good)
    with pytest.raises(SemisegError, match="accepts only"):
        semiseg.load(out, overrides=["model.widths=[1, 2]"])
    assert semiseg.load(out, overrides=["eval.mode=sliding", "eval.window=32"]).eval_cfg.mode == "sliding"
    (out / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(SemisegError, match="cannot read weights"):
        load_exported(out)
    (out / WEIGHTS_FILE).unlink()
    with pytest.raises(SemisegError, match="without its weights file"):
        semiseg.load(out)
    with pytest.raises(SemisegError, match="not found"):
        load_exported(out)
