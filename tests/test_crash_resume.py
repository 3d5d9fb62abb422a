"""kill -9 at any moment loses nothing and resumes bit-exactly.

A tiny deterministic CPU run is trained in separate processes that are SIGKILLed at random steps,
before the first checkpoint and in the middle of a checkpoint write; each time the same command
(with ``--resume`` once a checkpoint exists) continues it. The final weights, the logged metrics
(except the throughput ``it/s``) and the test results must equal an uninterrupted run's.

The fast test forks the already-initialised test process (no interpreter start-up per kill), so
the kill points are exact; the slow one starts ``python -m semiseg train`` and kills it from
outside at a random moment, like a user or a scheduler would.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_overrides

from semiseg.checkpoint import load_checkpoint
from semiseg.cli import main

ITERS = 8
OVERRIDES = tiny_overrides(
    iters=ITERS,
    **{"deterministic": True, "train.ckpt_every": 2, "train.log_every": 1, "train.eval_every": 4},
)


def train_args(run: Path, resume: bool) -> list[str]:
    args = ["train", *[x for o in OVERRIDES for x in ("--set", o)], "--run-dir", str(run)]
    return args + (["--resume"] if resume else [])


def can_resume(run: Path) -> bool:
    return (run / "latest.pt").is_file() or (run / "latest.prev.pt").is_file()


def _killed_segment(run: str, resume: bool, at_step: int | None, in_write: int | None) -> None:
    """Child process: train, SIGKILL ourselves at step ``at_step`` (0-based, before it runs) or
    half-way through the ``in_write``-th checkpoint file written by this process."""
    import semiseg.checkpoint as ck
    from semiseg.trainer import Trainer

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if at_step is not None:
        original = Trainer.train_step

        def train_step(self, batch, info):
            if info.step == at_step:
                die()
            return original(self, batch, info)

        Trainer.train_step = train_step
    if in_write is not None:
        real_save, count = ck.torch.save, {"n": 0}

        def save(obj, fh, *args, **kw):
            count["n"] += 1
            if count["n"] < in_write:
                return real_save(obj, fh, *args, **kw)
            import io

            buffer = io.BytesIO()
            real_save(obj, buffer)
            fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            fh.flush()
            die()

        ck.torch.save = save
    os._exit(main(train_args(Path(run), resume)))


def run_killed(run: Path, at_step: int | None = None, in_write: int | None = None) -> None:
    proc = mp.get_context("fork").Process(
        target=_killed_segment, args=(str(run), can_resume(run), at_step, in_write)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, f"segment ended with {proc.exitcode}, not SIGKILL"


def final_record(run: Path) -> tuple[dict, list[dict], dict]:
    """(every tensor of the final checkpoint's method, metrics without it/s, test results)."""
    ckpt = load_checkpoint(run / "latest.pt")
    metrics = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("it/s", None)
        metrics.append(record)
    results = json.loads((run / "results.json").read_text())["results"]
    return ckpt["model"], metrics, results


def assert_identical(a: Path, b: Path) -> None:
    (wa, ma, ra), (wb, mb, rb) = final_record(a), final_record(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert ma == mb
    assert ra == rb


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(run, resume=False)) == 0
    return run


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_at_random_steps_resumes_bit_exactly(tmp_path, capsys, reference):
    rng = random.Random(17)
    run = tmp_path / "run"
    # 1. killed before its first checkpoint: the folder holds only start files; the same command
    #    without --resume replaces it.
    run_killed(run, at_step=rng.randrange(0, 2))
    assert not can_resume(run) and (run / "config.yaml").is_file()
    # 2. killed half-way through a checkpoint write (the 2nd or 3rd file of that segment)
    run_killed(run, in_write=rng.choice([2, 3]))
    assert can_resume(run)
    assert [p for p in run.iterdir() if p.name.endswith(".tmp")]  # the cut temp file is there
    # 3. killed at a random later step
    step = load_checkpoint(run / "latest.pt")["step"]
    run_killed(run, at_step=rng.randrange(step + 1, ITERS))
    # 4. killed right after a checkpoint, before the next step
    step = load_checkpoint(run / "latest.pt")["step"]
    if step + 2 < ITERS:
        run_killed(run, at_step=step + 2 - (step % 2))
    capsys.readouterr()
    assert main(train_args(run, resume=True)) == 0
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert_identical(reference, run)


@pytest.mark.slow
def test_cli_process_killed_from_outside(tmp_path, capsys, reference):
    """``python -m semiseg train`` SIGKILLed from outside at a random moment of its training."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "semiseg", *train_args(run, resume=False)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    target = random.Random(5).randrange(2, ITERS)  # kill once this many steps are logged
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= target:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    if proc.returncode == 0:
        pytest.skip("the run finished before the kill (machine too fast for this schedule)")
    assert proc.returncode == -signal.SIGKILL
    capsys.readouterr()
    assert main(train_args(run, resume=can_resume(run))) == 0
    assert_identical(reference, run)
