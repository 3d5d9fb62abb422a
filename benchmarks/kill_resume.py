"""Kill a real training run N times with SIGKILL at random moments and check nothing is lost.

An uninterrupted reference run is trained first (``python -m semiseg train``, timed). The same
command is then started again and again in a second run directory, each time SIGKILLed after a
random delay drawn uniformly over that process's start-up and its next stretch of training (2/N of
the training time on average, timed on the reference, so the kills spread over the whole run) —
which lands in interpreter start-up, the data check, training steps, validation, checkpoint writes
or the final evaluation alike —
and restarted the way a user would: with ``--resume`` once a checkpoint exists, without it before
(the run directory of a run that never reached its first checkpoint is replaced). After the N-th
kill the run is resumed to the end. The final records must be identical to the reference's:

* every tensor of the final ``latest.pt`` method state (segmenter, EMA teacher, discriminator),
  and of ``best.pt`` when the run has a validation split;
* ``metrics.jsonl`` record by record, except the throughput ``it/s``;
* the test results in ``results.json`` (everything but the wall-clock ``seconds``).

Use a deterministic config (``deterministic: true`` is added) and a ``train.log_every`` dividing
``train.ckpt_every`` (losses are logged as means over the logging window, which restarts at the
checkpoint a resume starts from). Writes ``<out>/kill_resume_<name>.json`` and ``.md``.

    python benchmarks/kill_resume.py                                   # tiny synthetic run, 20 kills
    python benchmarks/kill_resume.py --kills 3 --name smoke            # a quick smoke test
    python benchmarks/kill_resume.py --config protocols/cpu_small --config datasets/chase_db1 \\
        --config methods/unimatch_supmix_sufd --set train.iters=300 --set train.ckpt_every=50 \\
        --set train.log_every=10 --name chase
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from semiseg.checkpoint import load_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
TINY = [  # a synthetic FixMatch run of ~20 s on 2 CPU cores: 6 validations, checkpoints every 20 steps
    "data.name=synthetic",
    "data.synthetic.size=48",
    "data.synthetic.num_labeled_pool=12",
    "data.synthetic.num_val=3",
    "data.synthetic.num_test=4",
    "data.labeled=0.5",
    "data.crop_size=32",
    "data.batch_size=2",
    "data.unlabeled_batch_size=2",
    "model.widths=[8, 16, 32, 64, 128]",
    "method.name=fixmatch",
    "train.iters=240",
    "train.ckpt_every=20",
    "train.log_every=10",
    "train.eval_every=40",
    "eval.size_divisor=16",
]
FORCED = ["deterministic=true", "train.progress=log", "train.threads=1"]


def command(configs: list[str], overrides: list[str], run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "semiseg", "train", "--run-dir", str(run_dir)]
    for config in configs:  # several: merged in order, as `semiseg train` does
        cmd += ["--config", config]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def can_resume(run_dir: Path) -> bool:
    return (run_dir / "latest.pt").is_file() or (run_dir / "latest.prev.pt").is_file()


def run_state(run_dir: Path) -> dict:
    """What a kill left behind: checkpoint step, logged lines, temp files of a cut write."""
    state = {"run_dir_exists": run_dir.is_dir(), "checkpoint_step": None, "temp_files": 0, "log_lines": 0}
    if not run_dir.is_dir():
        return state
    for name in ("latest.pt", "latest.prev.pt"):
        if (run_dir / name).is_file():
            try:
                state["checkpoint_step"] = int(load_checkpoint(run_dir / name)["step"])
                break
            except Exception:  # noqa: BLE001 - a damaged file is what we are looking for
                state.setdefault("damaged", []).append(name)
    state["temp_files"] = sum(1 for p in run_dir.iterdir() if p.name.endswith(".tmp"))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        state["log_lines"] = len(metrics.read_bytes().splitlines())
    state["finished"] = (run_dir / "results.json").is_file()
    return state


def start(cmd: list[str], log) -> subprocess.Popen:  # log: a file, or subprocess.PIPE
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def relay(proc: subprocess.Popen, log, started: threading.Event) -> None:
    """Copy a run's output to ``log``; set ``started`` at its start-up line (training begins)."""
    for line in proc.stdout:
        log.write(line.decode(errors="replace"))
        if line.startswith(b"semiseg: run "):
            started.set()
    log.flush()


