"""Shared test helpers: tiny, fast configurations and paths."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NO_SHARED = "../shared/data not present: real-data tests need the shared datasets beside the repo"


def tiny_overrides(iters: int = 4, **extra: object) -> list[str]:
    """A synthetic run that takes about a second on 2 CPU cores."""
    values: dict[str, object] = {
        "data.name": "synthetic",
        "data.synthetic.size": 40,
        "data.synthetic.num_labeled_pool": 8,
        "data.synthetic.num_val": 2,
        "data.synthetic.num_test": 3,
        "data.labeled": 0.5,
        "data.crop_size": 32,
        "data.batch_size": 2,
        "data.unlabeled_batch_size": 2,
        "model.widths": "[4, 8, 16, 32, 64]",
        "train.iters": iters,
        "train.log_every": 1,
        "train.ckpt_every": 2,
        "train.progress": "none",
        "train.threads": 1,
        "eval.size_divisor": 16,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def write_folder_dataset(
    root: Path,
    n: int = 8,
    size: tuple[int, int] = (32, 40),
    num_classes: int = 3,
    channels: int = 3,
    unlabeled: int = 2,
    seed: int = 0,
) -> Path:
    """A tiny custom-folder dataset: images/, masks/, unlabeled/, classes.yaml."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "unlabeled").mkdir()
    mode = "RGB" if channels == 3 else "L"
    shape = (h, w, 3) if channels == 3 else (h, w)
    for i in range(n):
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 1
        if num_classes > 2:
            mask[h // 2 :, w // 2 :] = 2
        image = (rng.random(shape) * 80 + (mask * 60 if channels == 1 else mask[..., None] * 60)).astype(
            np.uint8
        )
        Image.fromarray(image, mode).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask, "L").save(root / "masks" / f"img{i:02d}.png")
    for i in range(unlabeled):
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(
            root / "unlabeled" / f"u{i:02d}.png"
        )
    names = ["background", "square", "corner"][:num_classes]
    (root / "classes.yaml").write_text("names: [" + ", ".join(names) + "]\n")
    return root


# ----------------------------------------------------------------------------------------------
# The command line, in-process
# ----------------------------------------------------------------------------------------------


def run_cli(args, capsys):
    """``semiseg <args>`` in-process: ``(exit code, stdout, stderr)``."""
    from semiseg.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def sets(overrides):
    """``--set`` arguments for config overrides."""
    return [x for o in overrides for x in ("--set", o)]


def expect_error(capsys, args, *needles):
    """A user error: exit status 2 and exactly one ``error: ...`` line holding every needle."""
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Training steps and interrupted runs
# ----------------------------------------------------------------------------------------------


def trainer_step(method, batch, step: int, total: int = 10):
    """What the trainer does with a step's losses (segmenter SGD, extra optimizers, schedulers, EMA)."""
    import torch

    from semiseg.methods import StepInfo

    opt = torch.optim.SGD(method.model.parameters(), lr=0.01)
    info = StepInfo(step, total)
    losses = method.training_step(batch, info)
    opt.zero_grad()
    losses["total"].backward()
    opt.step()
    for name, extra in method.extra_optimizers().items():
        extra.zero_grad()
        losses[f"total/{name}"].backward()
        extra.step()
    for fn in method.extra_schedulers().values():
        fn(step)
    method.after_step(info)
    return losses


class Interrupt(Exception):
    """Raised by :func:`fit_interrupted` in place of a training step, as a killed process would stop."""


def fit_interrupted(trainer, monkeypatch, at_step: int = 3) -> None:
    """``trainer.fit()`` stopped when step ``at_step`` is about to run (its checkpoints so far kept)."""
    import pytest

    original = trainer.train_step

    def stop(batch, info):
        if info.step == at_step:
            raise Interrupt
        return original(batch, info)

    monkeypatch.setattr(trainer, "train_step", stop)
    with pytest.raises(Interrupt):
        trainer.fit()
