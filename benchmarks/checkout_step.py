"""One method's training step in two (or more) checkouts of semiseg, alternated in one run.

Each *arm* is ``LABEL=CHECKOUT[@override,override]``: a source tree (a ``git archive`` of an old
commit, or this repository) and optional config overrides. Every round starts one fresh process per
arm, in turn (A B C A B C …), each building the method at that checkout's cpu-small protocol with its
own ``benchmarks/step_cost.py`` and code, then timing ``--steps`` training steps on one pre-loaded
batch after ``--warmup`` untimed ones. Process start-up and data loading are excluded; machine noise
hits the arms alike. Reported: the median step per arm and its ratio to the first arm.

    git archive 0f93ca9 | tar -x -C /tmp/base
    python benchmarks/checkout_step.py --arm base=/tmp/base --arm now=. \\
        --arm now+channels_last=.@train.channels_last=true --method unimatch \\
        --set "model.widths=[16,32,64,128,256]" --set model.upsample=bilinear --threads 1
        -> benchmarks/results/checkout_step_<tag>.json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from common import write_results

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from step_cost import method_config  # the arm's own benchmarks/ (on PYTHONPATH, see run_arm)
from semiseg.data.datasets import make_batch
from semiseg.methods import StepInfo
from semiseg.trainer import Trainer
method, dataset, scratch = sys.argv[2], sys.argv[3], sys.argv[7]
threads, steps, warmup = map(int, sys.argv[4:7])
overrides = json.loads(sys.argv[8])
torch.set_num_threads(threads)
cfg = method_config(method, dataset, ["train.progress=none", f"train.threads={threads}", *overrides])
trainer = Trainer(cfg, Path(scratch))
labeled, unlabeled = trainer._data_iterators()
batch = make_batch(next(labeled), next(unlabeled) if unlabeled else None).to(trainer.device)
trainer.method.train()
times = []
for s in range(warmup + steps):
    t = time.perf_counter()
    trainer.train_step(batch, StepInfo(s, cfg.train.iters))
    if s >= warmup:
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def parse_arm(text: str) -> tuple[str, Path, list[str]]:
    label, _, rest = text.partition("=")
    path, _, overrides = rest.partition("@")
    return label, Path(path).resolve(), [o for o in overrides.split(",") if o]


def run_arm(arm, args, scratch: Path) -> list[float]:
    label, root, overrides = arm
    # The arm's own code and scripts: its src/ and benchmarks/ (whose step_cost.py builds the method's
    # config; a current checkout's imports its sibling common.py from there too).
    path = os.pathsep.join([str(root / "src"), str(root / "benchmarks")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable, "-c", CHILD, str(root), args.method, args.dataset, str(args.threads),
        str(args.steps), str(args.warmup), str(scratch), json.dumps([*args.set, *overrides]),
    ]  # fmt: skip
    # The child runs in the repository root (dataset paths are relative to it).
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path.cwd())
    if out.returncode != 0:
        raise SystemExit(f"arm {label}: child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arm", action="append", required=True, help="LABEL=CHECKOUT[@override,...]")
    p.add_argument("--method", default="unimatch")
    p.add_argument("--dataset", default="chase_db1")
    p.add_argument("--set", action="append", default=[], help="override for every arm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scratch", default="runs/checkout_step")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="unimatch")
    args = p.parse_args()
    arms = [parse_arm(a) for a in args.arm]
    times: dict[str, list[float]] = {a[0]: [] for a in arms}
    for r in range(args.rounds):
        for i, arm in enumerate(arms):
            scratch = Path(args.scratch) / f"r{r}_a{i}"
            times[arm[0]].extend(run_arm(arm, args, scratch))
        print(
            f"round {r + 1}/{args.rounds}: "
            + "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in times.items())
        )
    first = statistics.median(times[arms[0][0]])
    rows = [
        {
            "arm": label,
            "checkout": str(root),
            "overrides": overrides,
            "step_s": statistics.median(times[label]),
            "ratio_to_first": statistics.median(times[label]) / first,
            "samples": len(times[label]),
        }
        for label, root, overrides in arms
    ]
    result = {
        "rows": rows,
        "setup": {
            "method": args.method,
            "dataset": args.dataset,
            "overrides": args.set,
            "threads": args.threads,
            "rounds": args.rounds,
            "steps": args.steps,
            "machine": platform.processor() or platform.machine(),
            "command": "python " + " ".join(sys.argv),
        },
    }
    lines = [
        f"`{args.method}` training step on `{args.dataset}` "
        f"(cpu-small, {' '.join(args.set) or 'no overrides'}, "
        f"{args.threads} thread(s)); {args.rounds} alternating rounds × {args.steps} steps, medians. "
        f"Command: `{result['setup']['command']}`",
        "",
        "| arm | checkout | overrides | step (s) | × first |",
        "|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | `{Path(r['checkout']).name}` | {' '.join(r['overrides']) or '–'} "
            f"| {r['step_s']:.3f} | {r['ratio_to_first']:.2f} |"
        )
    write_results(Path(args.out), f"checkout_step_{args.tag}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