def final_record(run_dir: Path) -> dict:
    record = {"latest": load_checkpoint(run_dir / "latest.pt")["model"]}
    if (run_dir / "best.pt").is_file():
        record["best"] = load_checkpoint(run_dir / "best.pt")["model"]
    metrics = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        entry.pop("it/s", None)
        metrics.append(entry)
    record["metrics"] = metrics
    results = json.loads((run_dir / "results.json").read_text())
    results.pop("seconds", None)
    record["results"] = results
    return record


def compare(a: dict, b: dict) -> dict:
    """Per component: identical or the first difference."""
    out = {}
    for name in ("latest", "best"):
        if name not in a and name not in b:
            continue
        sa, sb = a.get(name, {}), b.get(name, {})
        diff = sorted(set(sa) ^ set(sb)) or [k for k in sa if not torch.equal(sa[k], sb[k])]
        out[f"{name}.pt tensors"] = "identical" if not diff else f"differ: {diff[0]}"
        out[f"{name}.pt tensor count"] = len(sa)
    ma, mb = a["metrics"], b["metrics"]
    first = next((i for i, (x, y) in enumerate(zip(ma, mb)) if x != y), None)
    if first is None and len(ma) == len(mb):
        out["metrics.jsonl"] = f"identical ({len(ma)} records, it/s excluded)"
    else:
        out["metrics.jsonl"] = f"differ at record {first if first is not None else min(len(ma), len(mb))}"
    out["results.json"] = "identical (seconds excluded)" if a["results"] == b["results"] else "differ"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="config file or built-in name, repeatable: merged in order (default: a tiny synthetic run)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs before the final resume (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--name", default="synthetic", help="suffix of the result files")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON / Markdown results")
    parser.add_argument("--work", help="folder for the two run directories (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args()

    overrides = ([] if args.config else list(TINY)) + list(args.overrides) + FORCED
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    reference, killed = work / "reference", work / "killed"
    for folder in (reference, killed):
        if folder.exists():
            shutil.rmtree(folder)
    rng = random.Random(args.seed)

    with open(work / "reference.log", "w") as log:
        t0 = time.perf_counter()
        proc = start(command(args.config, overrides, reference, False), subprocess.PIPE)
        startup_s = None
        for line in proc.stdout:  # the start-up line comes once the data are checked and the model built
            log.write(line.decode(errors="replace"))
            if startup_s is None and line.startswith(b"semiseg: run "):
                startup_s = time.perf_counter() - t0
        if proc.wait() != 0:
            print(f"reference run failed, see {work / 'reference.log'}", file=sys.stderr)
            return 1
        reference_s = time.perf_counter() - t0
    startup_s = startup_s or 0.0
    iters = int(json.loads((reference / "results.json").read_text())["steps"])
    print(f"reference run: {reference_s:.1f} s ({startup_s:.1f} s start-up, {iters} steps)")

    kills, restarts, finished_early = [], 0, 0
    with open(work / "killed.log", "w") as log:
        for k in range(args.kills):
            resume = can_resume(killed)
            proc = start(command(args.config, overrides, killed, resume), subprocess.PIPE)
            restarts += 1
            started = threading.Event()
            reader = threading.Thread(target=relay, args=(proc, log, started), daemon=True)
            reader.start()
            # A uniform moment of this process's start-up (as long as the reference's) and its next
            # stretch of training: 2/N of the run on average, so the N kills spread over the whole
            # run (training time is counted from the process's own start-up line: a resume starts
            # up more slowly than a fresh run).
            done = (run_state(killed)["checkpoint_step"] or 0) if resume else 0
            train_s = reference_s - startup_s
            stretch = min(train_s * (1 - done / iters), 2 * train_s / args.kills)
            u = rng.uniform(0.0, startup_s + stretch)
            t0 = time.perf_counter()
            if u >= startup_s:
                started.wait(timeout=120)
                u = time.perf_counter() - t0 + (u - startup_s)
            try:
                proc.wait(timeout=max(0.0, u - (time.perf_counter() - t0)))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            reader.join(10)
            if proc.returncode != -signal.SIGKILL:
                if proc.returncode != 0:
                    print(f"segment {k + 1} failed (exit {proc.returncode}), see {work / 'killed.log'}")
                    return 1
                finished_early += 1  # the run completed before the kill: start it again (a no-op resume)
            state = run_state(killed)
            phase = "training" if started.is_set() else "start-up"
            kills.append(
                {
                    "kill": k + 1,
                    "resumed": resume,
                    "after_s": round(u, 3),
                    "phase": phase,
                    "exit": proc.returncode,
                    **state,
                }
            )
            print(
                f"kill {k + 1}/{args.kills} after {u:5.1f} s in {phase} "
                f"({'--resume' if resume else 'fresh'}): "
                f"checkpoint step {state['checkpoint_step']}, {state['temp_files']} temp file(s), "
                f"exit {proc.returncode}"
            )
        proc = start(command(args.config, overrides, killed, can_resume(killed)), log)
        restarts += 1
        if proc.wait() != 0:
            print(f"final resume failed, see {work / 'killed.log'}", file=sys.stderr)
            return 1

    verdict = compare(final_record(reference), final_record(killed))
    identical = all(str(v).startswith("identical") for k, v in verdict.items() if "count" not in k)
    landed = {
        "before the run directory existed": sum(1 for x in kills if not x["run_dir_exists"]),
        "in start-up (imports, data check, model)": sum(1 for x in kills if x["phase"] == "start-up"),
        "in training, before the first checkpoint": sum(
            1 for x in kills if x["phase"] == "training" and x["checkpoint_step"] is None and x["exit"] != 0
        ),
        "in training, after a checkpoint": sum(
            1
            for x in kills
            if x["phase"] == "training" and x["checkpoint_step"] is not None and x["exit"] != 0
        ),
        "with a cut temp file (mid-write)": sum(1 for x in kills if x["temp_files"]),
        "after the run had finished": finished_early,
    }
    payload = {
        "config": " ".join(args.config) or "tiny synthetic (benchmarks/kill_resume.py TINY)",
        "overrides": overrides,
        "kills": args.kills,
        "seed": args.seed,
        "reference_seconds": round(reference_s, 2),
        "startup_seconds": round(startup_s, 2),
        "processes_started": restarts,
        "landed": landed,
        "identical": identical,
        "comparison": verdict,
        "kill_log": kills,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"kill_resume_{args.name}.json", out / f"kill_resume_{args.name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# kill -9 and resume: {args.name}",
        "",
        f"`python benchmarks/kill_resume.py --kills {args.kills} --seed {args.seed}"
        + "".join(f" --config {c}" for c in args.config)
        + "".join(f" --set {o}" for o in args.overrides)
        + f"` ({payload['date']}, {payload['machine']})",
        "",
        f"Reference run {reference_s:.1f} s ({startup_s:.1f} s start-up, {iters} steps); {args.kills} "
        "SIGKILLs, each at a uniform random moment of the restarted process's start-up and next "
        f"stretch of training (2/N of it on average), then a final resume ({restarts} processes in all).",
        "",
        "| kills that landed | count |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in landed.items()],
        "",
        "| final record | killed run vs uninterrupted |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in verdict.items()],
        "",
        f"**{'Identical' if identical else 'NOT identical'}** to the uninterrupted run.",
        "",
        "| kill | resumed | after (s) | in | checkpoint step left | temp files | log lines |",
        "|---:|---|---:|---|---:|---:|---:|",
        *[
            f"| {x['kill']} | {'yes' if x['resumed'] else 'no'} | {x['after_s']} | {x['phase']} | "
            f"{x['checkpoint_step']} | {x['temp_files']} | {x['log_lines']} |"
            for x in kills
        ],
        "",
    ]
    md_path.write_text("\n".join(lines))
    print(f"{'identical' if identical else 'NOT IDENTICAL'}: {json_path}, {md_path}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
