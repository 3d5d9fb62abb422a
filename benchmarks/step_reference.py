"""Same numbers after a refactor: 50 training steps of every committed method config, compared
bit for bit against a recorded reference.

Each method file under ``src/semiseg/configs/methods`` is composed with the cpu-small protocol and
the built-in synthetic dataset (small and fast, no data needed), trained for ``--steps`` steps
through ``Trainer.train_step`` in a fresh one-thread process, with labeled-only warm-up and
ramp-up shortened to ``--warmup`` steps so the unlabeled path runs within the budget. Recorded
per config: every logged value of every step (``float.hex``) and a SHA-256 of the final state of
the whole method (segmenter, teachers, plug-ins, extra optimizers' parameters and buffers).

    python benchmarks/step_reference.py --record    # writes benchmarks/results/step_reference.json
    python benchmarks/step_reference.py             # checks against it; exit 1 on any difference
    python benchmarks/step_reference.py --only recipe/unimatch.yaml guidedmix.yaml
    python benchmarks/step_reference.py --record --src /tmp/old/src   # reference from another checkout
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "results" / "step_reference.json"

CHILD = r"""
import hashlib, json, sys, tempfile
from pathlib import Path
import torch
from semiseg.config import _deep_merge, apply_overrides, build_config, load_yaml_tree
from semiseg.data.datasets import make_batch
from semiseg.methods import StepInfo
from semiseg.trainer import Trainer

files, steps, warmup = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tree = {}
for path in files:
    tree = _deep_merge(tree, load_yaml_tree(path))
for key in ("warmup_iters", "rampup_iters"):
    if int(tree.get("method", {}).get(key, 0) or 0) > warmup:
        tree["method"][key] = warmup
overrides = [f"train.iters={steps}", "train.threads=1", "train.progress=none", "train.init_from=null",
             "train.eval_every=-1", "train.compile=false"]
cfg = build_config(apply_overrides(tree, overrides))
torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as scratch:
    trainer = Trainer(cfg, Path(scratch) / "run")
    labeled, unlabeled = trainer._data_iterators()
    trainer.method.train()
    logged = []
    for step in range(steps):
        batch = make_batch(next(labeled), next(unlabeled) if unlabeled else None).to(trainer.device)
        values = trainer.train_step(batch, StepInfo(step, steps))
        logged.append({k: float(v).hex() for k, v in sorted(values.items())})
    digest = hashlib.sha256()
    for name, tensor in trainer.method.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    print(json.dumps({"steps": logged, "state_sha256": digest.hexdigest()}))
"""


def method_files(configs: Path, only: list[str]) -> list[Path]:
    files = sorted((configs / "methods").rglob("*.yaml"))
    names = {str(f.relative_to(configs / "methods")): f for f in files}
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise SystemExit(f"--only: no method config {missing} under {configs / 'methods'}")
        return [names[n] for n in only]
    return files


def run_one(src: Path, method: Path, steps: int, warmup: int) -> dict:
    configs = src / "semiseg" / "configs"
    files = [configs / "protocols" / "cpu_small.yaml", configs / "datasets" / "synthetic.yaml", method]
    cmd = [sys.executable, "-c", CHILD, json.dumps([str(f) for f in files]), str(steps), str(warmup)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(src)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{method}: child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_difference(reference: dict, now: dict) -> str | None:
    for step, (a, b) in enumerate(zip(reference["steps"], now["steps"], strict=False)):
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = ", ".join(
                f"{k}: {float.fromhex(a[k]) if k in a else None} -> {float.fromhex(b[k]) if k in b else None}"
                for k in keys[:4]
            )
            return f"step {step}: {shown}"
    if len(reference["steps"]) != len(now["steps"]):
        return f"{len(reference['steps'])} steps recorded, {len(now['steps'])} now"
    if reference["state_sha256"] != now["state_sha256"]:
        return "final state differs (losses equal)"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help="write the reference instead of checking")
    p.add_argument("--only", nargs="+", default=[], help="method configs, relative to configs/methods")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="cap of warmup_iters / rampup_iters")
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--src", type=Path, default=ROOT / "src", help="the semiseg source tree to run")
    args = p.parse_args()
    reference = json.loads(args.reference.read_text()) if args.reference.is_file() else None
    if not args.record and reference is None:
        raise SystemExit(f"{args.reference}: no reference recorded (run with --record first)")
    results = dict(reference["configs"]) if (args.record and reference) else {}
    failures = []
    configs = args.src.resolve() / "semiseg" / "configs"
    for method in method_files(configs, args.only):
        name = str(method.relative_to(configs / "methods"))
        now = run_one(args.src.resolve(), method, args.steps, args.warmup)
        if args.record:
            results[name] = now
            print(f"recorded {name}", flush=True)
            continue
        if name not in reference["configs"]:
            print(f"NEW      {name} (not in the reference)", flush=True)
            continue
        diff = first_difference(reference["configs"][name], now)
        print(
            f"{'same' if diff is None else 'DIFFERS':8} {name}{'' if diff is None else ': ' + diff}",
            flush=True,
        )
        if diff is not None:
            failures.append(name)
    if args.record:
        payload = {"steps": args.steps, "warmup": args.warmup, "configs": dict(sorted(results.items()))}
        args.reference.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.reference} ({hashlib.sha256(args.reference.read_bytes()).hexdigest()[:12]})")
    elif failures:
        raise SystemExit(f"{len(failures)} config(s) differ from the reference: {failures}")


if __name__ == "__main__":
    main()
