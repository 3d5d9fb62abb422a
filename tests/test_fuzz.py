"""Fuzzing of the config parser, split files and image / mask readers.

Whatever the input, ``semiseg`` either accepts it or prints exactly one ``error: ...`` line naming
the file or config key and exits with status 2 — never a traceback — and overwrites nothing.
Training itself is replaced by a no-op here (the start, where every input is checked, runs for
real). Example counts stay small so the suite stays fast.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_overrides, write_folder_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from semiseg import trainer as trainer_module
from semiseg.cli import main, one_line

FUZZ = settings(
    max_examples=int(os.environ.get("SEMISEG_FUZZ_EXAMPLES", "30")),  # more for a deeper search
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
KEYS = [
    "seed",
    "name",
    "deterministic",
    "data.name",
    "data.labeled",
    "data.crop_size",
    "data.scale_range",
    "data.resize",
    "data.strong.cutmix_p",
    "model.widths",
    "model.name",
    "optim.lr",
    "optim.momentum",
    "train.iters",
    "train.ckpt_every",
    "eval.overlap",
    "method.name",
    "method.threshold",
    "plugins.sufd",
    "plugins",
    "method",
    "train",
]
VALUES = st.one_of(
    st.sampled_from(
        ["1", "-1", "0", "0.5", "1e30", ".nan", ".inf", "-.inf", "null", "true", "[]", "{}", "[1, 2]", "x"]
    ),
    st.sampled_from(["fixmatch", "unimatch", "{a: 1}", "[[1]]", "!!python/object:os.system", "'", "[", "{"]),
    st.text(max_size=12),
)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@FUZZ
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), value=VALUES)
def test_fuzz_config_overrides(capsys, key, value):
    code = main(["config", "show", f"--set={key}={value}"])  # one token, even for a leading "-"
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 2:
        line = one_error_line(err)
        first = key.split("=", 1)[0].strip().split(".")[0]
        assert one_line(first) in line or "override" in line, line


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True), st.text(max_size=8)
)
yaml_trees = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS + ["_base_", "iters", "lr"]), st.text(max_size=5)),
            children,
            max_size=4,
        ),
    ),
    max_leaves=10,
)


@FUZZ
@given(tree=yaml_trees, raw=st.binary(max_size=40), use_raw=st.booleans())
def test_fuzz_config_files(capsys, tree, raw, use_raw):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cfg.yaml"
        text = raw if use_raw else yaml.safe_dump(tree).encode()
        path.write_bytes(text)
        code = main(["config", "show", "--config", str(path)])
        out, err = capsys.readouterr()
        assert code in (0, 2), err
        if code == 2:
            line = one_error_line(err)
            assert "cfg.yaml" in line or ":" in line.split("error: ", 1)[1], line
        assert path.read_bytes() == text  # never rewritten


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("fuzz") / "data", n=6, size=(16, 20), unlabeled=2)


@pytest.fixture
def no_training(monkeypatch):
    """The start (config, data checks, model, run directory checks) runs; training does not."""

    def fit(self):
        return trainer_module.TrainResult(self.run_dir, {}, 0, 0.0)

    monkeypatch.setattr(trainer_module.Trainer, "fit", fit)


def start(root: Path, run: Path, **extra) -> list[str]:
    values = {"data.name": "folder", "data.root": str(root), "data.labeled": 2, **extra}
    return [
        "train",
        *[x for o in tiny_overrides(iters=1, **values) for x in ("--set", o)],
        "--run-dir",
        str(run),
    ]


names = st.sampled_from(
    [f"images/img{i:02d}.png" for i in range(6)] + ["unlabeled/u00.png", "unlabeled/u01.png"]
)
lines = st.one_of(
    names,
    names.map(lambda n: f"./{n}"),
    st.sampled_from(["", "# comment", "  ", "images/missing.png", "images", "../data/images/img00.png"]),
    st.text(max_size=15),
)


@FUZZ
@given(
    files=st.dictionaries(
        st.sampled_from(["labeled", "unlabeled", "val", "test"]),
        st.one_of(st.lists(lines, max_size=6).map(lambda ls: "\n".join(ls).encode()), st.binary(max_size=30)),
        min_size=1,
    )
)
def test_fuzz_split_files(capsys, dataset, no_training, files):
    with tempfile.TemporaryDirectory() as tmp:
        split_dir = Path(tmp) / "splits"
        split_dir.mkdir()
        for part, content in files.items():
            (split_dir / f"{part}.txt").write_bytes(content)
        run = Path(tmp) / "run"
        code = main(start(dataset, run, **{"data.split_dir": str(split_dir)}))
        out, err = capsys.readouterr()
        assert code in (0, 2), err
        if code == 2:
            line = one_error_line(err)
            assert ".txt" in line or "data.split_dir" in line or "method.name" in line, line
            assert not run.exists()
        for part, content in files.items():
            assert (split_dir / f"{part}.txt").read_bytes() == content


def _encoded(kind: str, array: np.ndarray, mode: str, fmt: str, cut: float) -> bytes:
    if kind == "bytes":
        return array.tobytes()[:64]
    buffer = io.BytesIO()
    try:
        Image.fromarray(array, mode).save(buffer, fmt)
    except (ValueError, OSError, TypeError, KeyError):
        return b"\x89PNG\r\n\x1a\n" + array.tobytes()[:32]
    data = buffer.getvalue()
    return data[: max(1, int(len(data) * cut))] if cut < 1 else data


files = st.tuples(
    st.sampled_from(["image", "image", "bytes"]),
    st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "LA", "1"]),
    st.sampled_from(["PNG", "PNG", "JPEG", "BMP", "TIFF"]),
    st.sampled_from([1.0, 1.0, 0.9, 0.5, 0.1]),
    st.sampled_from([(16, 20), (16, 20), (10, 10), (1, 1)]),
    st.integers(0, 2**32 - 1),
    st.sampled_from([3, 255, 65535]),
)


@FUZZ
@given(
    spec=files,
    target=st.sampled_from(["images/img01.png", "masks/img01.png", "unlabeled/u00.png", "masks/img04.png"]),
)
def test_fuzz_image_and_mask_files(capsys, dataset, no_training, tmp_path_factory, spec, target):
    kind, mode, fmt, cut, (h, w), seed, high = spec
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    shape = (h, w, channels) if channels > 1 else (h, w)
    array = rng.integers(0, min(high, np.iinfo(dtype).max) + 1, shape, dtype=dtype)
    if mode == "1":
        array = array > 0
    content = _encoded(kind, array, mode, fmt, cut)
    path = dataset / target
    original = path.read_bytes()
    try:
        path.write_bytes(content)
        run = tmp_path_factory.mktemp("run") / "run"
        code = main(start(dataset, run, **{"data.labeled": 1.0}))
        out, err = capsys.readouterr()
        assert code in (0, 2), err
        if code == 2:
            line = one_error_line(err)
            assert Path(target).name in line, line
            assert not run.exists()
    finally:
        path.write_bytes(original)
