"""Per-step cost of every method, as ratios measured in one run (DESIGN §5 "Speed").

For each method the *step* is what the trainer does per iteration on a fixed, pre-loaded batch
(the method's training_step, backward, optimizer steps, after_step) — data loading excluded. The
*floor* is the raw forward+backward of the network passes that method needs on the same model,
batch and crop, with nothing else (no augmentation, mixing, pseudo-labelling or losses beyond a
plain sum). Methods are timed in interleaved rounds (A B C … A B C …) so machine noise hits all of
them alike; the median per method is reported, as a ratio to its own floor and to UniMatch.
*Step memory* is the peak memory of three training steps above what the process held before them,
in a separate process per method: resident set size sampled every 2 ms on CPU,
``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/step_cost.py --dataset chase_db1 --rounds 15
        -> benchmarks/results/step_cost_<dataset>.json and .md   (``--tag t``: step_cost_<dataset>_t)

BCP runs two stages; ``bcp@method.stage1_iters=0`` times its stage-2 step (every timed step is past
the boundary) and ``bcp@method.stage1_iters=1.0`` its stage-1 step.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import method_config, split_variant, write_results

from semiseg.data.datasets import make_batch
from semiseg.methods import StepInfo
from semiseg.trainer import Trainer

METHODS = [
    "supervised",
    "fixmatch",
    "unimatch",
    "unimatch_classmix",
    "unimatch_supmix",
    "unimatch_sufd",
    "unimatch_supmix_sufd",
    "mean_teacher",
]


def passes_for(spec: str) -> list[tuple[str, str]]:
    """(kind, batch part) of the network passes a method needs; kind: grad | nograd | grad_fp."""
    method, overrides = split_variant(spec)
    if method == "supervised":
        return [("grad", "l")]
    if method.startswith("bcp"):  # teacher on the weak views, the student on two mixed halves
        if "method.stage1_iters=1.0" in overrides:
            return [("grad", "l/2")]  # stage 1: one mixed half of the labeled batch
        return [("nograd", "u"), ("grad", "l/2"), ("grad", "l/2")]
    if method.startswith("mean_teacher"):
        return [("nograd", "u"), ("grad", "l+u")]
    if method.startswith("fixmatch"):
        return [("nograd", "u"), ("grad", "l+u"), ("grad", "u")]
    return [("nograd", "u"), ("grad_fp", "l+u"), ("grad", "2u")]  # UniMatch and its variants


def floor_step(trainer: Trainer, batch, passes) -> None:
    model = trainer.model
    parts = {
        "l": lambda: batch.x_l,
        "l/2": lambda: batch.x_l[: batch.x_l.shape[0] // 2],
        "u": lambda: batch.x_w,
        "l+u": lambda: torch.cat((batch.x_l, batch.x_w)),
        "2u": lambda: torch.cat((batch.x_s1, batch.x_s2)),
    }
    total = 0.0
    for kind, part in passes:
        x = parts[part]()
        if kind == "nograd":
            with torch.no_grad():
                model(x)
        elif kind == "grad_fp":
            out = model(x, fp_from=batch.x_l.shape[0])
            total = total + out.logits.float().mean() + out.logits_fp.float().mean()
        else:
            total = total + model(x).float().mean()
    trainer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    trainer.optimizer.step()


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    runners = {}
    for method in args.methods:
        cfg = method_config(method, args.dataset, args.set, protocol=args.protocol)
        trainer = Trainer(cfg, Path(args.scratch) / f"{method}")
        labeled, unlabeled = trainer._data_iterators()
        batch = make_batch(next(labeled), next(unlabeled) if unlabeled else None).to(trainer.device)
        trainer.method.train()
        runners[method] = (trainer, batch)
        labeled.close()
        if unlabeled:
            unlabeled.close()
    times = {m: [] for m in args.methods}
    floors = {m: [] for m in args.methods}
    for r in range(args.warmup + args.rounds):
        for method in args.methods:
            trainer, batch = runners[method]
            t = time.perf_counter()
            trainer.train_step(batch, StepInfo(r, 1000))
            step = time.perf_counter() - t
            t = time.perf_counter()
            floor_step(trainer, batch, passes_for(method))
            floor = time.perf_counter() - t
            if r >= args.warmup:
                times[method].append(step)
                floors[method].append(floor)
    median = {m: statistics.median(v) for m, v in times.items()}
    floor = {m: statistics.median(v) for m, v in floors.items()}
    ref = median.get("unimatch")
    rows = []
    for m in args.methods:
        rows.append(
            {
                "method": m,
                "step_s": median[m],
                "floor_s": floor[m],
                "ratio_to_floor": median[m] / floor[m],
                "ratio_to_unimatch": median[m] / ref if ref else None,
                "step_memory_mb": peak_memory(m, args) if args.memory else None,
            }
        )
    return {"rows": rows, "rounds": args.rounds, "warmup": args.warmup}


def peak_memory(method: str, args) -> float:
    """Peak RSS (MB) of a fresh process running 3 steps of ``method``."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--dataset",
        args.dataset,
        "--protocol",
        args.protocol,
        "--threads",
        str(args.threads),
        "--scratch",
        str(Path(args.scratch) / "mem"),
        *sum((["--set", s] for s in args.set), []),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(out)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def child(method: str, args) -> None:
    """Print the peak memory of 3 training steps above the memory held before them."""
    import threading

    torch.set_num_threads(args.threads)
    cfg = method_config(method, args.dataset, args.set, protocol=args.protocol)
    trainer = Trainer(cfg, Path(args.scratch) / method)
    labeled, unlabeled = trainer._data_iterators()
    batch = make_batch(next(labeled), next(unlabeled) if unlabeled else None).to(trainer.device)
    trainer.method.train()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for s in range(3):
        trainer.train_step(batch, StepInfo(s, 1000))
    done.set()
    sampler.join()
    if trainer.device.type == "cuda":
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        print(peak[0] - base)


