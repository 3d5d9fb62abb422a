"""The bad-input catalogue of docs/reliability.md: one test per row.

Every user error ends with exactly one ``error: ...`` line naming the file or config key, exit
status 2, and nothing created or overwritten: in particular no run directory is left behind by a
start that fails on its data or config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import expect_error, run_cli, sets, tiny_overrides, write_folder_dataset
from PIL import Image

from semiseg.cli import main


def folder_args(root, iters=1, **extra):
    values = {
        "data.name": "folder",
        "data.root": str(root),
        "data.labeled": 4,
        "train.ckpt_every": 1,
        **extra,
    }
    return sets(tiny_overrides(iters=iters, **values))


def expect_train_error(capsys, tmp_path, args, *needles):
    """A failed start: one error line and no run directory left behind."""
    run = tmp_path / "run"
    line = expect_error(capsys, ["train", *args, "--run-dir", run], *needles)
    assert not run.exists(), sorted(p.name for p in run.iterdir())
    return line


def train_ok(capsys, tmp_path, args, name="run"):
    run = tmp_path / name
    code, out, err = run_cli(["train", *args, "--run-dir", run], capsys)
    assert code == 0, err
    assert (run / "results.json").is_file()
    return run, out, err


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def data(tmp_path):
    return write_folder_dataset(tmp_path / "data")


# ------------------------------------------------------------------ masks


def test_mask_value_not_a_class(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "data", num_classes=2)
    bad = np.zeros((32, 40), np.uint8)
    bad[3, 3] = 7
    Image.fromarray(bad).save(root / "masks" / "img05.png")
    expect_train_error(capsys, tmp_path, folder_args(root, **{"data.labeled": 1.0}), "img05.png", "value 7")


def test_mask_value_in_a_held_out_split(capsys, tmp_path, data):
    assert run_cli(["data", "split", data, "--labeled", "3", "--test", "2", "--seed", "0"], capsys)[0] == 0
    test_name = (data / "splits" / "test.txt").read_text().split()[0]
    bad = np.zeros((32, 40), np.uint8)
    bad[0, 0] = 9
    Image.fromarray(bad).save(data / "masks" / Path(test_name).name)
    args = folder_args(data, **{"data.split_dir": "splits"})
    expect_train_error(capsys, tmp_path, args, Path(test_name).name, "value 9")


def test_greyscale_antialiased_mask(capsys, tmp_path, data):
    Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (32, 1))).save(data / "masks" / "img02.png")
    expect_train_error(
        capsys, tmp_path, folder_args(data, **{"data.labeled": 1.0}), "img02.png", "anti-aliased"
    )


def test_colour_mask(capsys, tmp_path, data):
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(data / "masks" / "img01.png")
    expect_train_error(capsys, tmp_path, folder_args(data, **{"data.labeled": 1.0}), "img01.png", "colour")


def test_two_channel_mask(capsys, tmp_path, data):
    Image.fromarray(np.zeros((32, 40, 2), np.uint8), "LA").save(data / "masks" / "img03.png")
    expect_train_error(
        capsys, tmp_path, folder_args(data, **{"data.labeled": 1.0}), "img03.png", "single-channel"
    )


def test_mask_size_mismatch_of_an_unlabeled_image(capsys, tmp_path, data):
    """A mask whose size differs, on an image the run uses as unlabeled (its mask hidden)."""
    for i in range(8):
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "masks" / f"img{i:02d}.png")
    code = run_cli(["data", "split", data, "--labeled", "1", "--seed", "0"], capsys)[0]
    assert code == 0
    expect_train_error(capsys, tmp_path, folder_args(data, **{"data.split_dir": "splits"}), "size")


def test_masks_0_255_refused_then_converted_or_mapped(capsys, tmp_path):
    """0/255 masks of a two-class dataset (255 meant as foreground): refused before anything is
    created, naming a mask and the conversion; remap-masks or data.mask_values then train."""
    root = write_folder_dataset(tmp_path / "data", num_classes=2)
    for path in (root / "masks").iterdir():
        arr = np.asarray(Image.open(path))
        Image.fromarray((arr > 0).astype(np.uint8) * 255).save(path)
    line = expect_train_error(capsys, tmp_path, folder_args(root), "masks/img0", "hold only 0 and 255")
    assert f"semiseg data remap-masks {root} --map 255=1" in line and "data.mask_values" in line

    # accepted as they are with an explicit value map, applied whenever a mask is read
    mapped = folder_args(root, **{"data.mask_values": "{0: 0, 255: 1}"})
    run, _, err = train_ok(capsys, tmp_path, mapped, name="mapped")
    assert "warning" not in err
    code, _, err = run_cli(["eval", run, "--split", "labeled", "--out", tmp_path / "e.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["iou"]["square"] is not None  # 255 read as 1
    bad_map = folder_args(root, **{"data.mask_values": "{300: 1}"})
    expect_train_error(capsys, tmp_path, bad_map, "data.mask_values", "300")

    # or converted once, into a new folder (never in place)
    code, out, err = run_cli(["data", "remap-masks", root, "--map", "255=1"], capsys)
    assert code == 0, err
    fixed = np.asarray(Image.open(root / "masks_remapped" / "img00.png"))
    assert set(np.unique(fixed)) == {0, 1}
    expect_error(capsys, ["data", "remap-masks", root, "--map", "255=1"], "masks_remapped", "exists")
    expect_error(capsys, ["data", "remap-masks", root, "--map", "255"], "--map")
    (root / "masks").rename(root / "masks_0_255")
    (root / "masks_remapped").rename(root / "masks")
    train_ok(capsys, tmp_path, folder_args(root), name="remapped")


def test_all_background_masks_warn(capsys, tmp_path, data):
    """The reverse mistake: masks whose foreground was lost (all 0) train, with a warning."""
    for path in (data / "masks").iterdir():
        Image.fromarray(np.zeros((32, 40), np.uint8)).save(path)
    _, _, err = train_ok(capsys, tmp_path, folder_args(data))
    assert "never occur" in err and "every labeled mask is all background" in err


def test_class_missing_from_labeled_masks_warns(capsys, tmp_path, data):
    for path in (data / "masks").iterdir():
        arr = np.asarray(Image.open(path)).copy()
        arr[arr == 2] = 0
        Image.fromarray(arr).save(path)
    _, _, err = train_ok(capsys, tmp_path, folder_args(data))
    assert "warning: class 'corner' (2) never occurs in the 4 labeled mask(s)" in err


def test_all_ignore_masks_warn(capsys, tmp_path, data):
    Image.fromarray(np.full((32, 40), 255, np.uint8)).save(data / "masks" / "img00.png")
    _, _, err = train_ok(capsys, tmp_path, folder_args(data, **{"data.labeled": 1.0}))
    assert "1 of 8 labeled masks are entirely 255" in err


def test_16bit_and_palette_masks(tmp_path):
    from semiseg.data.io import read_mask_file

    mask = np.zeros((6, 5), np.uint16)
    mask[1, 1] = 2
    Image.fromarray(mask).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    assert read_mask_file(tmp_path / "m16.png")[1, 1] == 2
    pal = Image.fromarray(mask.astype(np.uint8), "L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    assert read_mask_file(tmp_path / "pal.png")[1, 1] == 2  # palette index, not colour
    mask[0, 0] = 300
    Image.fromarray(mask).save(tmp_path / "big.png")
    with pytest.raises(Exception, match=r"big\.png.*300"):
        read_mask_file(tmp_path / "big.png")


# ------------------------------------------------------------------ images


def test_truncated_labeled_image(capsys, tmp_path, data):
    truncate(data / "images" / "img04.png")
    expect_train_error(capsys, tmp_path, folder_args(data, **{"data.labeled": 1.0}), "img04.png")


def test_truncated_unlabeled_image(capsys, tmp_path, data):
    truncate(data / "unlabeled" / "u01.png", 0.7)
    expect_train_error(capsys, tmp_path, folder_args(data), "u01.png", "cannot read image")


def test_truncated_jpeg_held_out(capsys, tmp_path, data):
    img = np.asarray(Image.open(data / "images" / "img06.png"))
    (data / "images" / "img06.png").unlink()
    Image.fromarray(img).save(data / "images" / "img06.jpg", quality=95)
    truncate(data / "images" / "img06.jpg", 0.6)
    (data / "splits").mkdir()
    (data / "splits" / "labeled.txt").write_text("images/img00.png\nimages/img01.png\n")
    (data / "splits" / "test.txt").write_text("images/img06.jpg\n")
    expect_train_error(capsys, tmp_path, folder_args(data, **{"data.split_dir": "splits"}), "img06.jpg")


@pytest.mark.parametrize("fmt", ["png", "jpg", "tif", "bmp", "gif"])
def test_truncated_file_of_each_format(tmp_path, fmt):
    from semiseg.data.io import inspect_image
    from semiseg.errors import DataError

    path = tmp_path / f"x.{fmt}"
    rgb = (np.random.default_rng(0).random((64, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("P" if fmt == "gif" else "RGB").save(path)
    assert inspect_image(path).width == 48
    truncate(path, 0.6)
    with pytest.raises(DataError, match=rf"x\.{fmt}: cannot read image"):
        inspect_image(path)


def test_garbage_image(capsys, tmp_path, data):
    (data / "unlabeled" / "u00.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    expect_train_error(capsys, tmp_path, folder_args(data), "u00.png")


def test_channel_count_differs(capsys, tmp_path, data):
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(data / "unlabeled" / "u00.png")
    expect_train_error(capsys, tmp_path, folder_args(data), "u00.png", "channel")


def test_16bit_greyscale_images_train(capsys, tmp_path):
    root = write_folder_dataset(tmp_path / "data", channels=1)
    for path in (root / "images").iterdir():
        arr = np.asarray(Image.open(path)).astype(np.uint16) * 257
        Image.fromarray(arr).save(path)
    assert Image.open(root / "images" / "img00.png").mode.startswith("I")
    train_ok(capsys, tmp_path, folder_args(root))


def test_palette_and_rgba_images_read_as_rgb(capsys, tmp_path, data):
    from semiseg.data.io import pil_to_float

    img = Image.open(data / "images" / "img00.png")
    img.convert("P").save(data / "images" / "img00.png")
    rgba = img.convert("RGBA")
    rgba.putalpha(10)
    rgba.save(data / "images" / "img01.png")
    assert pil_to_float(Image.open(data / "images" / "img00.png")).shape == (32, 40, 3)
    assert pil_to_float(Image.open(data / "images" / "img01.png")).shape == (32, 40, 3)  # alpha dropped
    train_ok(capsys, tmp_path, folder_args(data, **{"data.labeled": 1.0}))


def test_nan_in_float_image(tmp_path):
    from semiseg.data.io import inspect_image

    arr = np.zeros((4, 4), np.float32)
    arr[1, 1] = np.nan
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    with pytest.raises(Exception, match=r"f\.tif: image holds NaN or Inf"):
        inspect_image(tmp_path / "f.tif")


def test_duplicate_stems_with_different_extensions(capsys, tmp_path, data):
    Image.open(data / "images" / "img00.png").save(data / "images" / "img00.jpg")
    expect_train_error(capsys, tmp_path, folder_args(data), "img00", "share the stem")


def test_mask_in_wrong_format(capsys, tmp_path, data):
    Image.open(data / "masks" / "img02.png").save(data / "masks" / "img02.bmp")
    (data / "masks" / "img02.png").unlink()
    expect_train_error(capsys, tmp_path, folder_args(data), "img02.png", "masks must be PNG")


def test_non_utf8_file_name(capsys, tmp_path, data):
    name = os.fsdecode(b"caf\xe9.png")
    try:
        Image.open(data / "unlabeled" / "u00.png").save(data / "unlabeled" / name)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    line = expect_train_error(capsys, tmp_path, folder_args(data), "not valid UTF-8")
    assert "caf\\xe9.png" in line


# ------------------------------------------------------------------ split files


def test_split_file_names_missing_image(capsys, tmp_path, data):
    (data / "splits").mkdir()
    (data / "splits" / "labeled.txt").write_text("images/img00.png\n\nimages/gone.png\n")
    expect_train_error(
        capsys, tmp_path, folder_args(data, **{"data.split_dir": "splits"}), "labeled.txt:3", "gone.png"
    )


def test_split_file_duplicate_and_not_utf8(capsys, tmp_path, data):
    (data / "splits").mkdir()
    labeled = data / "splits" / "labeled.txt"
    labeled.write_text("images/img00.png\n./images/img00.png\n")
    args = folder_args(data, **{"data.split_dir": "splits"})
    expect_train_error(capsys, tmp_path, args, "labeled.txt:2", "listed twice")
    labeled.write_bytes(b"images/img00.png\nimages/\xff.png\n")
    expect_train_error(capsys, tmp_path, args, "labeled.txt:2", "UTF-8")


def test_split_files_labeled_in_test(capsys, tmp_path, data):
    (data / "splits").mkdir()
    (data / "splits" / "labeled.txt").write_text("images/img00.png\nimages/img01.png\n")
    (data / "splits" / "test.txt").write_text("images/img01.png\n")
    expect_train_error(
        capsys, tmp_path, folder_args(data, **{"data.split_dir": "splits"}), "also in test.txt"
    )


def test_split_files_test_image_without_mask(capsys, tmp_path, data):
    (data / "splits").mkdir()
    (data / "splits" / "labeled.txt").write_text("images/img00.png\n")
    (data / "splits" / "test.txt").write_text("unlabeled/u00.png\n")
    args = folder_args(data, **{"data.split_dir": "splits"})
    expect_train_error(capsys, tmp_path, args, "test.txt", "u00.png", "test image has no mask")


def test_semi_supervised_method_without_unlabeled_images(capsys, tmp_path, data):
    (data / "splits").mkdir()
    (data / "splits" / "labeled.txt").write_text("images/img00.png\nimages/img01.png\n")
    args = folder_args(data, **{"data.split_dir": "splits", "method.name": "fixmatch"})
    expect_train_error(capsys, tmp_path, args, "method.name=fixmatch", "unlabeled split is empty")


# ------------------------------------------------------------------ volumes


def _write_nifti(root: Path, image: np.ndarray, mask: np.ndarray) -> Path:
    nib = pytest.importorskip("nibabel")
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(root / "tr_im.nii.gz"))
    nib.save(nib.Nifti1Image(mask.astype(np.float32), np.eye(4)), str(root / "tr_mask.nii.gz"))
    return root


def medseg_args(root):
    return sets(
        tiny_overrides(iters=1, **{"data.name": "covid_medseg", "data.root": str(root), "data.labeled": 2})
    )


@pytest.mark.parametrize(
    "shape, needle",
    [((16, 16), ">= 3 slices"), ((16, 16, 10, 2), "3-D volume")],
    ids=["2-D", "4-D"],
)
def test_nifti_with_unexpected_dimensions(capsys, tmp_path, shape, needle):
    root = _write_nifti(tmp_path / "ct", np.zeros(shape), np.zeros(shape))
    expect_train_error(capsys, tmp_path, medseg_args(root), "tr_im.nii.gz", needle)


def test_nifti_mask_shape_differs(capsys, tmp_path):
    root = _write_nifti(tmp_path / "ct", np.zeros((16, 16, 10)), np.zeros((16, 12, 10)))
    expect_train_error(capsys, tmp_path, medseg_args(root), "tr_mask.nii.gz", "differs")


def test_nan_in_nifti_volume(capsys, tmp_path):
    image = np.zeros((16, 16, 10))
    image[2, 3, 8] = np.nan  # a test slice: found before training starts
    root = _write_nifti(tmp_path / "ct", image, np.zeros((16, 16, 10)))
    expect_train_error(capsys, tmp_path, medseg_args(root), "tr_im.nii.gz[8]", "NaN")


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.threshold=1.5", "method.threshold"),
        ("optim.lr=-0.01", "optim.lr"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("train.ckpt_every=0", "train.ckpt_every"),
        ("data.scale_range=[0.5, .inf]", "data.scale_range"),
    ],
)
def test_bad_config_values(capsys, tmp_path, override, key):
    args = sets([*tiny_overrides(iters=1), "method.name=fixmatch", override])
    expect_train_error(capsys, tmp_path, args, key)


def test_crop_too_small_for_the_model(capsys, tmp_path):
    args = sets(tiny_overrides(iters=1, **{"data.crop_size": 8}))
    expect_train_error(capsys, tmp_path, args, "data.crop_size=8", "model.name=unet", "16×16")


@pytest.mark.parametrize(
    "text", ["_base_: 5\n", "_base_: [null]\n", b"train:\n  iters: \xff\n", "train: [1, 2\n"]
)
def test_unreadable_config_file(capsys, tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    expect_train_error(capsys, tmp_path, ["--config", path], "bad.yaml")


def test_readme_config_prefix_works_outside_the_repository(capsys):
    code, out, err = run_cli(
        ["config", "show", "--config", "configs/methods/unimatch_supmix_sufd.yaml"], capsys
    )
    assert code == 0, err
    assert "name: unimatch" in out


# ------------------------------------------------------------------ outputs, run directories


def test_run_dir_under_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    expect_error(
        capsys, ["train", *sets(tiny_overrides(iters=1)), "--run-dir", tmp_path / "file" / "run"], "is a file"
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        expect_error(
            capsys, ["train", *sets(tiny_overrides(iters=1)), "--run-dir", ro / "run"], "not writable"
        )
    finally:
        ro.chmod(0o755)


def test_failed_start_leaves_a_replaceable_run_dir(capsys, tmp_path, data):
    """A run directory whose run never reached its first checkpoint: --resume says so, and the same
    command without it starts again (a crash between creating the folder and the first checkpoint)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "metrics.jsonl").write_text("")
    (run / "splits").mkdir()
    (run / "splits" / "labeled.txt").write_text("images/img00.png\n")
    (run / "tb").mkdir()
    (run / ".latest.pt.abc.tmp").write_bytes(b"partial")
    args = [*folder_args(data), "--run-dir", run]
    expect_error(
        capsys, ["train", *args, "--resume"], "never reached its first checkpoint", "without --resume"
    )
    code, out, err = run_cli(["train", *args], capsys)
    assert code == 0, err
    assert "never reached its first checkpoint; starting it again" in out
    assert (run / "latest.pt").is_file() and not (run / ".latest.pt.abc.tmp").exists()
    # a folder holding anything else is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    expect_error(capsys, ["train", *folder_args(data), "--run-dir", other], "run directory exists")
    assert (other / "notes.txt").read_text() == "mine"


