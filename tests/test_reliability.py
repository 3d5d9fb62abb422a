"""Checkpoint safety: a kept previous version, damaged checkpoints, pickled code, full
disks; and the run-directory files a resume depends on."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest
import torch
from helpers import run_cli, sets, tiny_overrides

from semiseg import checkpoint as ck
from semiseg.checkpoint import atomic_save, load_checkpoint, previous_path
from semiseg.cli import main
from semiseg.config import load_config
from semiseg.errors import SemisegError
from semiseg.trainer import Trainer, model_state_from_checkpoint, train

OVERRIDES = tiny_overrides(iters=4, **{"train.ckpt_every": 1, "deterministic": True, "train.eval_every": 4})


def weights(run_dir):
    return model_state_from_checkpoint(load_checkpoint(run_dir / "latest.pt"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(load_config(None, OVERRIDES), run)
    return run


class _Stop(Exception):
    pass


def interrupted_at(run, step, overrides=OVERRIDES):
    """Train until step ``step`` (0-based) raises: latest.pt then holds step, latest.prev.pt step - 1."""
    trainer = Trainer(load_config(None, overrides), run)
    original = trainer.train_step

    def stop(batch, info):
        if info.step == step:
            raise _Stop
        return original(batch, info)

    trainer.train_step = stop
    with pytest.raises(_Stop):
        trainer.fit()


def test_previous_checkpoint_is_kept(tmp_path):
    path = tmp_path / "latest.pt"
    for step in (1, 2, 3):
        atomic_save({"model": {}, "step": step}, path)
    assert load_checkpoint(path)["step"] == 3
    assert load_checkpoint(previous_path(path))["step"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {"latest.pt", "latest.prev.pt"}
    atomic_save({"model": {}, "step": 1}, tmp_path / "best.pt")  # only latest.pt keeps a previous one
    atomic_save({"model": {}, "step": 2}, tmp_path / "best.pt")
    assert not (tmp_path / "best.prev.pt").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_latest_resumes_from_previous(tmp_path, capsys, straight, damage):
    run = tmp_path / "run"
    interrupted_at(run, 3)
    latest = run / "latest.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * 100)
    code, out, err = run_cli(["train", *sets(OVERRIDES), "--run-dir", run, "--resume"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "latest.prev.pt" in warnings[0]
    assert "resumed from" in out and "latest.prev.pt at step 2" in out
    assert_same_weights(weights(straight), weights(run))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4]


def test_eval_of_a_run_dir_with_a_damaged_latest(tmp_path, capsys, straight):
    run = tmp_path / "run"
    interrupted_at(run, 3)
    (run / "latest.pt").write_bytes(b"PK\x03\x04 cut short")
    code, out, err = run_cli(["eval", run, "--split", "test", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "warning:" in err and "latest.prev.pt" in err
    line = [x for x in run_cli(["eval", run / "latest.pt"], capsys)[2].splitlines() if x.strip()]
    assert len(line) == 1 and line[0].startswith("error: ") and "latest.pt: cannot load checkpoint" in line[0]


class _WritesAFile:
    """Unpickling this would create a file (if ``torch.load`` ran pickled code)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.target), "code ran"))


def test_crafted_checkpoint_never_runs_code(tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "step": 1, "payload": _WritesAFile(str(marker))}, evil)
    with pytest.raises(SemisegError, match="pickled Python objects"):
        load_checkpoint(evil)
    assert not marker.exists()
    for args in (["eval", evil], ["predict", evil, tmp_path, tmp_path / "out"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "evil.pt" in err
    # as a run's latest.pt, with --resume
    run = tmp_path / "run"
    interrupted_at(run, 2)
    (run / "latest.prev.pt").unlink()
    os.replace(evil, run / "latest.pt")
    code, _, err = run_cli(["train", *sets(OVERRIDES), "--run-dir", run, "--resume"], capsys)
    assert code == 2 and "pickled Python objects" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch, straight):
    run = tmp_path / "run"
    real_fdopen = os.fdopen
    writes = {"n": 0}

    class FullDisk:
        """A file whose writes fail with ENOSPC after a few KB, on the third checkpoint."""

        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            self.written += len(data)
            if writes["n"] == 3 and self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fdopen(fd, mode="r", *args, **kw):
        fh = real_fdopen(fd, mode, *args, **kw)
        if "b" in mode:
            writes["n"] += 1
            return FullDisk(fh)
        return fh

    monkeypatch.setattr(ck.os, "fdopen", fdopen)
    code, _, err = run_cli(["train", *sets(OVERRIDES), "--run-dir", run], capsys)
    monkeypatch.undo()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "latest.pt: cannot write checkpoint (No space left on device)" in lines[0]
    assert "previous version is intact" in lines[0]
    assert load_checkpoint(run / "latest.pt")["step"] == 2  # the third write (step 3) failed
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    code, _, err = run_cli(["train", *sets(OVERRIDES), "--run-dir", run, "--resume"], capsys)
    assert code == 0, err
    assert_same_weights(weights(straight), weights(run))


def test_resume_survives_a_cut_log_line_and_an_unreadable_config(tmp_path, capsys, straight):
    run = tmp_path / "run"
    interrupted_at(run, 3)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "kind": "tr')  # killed mid-line
    (run / "config.yaml").write_text("name: [unclosed\n")
    code, _, err = run_cli(["train", *sets(OVERRIDES), "--run-dir", run, "--resume"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert_same_weights(weights(straight), weights(run))


def test_resume_with_another_config_is_still_refused(tmp_path, capsys):
    run = tmp_path / "run"
    interrupted_at(run, 2)
    other = tiny_overrides(iters=4, **{"train.ckpt_every": 1, "optim.lr": 0.5})
    code, _, err = run_cli(["train", *sets(other), "--run-dir", run, "--resume"], capsys)
    assert code == 2 and "config differs" in err


# ------------------------------------------------------------------ smaller reliability checks


def test_help_has_no_rst_markup(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_eta_without_any_timing_says_so():
    from types import SimpleNamespace

    from semiseg.experiment import eta_text

    todo = [SimpleNamespace(dataset="chase_db1", method=m) for m in ("supervised", "fixmatch")]
    text = eta_text(todo, [])
    assert text.startswith("ETA unknown") and "0.0 h" not in text and "2 cells" in text


def test_loss_curve_with_a_single_logged_point_is_drawn(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from semiseg.plots import plot_training_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 50, "kind": "train", "total": 0.7}) + "\n")
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_training_curves({"demo": metrics}, tmp_path / "curve.png")
    (line,) = figures[0].axes[0].lines
    assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "None", "", " ")