def to_markdown(result: dict, header: str) -> str:
    lines = [
        header,
        "",
        "| method | step (s) | floor (s) | × floor | × UniMatch | step memory (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        uni = f"{r['ratio_to_unimatch']:.2f}" if r["ratio_to_unimatch"] else "–"
        mem = f"{r['step_memory_mb']:.0f}" if r["step_memory_mb"] else "–"
        lines.append(
            f"| {r['method']} | {r['step_s']:.3f} | {r['floor_s']:.3f} | {r['ratio_to_floor']:.2f} "
            f"| {uni} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset", default="chase_db1", help="configs/datasets/<name>.yaml (run from the repo root)"
    )
    p.add_argument("--protocol", default="cpu_small", help="configs/protocols/<name>.yaml")
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--set", action="append", default=[], help="config override for every method")
    p.add_argument("--scratch", default="runs/step_cost")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="results file suffix: step_cost_<dataset>_<tag>")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    import shutil

    shutil.rmtree(args.scratch, ignore_errors=True)
    result = measure(args)
    cfg = method_config("unimatch", args.dataset, args.set, protocol=args.protocol)
    result["setup"] = {
        "dataset": args.dataset,
        "crop": cfg.data.crop_size,
        "batch_l": cfg.data.batch_size,
        "batch_u": cfg.data.unlabeled_batch_size,
        "model": cfg.model.name,
        "widths": getattr(cfg.model, "widths", None),
        "threads": args.threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }
    s = result["setup"]
    header = (
        f"Step cost on `{args.dataset}` ({args.protocol}: {s['model']} {s['widths']}, crop {s['crop']}, "
        f"batch {s['batch_l']}+{s['batch_u']}, {s['threads']} threads, {s['device']}); medians of "
        f"{args.rounds} interleaved rounds. Command: `{s['command']}`"
    )
    name = f"step_cost_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    write_results(Path(args.out), name, result, to_markdown(result, header))


if __name__ == "__main__":
    main()
