"""Weight-averaged evaluation (``eval.ema``, semiseg/ema.py): which decay, and are averaged
BatchNorm statistics right for the averaged weights?

Trains one run (``--config`` files merged in order, e.g. protocol, dataset and method file, then
``--set``: exactly ``semiseg train``'s run of that config) while keeping one
:class:`~semiseg.ema.ModelEma` per ``--decays`` value (they only read the weights: the trajectory is
the run's own), then evaluates every split of ``eval.splits`` with

* the final weights;
* each average with its averaged BatchNorm statistics (``eval.ema_bn_batches: 0``);
* each average with BatchNorm statistics recomputed for it by ``torch.optim.swa_utils.update_bn``
  (cumulative mean over N training batches in train mode: the labeled weak crops, and the
  unlabeled weak crops for methods that use them), for each N of ``--bn-batches`` (what
  ``eval.ema`` records, with N = ``eval.ema_bn_batches``).

Choose on validation splits only (``--set data.split_dir=... --set eval.splits=[val]``).

    python benchmarks/ema_check.py --config CONFIG [CONFIG ...] --set ... --decays 0.99 0.995 0.999 \\
        --bn-batches 50 200 --run-dir runs/ema_check/NAME --out benchmarks/results/ema_check_NAME
        -> .json and .md
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from semiseg.config import _deep_merge, apply_overrides, build_config, load_yaml_tree
from semiseg.ema import ModelEma
from semiseg.trainer import Trainer


class AveragingTrainer(Trainer):
    """The run's trainer, folding the weights into several averages after every step."""

    def __init__(self, cfg, run_dir: Path, decays: list[float]) -> None:
        super().__init__(cfg, run_dir)
        self.averages = {d: ModelEma(self.model, d, cfg.eval.ema_warmup) for d in decays}

    def train_step(self, batch, info):
        values = super().train_step(batch, info)
        if info.step >= self.cfg.eval.ema_start:
            for average in self.averages.values():
                average.update(self.model)
        return values


def summary(res: dict) -> dict:
    return {"miou": res["miou"], "iou": res["iou"]}


def evaluate_all(trainer: AveragingTrainer, bn_batches: list[int]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for split in trainer.cfg.eval.splits:
        rows = [{"weights": "final", **summary(trainer.evaluate_split(split, surface_metrics=False))}]
        for decay, average in trainer.averages.items():
            res = trainer.evaluate_split(split, surface_metrics=False, model=average.module)
            rows.append({"weights": f"average d={decay}, averaged BN", "decay": decay, **summary(res)})
            for n in bn_batches:
                model = copy.deepcopy(average.module)
                torch.manual_seed(trainer.cfg.seed)
                update_bn(trainer._bn_batches(n), model)  # the trainer's own batches for it
                model.eval()
                res = trainer.evaluate_split(split, surface_metrics=False, model=model)
                rows.append(
                    {
                        "weights": f"average d={decay}, BN recomputed ({n} batches)",
                        "decay": decay,
                        **summary(res),
                    }
                )
        out[split] = rows
    return out


def to_markdown(result: dict) -> str:
    lines = [f"Weight averages of one run. Command: `{result['command']}`", ""]
    for split, rows in result["splits"].items():
        names = list(rows[0]["iou"])
        lines += [
            f"`{split}` split, {result['steps']} steps:",
            "",
            "| weights | mIoU | " + " | ".join(f"{n} IoU" for n in names) + " |",
            "|---|" + "---:|" * (1 + len(names)),
        ]
        for row in rows:
            ious = " | ".join("n/a" if v is None else f"{100 * v:.2f}" for v in row["iou"].values())
            lines.append(f"| {row['weights']} | {100 * row['miou']:.2f} | {ious} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", required=True, help="config files, merged in order")
    p.add_argument("--set", action="append", default=[], help="config override (KEY=VALUE)")
    p.add_argument("--decays", nargs="+", type=float, default=[0.99, 0.995, 0.999])
    p.add_argument("--bn-batches", nargs="+", type=int, default=[50, 200])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = p.parse_args()
    tree: dict = {}
    for path in args.config:
        tree = _deep_merge(tree, load_yaml_tree(path))
    cfg = build_config(apply_overrides(tree, args.set))
    start = time.perf_counter()
    trainer = AveragingTrainer(cfg, args.run_dir, args.decays)
    trainer.fit()
    trained = time.perf_counter() - start
    result = {
        "command": "python " + " ".join(sys.argv),
        "steps": trainer.step,
        "train_seconds": trained,
        "splits": evaluate_all(trainer, args.bn_batches),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    markdown = to_markdown(result)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
