"""DDP on CPU: two gloo processes under torchrun train together, agree, and evaluate without
counting any test image twice (odd test count over two ranks)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import tiny_overrides

from semiseg.cli import main


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path, capsys):
    if shutil.which("torchrun") is None and not os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "torchrun")
    ):
        pytest.skip("torchrun not installed")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    run = tmp_path / "ddp"
    overrides = tiny_overrides(iters=4, **{"data.synthetic.num_test": 3, "train.device": "cpu"})
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "semiseg", "train", "--run-dir", str(run)]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((run / "results.json").read_text())
    assert payload["world_size"] == 2
    ddp_test = payload["results"]["test"]

    # The same checkpoint evaluated by one process gives the same confusion matrix.
    assert main(["eval", str(run / "latest.pt"), "--out", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()
    single = json.loads((tmp_path / "single.json").read_text())
    assert single["confusion"] == ddp_test["confusion"]
    assert sum(map(sum, single["confusion"])) == 3 * 40 * 40


@pytest.mark.slow
def test_torchrun_adaptive_pseudo_labels(tmp_path):
    """The recipe's running statistics are all-reduced: two gloo ranks of UniMatch + SupMix + SUFD +
    MPMC (its head outside DDP, stepped on total's gradient averaged by hand) with FreeMatch masks on
    aligned predictions train to the same weights (the trainer checks)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed")
    run = tmp_path / "ddp_recipe"
    overrides = tiny_overrides(
        iters=3,
        **{
            "train.device": "cpu",
            "method.name": "unimatch",
            "method.mix": "supmix",
            "plugins.sufd": "{}",
            "plugins.mpmc": "{}",
            "method.warmup_iters": 1,
            "method.pseudo.mask": "freematch",
            "method.pseudo.align": "labeled_prior",
        },
    )
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "semiseg", "train", "--run-dir", str(run)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("pl_used/1" in r for r in logged)
    assert any("mpmc/loss_u" in r for r in logged) and any("mpmc/loss_l" in r for r in logged)


def _log_different_keys(rank: int, world: int, init_file: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from semiseg.distributed import all_reduce_mean

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    per_class = {"pl_right/1": 0.5} if rank == 0 else {"pl_right/2": 0.25}
    values = {"loss": 1.0 + rank, **per_class}
    reduced = all_reduce_mean(values, torch.device("cpu"))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(reduced, fh)
    dist.destroy_process_group()


def test_ranks_logging_different_keys_average_each_key_over_the_ranks_that_logged_it(tmp_path):
    """A per-class diagnostic logged on one rank only (its class absent from the other rank's
    batches) must neither hang nor mis-align the all-reduce of the logs."""
    import torch.multiprocessing as mp

    out = tmp_path / "reduced.json"
    mp.spawn(_log_different_keys, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    assert json.loads(out.read_text()) == {"loss": 1.5, "pl_right/1": 0.5, "pl_right/2": 0.25}
