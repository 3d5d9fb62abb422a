"""What the benchmark scripts share: paths, composing a run config from the built-in protocol,
dataset and method files, the runs' split images, and writing result files.

Scripts run as ``python benchmarks/SCRIPT.py`` from the repository root, so this folder is on
``sys.path`` and they ``from common import ...``; nothing edits ``sys.path``. semiseg and torch are
imported where a function needs them, so the record-only scripts (``label_ceiling.py``,
``noise_budget.py``) start without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from semiseg.config import RunConfig

#: The repository this folder belongs to, its committed results, and the built-in configs of the
#: checkout's own source tree (``checkout_step.py`` runs another checkout's scripts on its code).
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "src" / "semiseg" / "configs"


# ---------------------------------------------------------------------------------------------
# Configs: protocol × dataset × method, as `semiseg train -c P -c D -c M` composes them
# ---------------------------------------------------------------------------------------------


def split_variant(spec: str) -> tuple[str, list[str]]:
    """``"unimatch@train.channels_last=true,plugins.sufd.input_scale=0.5"`` -> (method, overrides)."""
    method, _, rest = spec.partition("@")
    return method, [o for o in rest.split(",") if o]


def method_config(
    spec: str, dataset: str, extra: list[str], iters: int | None = 1000, protocol: str = "cpu_small"
) -> RunConfig:
    """Config of ``spec`` (a method file of configs/methods, optionally ``@overrides``) at ``protocol``
    (configs/protocols) on ``dataset`` (configs/datasets), merged in that order; ``iters`` replaces
    the protocol's iteration count unless None."""
    from semiseg.config import _deep_merge, apply_overrides, build_config, load_yaml_tree

    method, overrides = split_variant(spec)
    extra = [*([f"train.iters={iters}"] if iters is not None else []), *extra, *overrides]
    tree: dict = {}
    for part in (f"protocols/{protocol}.yaml", f"datasets/{dataset}.yaml", f"methods/{method}.yaml"):
        tree = _deep_merge(tree, load_yaml_tree(CONFIGS / part))
    return build_config(apply_overrides(tree, ["train.progress=none", *extra]))


# ---------------------------------------------------------------------------------------------
# Finished runs and committed records
# ---------------------------------------------------------------------------------------------


def split_records(cfg, run_dir: Path, split: str = "unlabeled") -> list:
    """The run's training images of ``split`` (``splits/<split>.txt``: unlabeled, labeled) with a mask."""
    from semiseg.data import formats  # noqa: F401  (registers the dataset builders)
    from semiseg.data.base import DATASETS

    source = DATASETS[cfg.data.name](cfg.data)
    by_name = {r.name: r for r in source.train_pool}
    names = (run_dir / "splits" / f"{split}.txt").read_text().split()
    return [by_name[n] for n in names if n in by_name and by_name[n].mask is not None]


def load_records(path: Path) -> list[dict]:
    """A ``records.json`` (a list of run records), or exit with a one-line error naming the file."""
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {path}: {error}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise SystemExit(f"error: {path}: not a list of run records")
    return records


# ---------------------------------------------------------------------------------------------
# Result files
# ---------------------------------------------------------------------------------------------


def command_line(script: str, runs: list[Path], out: Path | None, **options: list | None) -> str:
    """The command that made a result file: ``python benchmarks/SCRIPT RUNS [--OPTION ...] [--out OUT]``."""
    parts = [f"python benchmarks/{script}", *map(str, runs)]
    for name, values in options.items():
        if values:
            parts += [f"--{name}", *map(str, values)]
    if out:
        parts += ["--out", str(out)]
    return " ".join(parts)


def write_outputs(out: Path | None, command: str, rows: list[dict], text: str) -> None:
    """Print the Markdown table; with ``out``, write OUT.json (command and rows) and OUT.md."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": rows}, indent=2))
        out.with_suffix(".md").write_text(text)


def write_results(out: Path, name: str, result: dict, markdown: str) -> None:
    """``out/<name>.json`` and ``out/<name>.md``; the Markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