def test_train_without_a_run_dir_picks_a_new_folder(capsys, tmp_path, monkeypatch):
    """A bare ``semiseg train`` never collides with an earlier run: runs/run, then runs/run-2 (said
    on stdout); resuming needs the run named."""
    monkeypatch.chdir(tmp_path)
    args = ["train", *sets(tiny_overrides(iters=1))]
    for expected in ("runs/run", "runs/run-2"):
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert f"run directory: {expected}\n" in out and (tmp_path / expected / "results.json").is_file()
    expect_error(capsys, [*args, "--resume"], "--resume", "name the run directory")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run", "run-2"]


def test_resume_with_another_config_names_the_keys(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(["train", *sets(tiny_overrides(iters=2)), "--run-dir", run], capsys)[0] == 0
    other = tiny_overrides(iters=3, **{"optim.lr": 0.5})
    line = expect_error(capsys, ["train", *sets(other), "--run-dir", run, "--resume"], "config differs")
    assert "optim.lr (run: 0.01, now: 0.5)" in line and "train.iters (run: 2, now: 3)" in line
    assert "data.crop_size" not in line and f"semiseg train --resume {run}" in line
    # the run's own config, by naming the run only (a volatile setting may still change)
    code, out, err = run_cli(["train", "--resume", run, "--set", "train.threads=1"], capsys)
    assert code == 0, err
    assert f"resumed from {run / 'latest.pt'} at step 2" in out


def test_empty_labeled_split_file_is_named(capsys, tmp_path, data):
    (data / "splits").mkdir()
    (data / "splits" / "labeled.txt").write_text("# nothing yet\n")
    line = expect_train_error(
        capsys, tmp_path, folder_args(data, **{"data.split_dir": "splits"}), "no images"
    )
    assert str(data / "splits" / "labeled.txt") in line


def test_empty_test_split_file_is_refused_before_training(capsys, tmp_path, data):
    assert run_cli(["data", "split", data, "--labeled", "3", "--test", "2", "--seed", "0"], capsys)[0] == 0
    (data / "splits" / "test.txt").write_text("")
    args = folder_args(data, **{"data.split_dir": "splits"})
    line = expect_train_error(capsys, tmp_path, args, "test.txt", "lists no images", "eval.splits")
    assert str(data / "splits" / "test.txt") in line
    train_ok(capsys, tmp_path, [*args, "--set", "eval.splits=[]"])  # nothing evaluated on it: fine
    # `data split --test 0` writes no test.txt at all (the final evaluation is then skipped, as without
    # split files), so the split command never sets this trap
    code, _, err = run_cli(["data", "split", data, "--labeled", "3", "--overwrite"], capsys)
    assert code == 0, err
    assert not (data / "splits" / "test.txt").exists() and not (data / "splits" / "val.txt").exists()


def test_ctrl_c_says_how_to_resume(capsys, tmp_path, monkeypatch):
    import shlex

    import semiseg.trainer as trainer_module

    run = tmp_path / "my run"
    original = trainer_module.Trainer.train_step

    def interrupted(self, batch, info):
        if info.step == 3:
            raise KeyboardInterrupt
        return original(self, batch, info)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", interrupted)
    args = ["train", *sets(tiny_overrides(iters=4)), "--run-dir", run]
    code, _, err = run_cli(args, capsys)
    assert code == 130
    (line,) = [x for x in err.splitlines() if x.strip()]
    assert line.startswith("interrupted: stopped at step 3 of 4;") and "holds step 2" in line
    command = line.split("Continue with: ", 1)[1]
    assert command == f"semiseg train --resume {shlex.quote(str(run))}"
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    code, out, err = run_cli(shlex.split(command)[1:], capsys)  # exactly the command it printed
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["steps"] == 4

    def at_once(self, batch, info):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "train_step", at_once)
    code, _, err = run_cli(["train", *sets(tiny_overrides(iters=4)), "--run-dir", tmp_path / "r2"], capsys)
    assert code == 130 and "before the first checkpoint: nothing to resume" in err


