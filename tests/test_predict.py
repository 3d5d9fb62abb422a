"""Folder prediction (masks at the original size, overlays, no silent overwrite) and visualisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from semiseg.config import DataConfig, EvalConfig
from semiseg.data.base import default_palette
from semiseg.errors import DataError
from semiseg.predict import predict_folder
from semiseg.visualize import IGNORE_COLOR, colorize, legend_patches, overlay, save_png

NAMES = ["background", "vessel", "lesion"]
PALETTE = default_palette(3)


class ChannelThreshold(nn.Module):
    """Class 1 where normalised channel 0 > 0, else 0 (class 2 never predicted). Records input sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        self.modes.append(self.training)
        fg = (x[:, :1] > 0).float()
        return torch.cat([1 - fg, fg, torch.zeros_like(fg)], 1)


def half_split_image(h: int, w: int) -> np.ndarray:
    """RGB image: dark left half, bright right half."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:, w // 2 :] = 230
    return img


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(half_split_image(40, 60)).save(src / "a.png")
    Image.fromarray(half_split_image(36, 24)).save(src / "b.jpg", quality=100)
    (src / "notes.txt").write_text("not an image")
    return src


def run(folder, out, **kw):
    model = kw.pop("model", None) or ChannelThreshold()
    data = kw.pop("data", None) or DataConfig(resize=0.5)
    eval_cfg = kw.pop("eval_cfg", None) or EvalConfig(mode="whole", size_divisor=8)
    in_channels = kw.pop("in_channels", 3)
    paths = predict_folder(model, folder, out, data, eval_cfg, NAMES, PALETTE, in_channels, "cpu", **kw)
    return model, paths


def test_predict_folder_writes_masks_at_original_size(folder, tmp_path):
    out = tmp_path / "out"
    model, paths = run(folder, out)
    assert [p.name for p in paths] == ["a_mask.png", "a_overlay.png", "b_mask.png", "b_overlay.png"]
    assert model.sizes == [(24, 32), (24, 16)]  # resized ×0.5 (20×30, 18×12) then padded to ×8
    for stem, (h, w) in {"a": (40, 60), "b": (36, 24)}.items():
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "L" and mask.size == (w, h)
        expected = np.zeros((h, w), dtype=np.uint8)
        expected[:, w // 2 :] = 1
        np.testing.assert_array_equal(np.asarray(mask), expected)
        ov = Image.open(out / f"{stem}_overlay.png")
        assert ov.mode == "RGB" and ov.size == (w, h)
        ov_arr = np.asarray(ov)
        assert (ov_arr[:, : w // 2] == 0).all()  # dark background, not tinted
        right = ov_arr[:, w // 2 :].reshape(-1, 3)
        assert not (right == right[:, :1]).all()  # tinted with the vessel colour (not grey)


def test_predict_folder_sliding_and_long_side(folder, tmp_path):
    model, paths = run(
        folder,
        tmp_path / "out",
        data=DataConfig(long_side=30),
        eval_cfg=EvalConfig(mode="sliding", window=16, overlap=0.5),
    )
    assert len(paths) == 4 and all(s == (16, 16) for s in model.sizes)
    mask = np.asarray(Image.open(tmp_path / "out" / "a_mask.png"))
    assert mask.shape == (40, 60) and (mask[:, :30] == 0).all() and (mask[:, 30:] == 1).all()


def test_no_overwrite_unless_asked(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "b_overlay.png"
    existing.write_bytes(b"keep me")
    with pytest.raises(DataError, match="b_overlay.png"):
        run(folder, out)
    assert existing.read_bytes() == b"keep me"
    assert not (out / "a_mask.png").exists()  # checked before anything was written
    _, paths = run(folder, out, overwrite=True)
    assert len(paths) == 4 and Image.open(existing).size == (24, 36)


def test_model_state_restored(folder, tmp_path):
    model = ChannelThreshold().train()
    run(folder, tmp_path / "out", model=model)
    assert model.training and model.modes == [False, False]


def test_empty_folder_raises(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(DataError, match="empty.*no images"):
        run(empty, tmp_path / "out")


def test_wrong_channel_count_names_file(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(src / "grey.png")
    with pytest.raises(DataError, match=r"grey\.png.*1 channel"):
        run(src, tmp_path / "out")


def test_colliding_stems_raise(folder, tmp_path):
    Image.fromarray(half_split_image(8, 8)).save(folder / "a.bmp")
    with pytest.raises(DataError, match=r"a\.png: same name stem as .*a\.bmp"):
        run(folder, tmp_path / "out")


# ----------------------------------------------------------------------------- visualize


def test_colorize():
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    rgb = colorize(mask, PALETTE)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert (
        tuple(rgb[0, 0]) == PALETTE[0] and tuple(rgb[0, 1]) == PALETTE[1] and tuple(rgb[1, 0]) == PALETTE[2]
    )
    assert tuple(rgb[1, 1]) == IGNORE_COLOR
    assert tuple(colorize(mask, PALETTE, ignore_color=(1, 2, 3))[1, 1]) == (1, 2, 3)
    with pytest.raises(ValueError, match="value 3"):
        colorize(np.array([[3]], dtype=np.uint8), PALETTE)


def test_overlay_greyscale_and_untinted_background():
    image = np.full((2, 3, 1), 0.5, dtype=np.float32)
    mask = np.array([[0, 1, 255], [2, 0, 1]], dtype=np.uint8)
    out = overlay(image, mask, [(0, 0, 0), (255, 0, 0), (0, 0, 255)], alpha=0.5)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    grey = (128, 128, 128)
    assert tuple(out[0, 0]) == grey and tuple(out[1, 1]) == grey and tuple(out[0, 2]) == grey
    assert tuple(out[0, 1]) == (191, 64, 64)  # 0.5·0.5 + 0.5·1 = 0.75 -> 191
    assert tuple(out[1, 0]) == (64, 64, 191)
    rgb = overlay(np.zeros((2, 3, 3)), mask, PALETTE, alpha=1.0)
    np.testing.assert_array_equal(rgb[0, 1], PALETTE[1])


def test_save_png_roundtrip(tmp_path):
    mask = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    p = save_png(mask, tmp_path / "sub" / "m.png")
    img = Image.open(p)
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), mask)
    rgb = colorize(mask, PALETTE)
    img = Image.open(save_png(rgb, tmp_path / "c.png"))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb)
    with pytest.raises(ValueError, match="uint8"):
        save_png(mask.astype(np.float32), tmp_path / "x.png")


def test_legend_patches():
    patches = legend_patches(NAMES, PALETTE)
    assert [p.get_label() for p in patches] == NAMES
    assert patches[1].get_facecolor()[:3] == pytest.approx(tuple(v / 255 for v in PALETTE[1]))


# ----------------------------------------------------------------------------- mask formats


@pytest.mark.parametrize("fmt", ["index", "visible", "color"])
def test_mask_formats(folder, tmp_path, fmt):
    """``index`` (default) holds class indices, ``visible`` spreads them over 0..255, ``color`` is a
    palette PNG in the dataset's colours whose values are still the class indices."""
    out = tmp_path / fmt
    kwargs = {} if fmt == "index" else {"mask_format": fmt}
    run(folder, out, **kwargs)
    img = Image.open(out / "a_mask.png")
    values = np.asarray(img)
    left, right = values[:, :30], values[:, 30:]
    if fmt == "index":
        assert img.mode == "L" and (left == 0).all() and (right == 1).all()
    elif fmt == "visible":  # 3 classes: class c -> c * 127
        assert img.mode == "L" and (left == 0).all() and (right == 127).all()
    else:
        assert img.mode == "P" and (left == 0).all() and (right == 1).all()
        rgb = np.asarray(img.convert("RGB"))
        assert tuple(rgb[0, 59]) == PALETTE[1] and tuple(rgb[0, 0]) == PALETTE[0]


