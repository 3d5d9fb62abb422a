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
* **setup**: building the trainer (data splits, network, method; with ``train.compile`` the
  compilation of the network's training graphs, semiseg/compiling.py).
* with ``--cell-iters N``, a real cell of N iterations is timed too: ``Trainer(cfg).fit()`` (set-up
  and compilation, data, steps, checkpoints, final evaluation) in a fresh process per cell, as a
  grid runs it; its wall time is compared with N × floor + evaluation, and its test metrics are
  recorded (a faster variant must give the same numbers). ``--cell-repeats`` alternates the
  variants' cells (A B, B A, ...); ``--concurrent`` starts every variant's cell at once instead
  (each with ``--threads``), so they share the machine alike; ``--cells-only`` skips the step
  rounds; ``--fresh-compile-cache`` gives each cell an empty inductor cache (the first cell of a
  grid; later cells of the same network and shapes find their kernels compiled).

    python benchmarks/cell_cost.py --dataset chase_db1 --variants unimatch \\
        unimatch@train.channels_last=true --rounds 8 --cell-iters 100
    python benchmarks/cell_cost.py --dataset chase_db1 --threads 1 --cells-only --concurrent \\
        --cell-iters 2000 --variants recipe/unimatch recipe/unimatch@train.compile=true --tag compile
        -> benchmarks/results/cell_cost_<dataset>[_<tag>].json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import method_config, write_results
from step_cost import floor_step, passes_for, peak_memory

from semiseg.checkpoint import atomic_save
from semiseg.data.datasets import make_batch
from semiseg.methods import StepInfo
from semiseg.trainer import Trainer


def build(spec: str, args, scratch: Path) -> dict:
    extra = [f"train.threads={args.threads}", *args.set]
    cfg = method_config(spec, args.dataset, extra, iters=None, protocol=args.protocol)
    t = time.perf_counter()
    trainer = Trainer(cfg, scratch)
    setup_s = time.perf_counter() - t
    labeled, unlabeled = trainer._data_iterators()
    trainer.method.train()
    return {"cfg": cfg, "trainer": trainer, "labeled": labeled, "unlabeled": unlabeled, "setup_s": setup_s}


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


def eval_compile_cost(trainer: Trainer, repeats: int = 3) -> dict:
    """Seconds of the test evaluation, eager and with the evaluated network compiled (static shapes,
    and dynamic shapes), each call timed: the first compiled calls include compilation."""
    import copy

    out = {}
    for name, kwargs in (("eager", None), ("static", {"dynamic": False}), ("dynamic", {"dynamic": True})):
        net = copy.deepcopy(trainer.method.eval_model())
        if kwargs is not None:
            net.compile(**kwargs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            trainer.evaluate_split("test", model=_Compiled(net) if kwargs is not None else net)
            times.append(time.perf_counter() - t)
        out[name] = times
    return out


class _Compiled(torch.nn.Module):
    """Calls a compiled network through its compiled forward (``evaluate_split`` runs a bare
    network's eager forward)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    scratch = Path(args.scratch)
    if args.cells_only:
        rows = [{"variant": v} for v in args.variants]
        cells = real_cells(args, scratch)
        for row in rows:
            row["cells"] = cells[row["variant"]]
            row.update(cell_summary(row["cells"], rows[0], cells[rows[0]["variant"]]))
        return {"rows": rows, "rounds": 0, "warmup": 0}
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
        eval_compile = eval_compile_cost(trainer) if args.eval_compile else None
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
                "setup_s": run["setup_s"],
                "step_s": med["step"],
                "floor_s": med["floor"],
                "data_s": med["data"],
                "eval_s": eval_s,
                "eval_compile_s": eval_compile,
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
        cells = real_cells(args, scratch)
        for row in rows:
            row["cells"] = cells[row["variant"]]
            row.update(cell_summary(row["cells"], rows[0], cells[rows[0]["variant"]]))
            n = args.cell_iters
            row["cell_wall_over_floor"] = row["cell_wall_s"] / (n * row["floor_s"])
            row["cell_wall_over_floor_plus_eval"] = row["cell_wall_s"] / (n * row["floor_s"] + row["eval_s"])
    return {"rows": rows, "rounds": args.rounds, "warmup": args.warmup}


def cell_command(spec: str, args, run_dir: Path) -> list[str]:
    cmd = [sys.executable, __file__, "--child-cell", spec, "--dataset", args.dataset]
    cmd += ["--protocol", args.protocol, "--threads", str(args.threads), "--cell-iters", str(args.cell_iters)]
    cmd += ["--scratch", str(run_dir)]
    return cmd + [x for s in args.set for x in ("--set", s)]


def real_cells(args, scratch: Path) -> dict[str, list[dict]]:
    """Run ``--cell-repeats`` rounds of real cells, one fresh process per cell; per variant the
    list of ``{"wall_s", "fit_s", "setup_s", "test": {miou, iou, ...}}`` (``wall_s``: process start
    to exit; ``fit_s``: the child's own ``Trainer(cfg).fit()`` time, set-up included)."""
    out: dict[str, list[dict]] = {v: [] for v in args.variants}
    for r in range(args.cell_repeats):
        order = args.variants if r % 2 == 0 else list(reversed(args.variants))
        jobs = []
        for spec in order:
            index = len(list(scratch.glob("cell_*")))
            run_dir = scratch / f"cell_{index}"
            run_dir.mkdir(parents=True)
            env = dict(os.environ)
            if args.fresh_compile_cache:
                env["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / f"inductor_cache_{index}")
            log = open(run_dir / "log.txt", "w")  # noqa: SIM115 - closed below
            start = time.perf_counter()
            cmd = cell_command(spec, args, run_dir / "run")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
            job = {"spec": spec, "dir": run_dir, "proc": proc, "start": start, "log": log, "wall": None}
            jobs.append(job)
            if not args.concurrent:
                proc.wait()
                job["wall"] = time.perf_counter() - start
        while any(job["wall"] is None for job in jobs):  # concurrent: each cell's own end time
            for job in jobs:
                if job["wall"] is None and job["proc"].poll() is not None:
                    job["wall"] = time.perf_counter() - job["start"]
            time.sleep(0.2)
        for job in jobs:
            job["log"].close()
            text = (job["dir"] / "log.txt").read_text()
            if job["proc"].returncode != 0:
                raise SystemExit(f"cell {job['spec']} failed (log {job['dir'] / 'log.txt'}):\n{text[-3000:]}")
            payload = json.loads(text.strip().splitlines()[-1])
            out[job["spec"]].append({"wall_s": job["wall"], **payload})
            print(
                f"cell {job['spec']}: {job['wall']:.1f} s, test mIoU {100 * payload['test']['miou']:.2f}",
                flush=True,
            )
    return out


def cell_summary(cells: list[dict], first_row: dict, first_cells: list[dict]) -> dict:
    """Medians of the variant's real cells, its ratio to the first variant's (``fit_s``: the cell
    itself, without the interpreter's start), test metrics."""
    wall = statistics.median(c["wall_s"] for c in cells)
    fit = statistics.median(c["fit_s"] for c in cells)
    first = statistics.median(c["fit_s"] for c in first_cells)
    test = cells[0]["test"]
    return {
        "cell_iters": cells[0]["iters"],
        "cell_wall_s": wall,
        "cell_fit_s": fit,
        "cell_setup_s": statistics.median(c["setup_s"] for c in cells),
        "cell_first_over_this": first / fit,
        "cell_test_miou": test["miou"],
        "cell_test_iou": test["iou"],
        "cell_test_miou_all": [c["test"]["miou"] for c in cells],
    }


def child_cell(args) -> None:
    """Run one real cell (``Trainer(cfg).fit()``) and print ``{"fit_s", "setup_s", "test"}`` as JSON."""
    torch.set_num_threads(args.threads)
    extra = [f"train.threads={args.threads}", f"train.iters={args.cell_iters}", *args.set]
    cfg = method_config(args.child_cell, args.dataset, extra, iters=None, protocol=args.protocol)
    t = time.perf_counter()
    trainer = Trainer(cfg, args.scratch)
    setup = time.perf_counter() - t
    result = trainer.fit()
    fit = time.perf_counter() - t
    test = {k: result.results["test"][k] for k in ("miou", "iou", "mdice") if k in result.results["test"]}
    print(json.dumps({"iters": args.cell_iters, "fit_s": fit, "setup_s": setup, "test": test}))


def to_markdown(result: dict, header: str) -> str:
    rows = result["rows"]
    lines = [header, ""]
    if "step_s" in rows[0]:
        lines += [
            "| variant | setup (s) | step (s) | floor (s) | step × floor | × first | data (s/step) "
            "| eval (s) | checkpoint (s) | cell estimate (min) | estimate × floor | memory (MB) |",
            "|---|" + "---:|" * 11,
        ]
        for r in rows:
            mem = f"{r['step_memory_mb']:.0f}" if r["step_memory_mb"] is not None else "–"
            lines.append(
                f"| `{r['variant']}` | {r['setup_s']:.1f} | {r['step_s']:.3f} | {r['floor_s']:.3f} "
                f"| {r['step_over_floor']:.2f} | {r['step_over_first']:.2f} | {r['data_s']:.3f} "
                f"| {r['eval_s']:.2f} | {r['ckpt_s']:.3f} | {r['cell_estimate_s'] / 60:.1f} "
                f"| {r['cell_estimate_over_floor']:.2f} | {mem} |"
            )
        lines.append("")
        for r in rows:
            if r.get("eval_compile_s"):
                calls = "; ".join(
                    f"{name} " + ", ".join(f"{t:.2f}" for t in times)
                    for name, times in r["eval_compile_s"].items()
                )
                lines.append(
                    f"Test evaluation of `{r['variant']}`, s per call (first calls compile): {calls}"
                )
                lines.append("")
    if "cell_wall_s" in rows[0]:
        names = list(rows[0]["cell_test_iou"])
        over_floor = "cell_wall_over_floor_plus_eval" in rows[0]
        lines += [
            "Real cells (`Trainer(cfg).fit()` in a fresh process each: set-up and compilation, data, steps, "
            "checkpoints, final test evaluation); medians over the repeats:",
            "",
            "| variant | iterations | process wall (s) | fit (s) | set-up (s) | first ÷ this (fit) | "
            + ("real × (floor + eval) | " if over_floor else "")
            + "test mIoU | "
            + " | ".join(f"{n} IoU" for n in names)
            + " |",
            "|---|" + "---:|" * (6 + over_floor + len(names)),
        ]
        for r in rows:
            extra = f"{r['cell_wall_over_floor_plus_eval']:.2f} | " if over_floor else ""
            mious = ", ".join(f"{100 * m:.2f}" for m in r["cell_test_miou_all"])
            ious = " | ".join(
                f"{100 * v:.2f}" if v is not None else "n/a" for v in r["cell_test_iou"].values()
            )
            lines.append(
                f"| `{r['variant']}` | {r['cell_iters']} | {r['cell_wall_s']:.1f} | {r['cell_fit_s']:.1f} "
                f"| {r['cell_setup_s']:.1f} "
                f"| {r['cell_first_over_this']:.3f} | {extra}{mious} | {ious} |"
            )
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
    p.add_argument("--cell-repeats", type=int, default=1, help="real cells per variant (order alternates)")
    p.add_argument("--concurrent", action="store_true", help="start the variants' real cells at once")
    p.add_argument("--cells-only", action="store_true", help="real cells only, no step rounds")
    p.add_argument(
        "--fresh-compile-cache", action="store_true", help="an empty inductor cache for each real cell"
    )
    p.add_argument(
        "--at-step", type=int, default=0, help="timed steps pretend to be at this step (past warm-ups)"
    )
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument(
        "--eval-compile", action="store_true", help="also time the test evaluation with a compiled network"
    )
    p.add_argument("--set", action="append", default=[], help="config override for every variant")
    p.add_argument("--scratch", default="runs/cell_cost")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--child-cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_cell:
        child_cell(args)
        return
    if args.cells_only and not args.cell_iters:
        p.error("--cells-only needs --cell-iters N")
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
        + (f"medians of {args.rounds} interleaved rounds. " if not args.cells_only else "")
        + f"Command: `{result['setup']['command']}`"
    )
    write_results(Path(args.out), name, result, to_markdown(result, header))


if __name__ == "__main__":
    main()