def test_startup_line(capsys, tmp_path, data):
    _, out, _ = train_ok(capsys, tmp_path, folder_args(data))
    line = next(line for line in out.splitlines() if line.startswith("semiseg: run "))
    for part in (
        "device cpu",
        "1 thread(s)",
        "4 labeled / 6 unlabeled / 0 val / 0 test images",
        "files checked",
    ):
        assert part in line, line


# ------------------------------------------------------------------ eval / predict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    root = write_folder_dataset(base / "data")
    run = base / "run"
    args = ["train", *folder_args(root), "--run-dir", run]
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        os.chdir(cwd)
    return root, run


def test_predict_checks_every_image_before_writing(capsys, tmp_path, trained):
    root, run = trained
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.open(root / "unlabeled" / "u00.png").save(src / f"ok{i}.png")
    (src / "notes.txt").write_text("not an image")
    Image.open(root / "unlabeled" / "u01.png").save(src / "zz_bad.png")
    truncate(src / "zz_bad.png")
    out = tmp_path / "out"
    expect_error(capsys, ["predict", run, src, out], "zz_bad.png")
    assert not out.exists()  # nothing written, not even the folder
    (src / "zz_bad.png").unlink()
    code, stdout, err = run_cli(["predict", run, src, out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "skipped 1 file(s)" in err and "notes.txt" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"ok{i}_{kind}.png" for i in range(3) for kind in ("mask", "overlay")
    )


def test_predict_non_utf8_name(capsys, tmp_path, trained):
    root, run = trained
    src = tmp_path / "in"
    src.mkdir()
    name = os.fsdecode(b"r\xe9sultat.png")
    try:
        Image.open(root / "unlabeled" / "u00.png").save(src / name)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    code, _, err = run_cli(["predict", run / "latest.pt", src, tmp_path / "out"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / os.fsdecode(b"r\xe9sultat_mask.png")).is_file()  # the input's bytes


def test_predict_into_a_path_under_a_file(capsys, tmp_path, trained):
    root, run = trained
    (tmp_path / "file").write_text("x")
    expect_error(capsys, ["predict", run, root / "unlabeled", tmp_path / "file" / "out"], "is a file")


def test_eval_from_another_folder_suggests_data_root(capsys, tmp_path, trained):
    _, run = trained
    line = expect_error(capsys, ["eval", run, "--set", "data.root=data", "--split", "labeled"], "data.root")
    assert "--set data.root=" in line and "perhaps" in line


def test_device_option(capsys, tmp_path, trained):
    root, run = trained
    code, out, err = run_cli(["eval", run, "--device", "cpu", "--split", "labeled"], capsys)
    assert code == 0, err
    expect_error(capsys, ["eval", run, "--device", "tpu"], "--device tpu")
    if not torch.cuda.is_available():
        expect_error(capsys, ["eval", run, "--device", "cuda"], "CUDA is not available")


def test_second_eval_does_not_overwrite_the_first(capsys, tmp_path, trained):
    root, run = trained
    out = tmp_path / "eval.json"
    args = ["eval", run, "--split", "labeled", "--out", out]
    assert run_cli(args, capsys)[0] == 0
    first = out.read_text()
    expect_error(capsys, args, str(out), "exists", "--overwrite", "--out")
    assert out.read_text() == first
    code, stdout, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0 and f"wrote {out}" in stdout, err


def test_refusals_to_replace_outputs_use_each_interface_s_wording(capsys, tmp_path, trained):
    """The CLI says --overwrite, Python says overwrite=True; never both."""
    from semiseg.data.folder import write_split
    from semiseg.errors import OutputExistsError
    from semiseg.export import export_model

    root, run = trained
    export = tmp_path / "export"
    assert run_cli(["export", run, export], capsys)[0] == 0
    line = expect_error(capsys, ["export", run, export], "model.safetensors", "pass --overwrite")
    assert "overwrite=True" not in line
    with pytest.raises(OutputExistsError, match="pass overwrite=True") as exc:
        export_model(run, export)
    assert "--overwrite" not in str(exc.value)
    data = write_folder_dataset(tmp_path / "data")
    write_split(data, labeled=2, seed=0)
    line = expect_error(capsys, ["data", "split", data, "--labeled", "2"], "labeled.txt", "pass --overwrite")
    assert "overwrite=True" not in line
    with pytest.raises(OutputExistsError, match="pass overwrite=True"):
        write_split(data, labeled=2, seed=0)
    out = tmp_path / "pred"
    assert run_cli(["predict", run, root / "unlabeled", out], capsys)[0] == 0
    line = expect_error(capsys, ["predict", run, root / "unlabeled", out], "_mask.png", "pass --overwrite")
    assert "overwrite=True" not in line