def test_mask_format_choice_is_checked(folder, tmp_path):
    from semiseg.errors import SemisegError
    from semiseg.predict import mask_image

    with pytest.raises(SemisegError, match="mask_format"):
        run(folder, tmp_path / "out", mask_format="jpeg")
    assert not (tmp_path / "out").exists()
    two = mask_image(np.array([[0, 1]], np.uint8), 2, PALETTE, "visible")
    assert np.asarray(two).tolist() == [[0, 255]]


# ----------------------------------------------------------------------------- volumes (.h5)


def write_h5(path, **arrays):
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)


def half_split_volume(depth: int, h: int, w: int) -> np.ndarray:
    """Float volume in [0, 1]: dark left half, bright right half on every slice (slice 0 all dark)."""
    vol = np.zeros((depth, h, w), dtype=np.float32)
    vol[1:, :, w // 2 :] = 0.9
    return vol


def test_predict_folder_h5_volume_and_slice(tmp_path):
    import h5py
    from scipy import ndimage

    src = tmp_path / "in"
    src.mkdir()
    write_h5(src / "case1.h5", image=half_split_volume(3, 20, 30), label=np.zeros((3, 20, 30), np.uint8))
    write_h5(src / "single.h5", image=half_split_volume(2, 12, 8)[1])
    out = tmp_path / "out"
    model, paths = run(src, out, data=DataConfig(size=[16, 16]), in_channels=1)
    names = ["case1_mask.h5", "case1_overlay.png", "single_mask.h5", "single_overlay.png"]
    assert [p.name for p in paths] == names
    assert set(model.sizes) == {(16, 16)}  # every slice at the model's input size
    with h5py.File(out / "case1_mask.h5") as f:
        labels = f["label"][()]
    # at 16×16 the right half is class 1; back at 20×30 by SSL4MIS's scipy zoom(order=0), whose
    # last column falls just outside the source grid at this size and reads as background
    at_input = np.zeros((16, 16), np.uint8)
    at_input[:, 8:] = 1
    expected = np.stack(
        [np.zeros((20, 30), np.uint8)] + [ndimage.zoom(at_input, (20 / 16, 30 / 16), order=0)] * 2
    )
    assert expected[1, :, 15:29].all() and not expected[1, :, 29].any()
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    with h5py.File(out / "single_mask.h5") as f:
        np.testing.assert_array_equal(f["label"][()], np.repeat([[0] * 4 + [1] * 4], 12, axis=0))
    montage_img = np.asarray(Image.open(out / "case1_overlay.png"))
    assert montage_img.shape == (2 * 20 + 2, 2 * 30 + 2, 3)  # 3 slices on a 2×2 grid, 2-pixel gaps
    np.testing.assert_array_equal(montage_img[:20, :30], 0)  # slice 0: dark, nothing predicted
    assert not (montage_img[22:42, 15:30] == montage_img[22:42, 15:30, :1]).all()  # slice 2 tinted


def test_predicted_volume_mask_is_what_volume_evaluation_scores(tmp_path):
    """The written mask, read back by the "h5" reader as the label, scores Dice 1 on every class."""
    from semiseg.data.base import Record
    from semiseg.evaluate import evaluate

    src = tmp_path / "in"
    src.mkdir()
    write_h5(src / "case1.h5", image=half_split_volume(3, 20, 30))
    data, eval_cfg = DataConfig(size=[16, 16]), EvalConfig(mode="whole", size_divisor=8)
    run(src, tmp_path / "out", data=data, eval_cfg=eval_cfg, in_channels=1)
    mask_file = str(tmp_path / "out" / "case1_mask.h5")
    records = [
        Record(name=f"case1_slice_{k}", image=str(src / "case1.h5"), mask=mask_file, reader="h5", index=k)
        for k in range(3)
    ]
    cm = evaluate(ChannelThreshold(), records, data, eval_cfg, 3, 1, "cpu", unit="volume")
    assert cm.results(NAMES)["dice"]["vessel"] == pytest.approx(1.0)


def test_h5_inputs_are_checked_before_anything_is_written(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_h5(src / "a.h5", image=half_split_volume(2, 8, 8))
    with pytest.raises(DataError, match=r"a\.h5: volume has 1 channel but the model expects 3"):
        run(src, tmp_path / "out")
    write_h5(src / "b.h5", label=np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"b\.h5: cannot read dataset 'image'"):
        run(src, tmp_path / "out", in_channels=1)
    assert not (tmp_path / "out").exists()


def test_montage_places_tiles_row_by_row():
    from semiseg.visualize import montage

    tiles = [np.full((2, 3, 3), v, np.uint8) for v in (10, 20, 30)]
    grid = montage(tiles, gap=1)
    assert grid.shape == (5, 7, 3)
    assert (grid[:2, :3] == 10).all() and (grid[:2, 4:] == 20).all() and (grid[3:, :3] == 30).all()
    assert (grid[3:, 4:] == 0).all() and (grid[2] == 0).all() and (grid[:, 3] == 0).all()
    with pytest.raises(ValueError, match="differ in shape"):
        montage([tiles[0], np.zeros((3, 3, 3), np.uint8)])


# ----------------------------------------------------------------------------- demo overlay figure


def test_prediction_figure_titles_legend_and_same_drawing(tmp_path, monkeypatch):
    """The demo's overlays: panels titled image / ground truth / prediction, a legend of the classes,
    and ground truth and prediction drawn the same way (both over the image)."""
    import semiseg.plots as plots

    figures = []
    real_save = plots._save_as_is
    monkeypatch.setattr(
        plots, "_save_as_is", lambda fig, out, dpi: figures.append(fig) or real_save(fig, out, dpi)
    )
    image = np.random.default_rng(0).random((24, 32, 3)).astype(np.float32)
    mask = np.zeros((24, 32), np.uint8)
    mask[4:12, 4:20] = 1
    mask[14:20, 20:30] = 2
    truth = mask.copy()
    out = plots.prediction_figure(image, truth, mask, NAMES, PALETTE, tmp_path / "o.png", title="x")
    assert Image.open(out).size[0] > 3 * 32
    (fig,) = figures
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["image", "ground truth", "prediction"]
    truth_px, pred_px = (np.asarray(ax.images[0].get_array()) for ax in axes[1:])
    np.testing.assert_array_equal(truth_px, pred_px)  # same mask -> same picture
    np.testing.assert_array_equal(pred_px, overlay(image, mask, PALETTE))  # over the image, not on black
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["vessel", "lesion"]
