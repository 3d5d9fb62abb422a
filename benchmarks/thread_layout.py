"""Grid throughput by thread layout: one process with all the threads, or one process per core.

A grid on a machine with ``--cores`` cores can train one cell at a time with ``--cores`` threads
(``--workers 1``) or ``--cores`` cells at once with one thread each (``--workers N --set
train.threads=1``). What matters for a grid is the aggregate rate — training steps finished per
second over all processes — with data loading included (each process loads its own batches, as a
real cell does). The layouts are timed alternately, ``--rounds`` times each, on the same method and
dataset, each process running ``--steps`` steps after ``--warmup`` untimed ones (at ``--at-step``,
past the recipe's labeled-only warm-up):

    python benchmarks/thread_layout.py --dataset chase_db1 --variant recipe/unimatch --cores 2
        -> benchmarks/results/thread_layout_<dataset>.json and .md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from cell_cost import build, next_batch
from common import write_results

from semiseg.methods import StepInfo


def _worker(args: argparse.Namespace, threads: int, scratch: str, start, out) -> None:
    """Build one trainer, wait for the others, time ``args.steps`` steps (data included)."""
    torch.set_num_threads(threads)
    ns = argparse.Namespace(**{**vars(args), "threads": threads})
    run = build(args.variant, ns, Path(scratch))
    trainer, iters = run["trainer"], run["cfg"].train.iters
    for i in range(args.warmup):
        batch, _ = next_batch(run)
        trainer.train_step(batch, StepInfo(args.at_step + i, iters))
    start.wait()  # every process of the layout starts timing together
    t = time.perf_counter()
    for i in range(args.steps):
        batch, _ = next_batch(run)
        trainer.train_step(batch, StepInfo(args.at_step + args.warmup + i, iters))
    out.put(time.perf_counter() - t)


def run_layout(args: argparse.Namespace, processes: int, threads: int, tag: str) -> float:
    """Aggregate steps per second of ``processes`` concurrent trainers with ``threads`` threads each."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(args, threads, f"{args.scratch}/{tag}_{p}", start, out))
        for p in range(processes)
    ]
    for proc in procs:
        proc.start()
    seconds = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise SystemExit(f"thread_layout: a worker of layout {tag} failed (exit {proc.exitcode})")
    return sum(args.steps / s for s in seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="chase_db1")
    p.add_argument("--protocol", default="cpu_small")
    p.add_argument("--variant", default="recipe/unimatch", help="a method file of configs/methods")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--at-step", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], help="config override for every process")
    p.add_argument("--scratch", default="runs/thread_layout")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    layouts = {
        f"1 process × {args.cores} threads": (1, args.cores),
        f"{args.cores} processes × 1 thread": (args.cores, 1),
    }
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    for r in range(args.rounds):
        for i, (name, (procs, threads)) in enumerate(layouts.items()):
            rates[name].append(run_layout(args, procs, threads, f"r{r}_l{i}"))
            print(f"round {r}: {name}: {rates[name][-1]:.3f} steps/s", flush=True)
    first = next(iter(layouts))
    rows = [
        {
            "layout": name,
            "processes": procs,
            "threads_each": threads,
            "steps_per_s": statistics.median(rates[name]),
            "all_rounds": rates[name],
            "over_first": statistics.median(rates[name]) / statistics.median(rates[first]),
        }
        for name, (procs, threads) in layouts.items()
    ]
    result = {
        "rows": rows,
        "setup": {
            "dataset": args.dataset,
            "variant": args.variant,
            "steps": args.steps,
            "rounds": args.rounds,
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv),
        },
    }
    lines = [
        f"Grid throughput by thread layout, `{args.variant}` on `{args.dataset}` ({args.protocol}), "
        f"{args.steps} steps per process with data loading, medians of {args.rounds} alternated rounds. "
        f"Command: `{result['setup']['command']}`",
        "",
        "| layout | steps / s (all processes) | × first |",
        "|---|---:|---:|",
        *(f"| {r['layout']} | {r['steps_per_s']:.3f} | {r['over_first']:.2f} |" for r in rows),
    ]
    write_results(Path(args.out), f"thread_layout_{args.dataset}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
