"""Where a whole grid cell's time goes, per method variant, measured side by side in one run.

For each variant (a method file of ``configs/methods``, optionally with overrides:
``unimatch@train.channels_last=true``) at ``--protocol`` (default cpu-small) on ``--dataset``:

* **step**: the trainer's training step on a freshly loaded batch (forward, losses, backward,
  optimizer steps, plug-in steps); **floor**: the raw forward+backward of the network passes the
  method needs on the same batch (benchmarks/step_cost.py); **data**: loading and augmenting that
  batch (``data.num_workers`` as configured: 0 = on the critical path). Variants are interleaved
  round by round so machine noise hits them alike; medians are reported.
* **eval**: one final evaluation of the test split (whole images, the protocol's metrics);
  **checkpoint**: one atomic ``latest.pt`` write; **memory**: peak memory of three steps in a fresh
  process (step_cost.py's method).
* **cell estimate** = iters × (step + data) + evaluation + iters / ckpt_every × checkpoint, as a
  ratio to iters × floor (the compute floor of the cell).
* with ``--cell-iters N``, a real cell of N iterations (``Trainer.fit``: data, steps, checkpoints,
  final evaluation) is timed too, and its wall time is compared with N × floor + evaluation.

    python benchmarks/cell_cost.py --dataset chase_db1 --variants unimatch \\
        unimatch@train.channels_last=true --rounds 8 --cell-iters 100
        -> benchmarks/results/cell_cost_<dataset>[_<tag>].json and .md
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from step_cost import floor_step, method_config, passes_for, peak_memory, write_results

from semiseg.checkpoint import atomic_save
from semiseg.data.datasets import make_batch
from semiseg.methods import StepInfo
from semiseg.trainer import Trainer


def build(spec: str, args, scratch: Path) -> dict:
    extra = [f"train.threads={args.threads}", *args.set]
    cfg = method_config(spec, args.dataset, extra, iters=None, protocol=args.protocol)
    trainer = Trainer(cfg, scratch)
    labeled, unlabeled = trainer._data_iterators()
    trainer.method.train()
    return {"cfg": cfg, "trainer": trainer, "labeled": labeled, "unlabeled": unlabeled}


def warm_image_cache(runners: dict) -> None:
    """Read every training image once, so no variant pays the per-process image cache's misses
    (decode + resize) inside the timed rounds (they share one process and the same batches)."""
    for run in runners.values():
        for stream in (run["labeled"], run["unlabeled"]):
            if stream is not None:
                for index in range(len(stream.dataset)):
                    stream.dataset._read(index)


def next_batch(r: dict):
    t = time.perf_counter()
    batch = make_batch(next(r["labeled"]), next(r["unlabeled"]) if r["unlabeled"] else None)
    return batch.to(r["trainer"].device), time.perf_counter() - t


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    runners = {v: build(v, args, scratch / f"v{i}") for i, v in enumerate(args.variants)}
    warm_image_cache(runners)
    samples: dict[str, dict[str, list[float]]] = {v: {"step": [], "floor": [], "data": []} for v in runners}
    for r in range(args.warmup + args.rounds):
        for spec, run in runners.items():
            batch, data_s = next_batch(run)
            trainer = run["trainer"]
            t = time.perf_counter()
            trainer.train_step(batch, StepInfo(args.at_step + r, run["cfg"].train.iters))
            step_s = time.perf_counter() - t
            t = time.perf_counter()
            floor_step(trainer, batch, passes_for(spec))
            floor_s = time.perf_counter() - t
            if r >= args.warmup:
                for key, value in (("step", step_s), ("floor", floor_s), ("data", data_s)):
                    samples[spec][key].append(value)
    rows = []
    for i, (spec, run) in enumerate(runners.items()):
        trainer, cfg = run["trainer"], run["cfg"]
        t = time.perf_counter()
        trainer.evaluate_split("test")
        eval_s = time.perf_counter() - t
        t = time.perf_counter()
        atomic_save(trainer.checkpoint_state(), scratch / f"ckpt{i}.pt")
        ckpt_s = time.perf_counter() - t
        med = {k: statistics.median(v) for k, v in samples[spec].items()}
        iters = cfg.train.iters
        estimate = iters * (med["step"] + med["data"]) + eval_s + iters // cfg.train.ckpt_every * ckpt_s
        rows.append(
            {
                "variant": spec,
                "iters": iters,
                "step_s": med["step"],
                "floor_s": med["floor"],
                "data_s": med["data"],
                "eval_s": eval_s,
                "ckpt_s": ckpt_s,
                "cell_estimate_s": estimate,
                "cell_estimate_over_floor": estimate / (iters * med["floor"]),
                "step_over_floor": med["step"] / med["floor"],
                "step_memory_mb": peak_memory(spec, args) if args.memory else None,
            }
        )
        run["labeled"].close()
        if run["unlabeled"]:
            run["unlabeled"].close()
    ref = rows[0]["step_s"]
    for row in rows:
        row["step_over_first"] = row["step_s"] / ref
    if args.cell_iters:
        for row in rows:
            row.update(real_cell(row, args, scratch))
    return {"rows": rows, "rounds": args.rounds, "warmup": args.warmup}


def real_cell(row: dict, args, scratch: Path) -> dict:
    """Time ``Trainer.fit`` for ``--cell-iters`` iterations (data, steps, checkpoints, evaluation)."""
    n = args.cell_iters
    extra = [f"train.threads={args.threads}", f"train.iters={n}", *args.set]
    cfg = method_config(row["variant"], args.dataset, extra, iters=None, protocol=args.protocol)
    run_dir = scratch / f"cell_{len(list(scratch.glob('cell_*')))}"
    t = time.perf_counter()
    Trainer(cfg, run_dir).fit()
    wall = time.perf_counter() - t
    return {
        "cell_iters": n,
        "cell_wall_s": wall,
        "cell_wall_over_floor": wall / (n * row["floor_s"]),
        "cell_wall_over_floor_plus_eval": wall / (n * row["floor_s"] + row["eval_s"]),
    }


def to_markdown(result: dict, header: str) -> str:
    real = "cell_wall_s" in result["rows"][0]
    lines = [
        header,
        "",
        "| variant | step (s) | floor (s) | step × floor | × first | data (s/step) | eval (s) "
        "| checkpoint (s) | cell estimate (min) | estimate × floor | memory (MB)"
        + (" | real cell (s) | real × (floor + eval) |" if real else " |"),
        "|---|" + "---:|" * (10 + (2 if real else 0)),
    ]
    for r in result["rows"]:
        mem = f"{r['step_memory_mb']:.0f}" if r["step_memory_mb"] is not None else "–"
        line = (
            f"| `{r['variant']}` | {r['step_s']:.3f} | {r['floor_s']:.3f} | {r['step_over_floor']:.2f} "
            f"| {r['step_over_first']:.2f} | {r['data_s']:.3f} | {r['eval_s']:.2f} | {r['ckpt_s']:.3f} "
            f"| {r['cell_estimate_s'] / 60:.1f} | {r['cell_estimate_over_floor']:.2f} | {mem} |"
        )
        if real:
            line += f" {r['cell_wall_s']:.1f} | {r['cell_wall_over_floor_plus_eval']:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="chase_db1")
    p.add_argument("--protocol", default="cpu_small", help="configs/protocols/<name>.yaml")
    p.add_argument("--variants", nargs="+", default=["unimatch", "unimatch@train.channels_last=true"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cell-iters", type=int, default=0, help="also time a real cell of N iterations")
    p.add_argument(
        "--at-step", type=int, default=0, help="timed steps pretend to be at this step (past warm-ups)"
    )
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--set", action="append", default=[], help="config override for every variant")
    p.add_argument("--scratch", default="runs/cell_cost")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result files")
    args = p.parse_args()
    shutil.rmtree(args.scratch, ignore_errors=True)
    result = measure(args)
    result["setup"] = {
        "dataset": args.dataset,
        "threads": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }
    name = f"cell_cost_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    header = (
        f"Cell cost on `{args.dataset}` ({args.protocol}, {args.threads} thread(s), "
        f"{result['setup']['device']}); "
        f"medians of {args.rounds} interleaved rounds. Command: `{result['setup']['command']}`"
    )
    write_results(Path(args.out), name, result, to_markdown(result, header))


if __name__ == "__main__":
    main()
