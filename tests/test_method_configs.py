"""Every shipped method/combination trains from the CLI on the synthetic default (CI-sized)."""

import json
from pathlib import Path

import pytest
from helpers import tiny_overrides

from semiseg.cli import main

METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "src" / "semiseg" / "configs" / "methods"
NAMES = sorted(p.stem for p in METHOD_CONFIGS.glob("*.yaml"))


def test_the_paper_rows_are_all_shipped():
    for name in (
        "supervised",
        "fixmatch",
        "unimatch",
        "unimatch_classmix",
        "unimatch_supmix",
        "unimatch_sufd",
        "unimatch_supmix_sufd",
        "mean_teacher",
    ):
        assert name in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_method_trains_from_the_cli(tmp_path, capsys, name):
    overrides = [x for o in tiny_overrides(iters=3) for x in ("--set", o)]
    run = tmp_path / name
    code = main(["train", "--config", f"cpu_small/synthetic/{name}", *overrides, "--run-dir", str(run)])
    _, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads((run / "results.json").read_text())
    assert payload["steps"] == 3 and payload["results"]["test"]["miou"] is not None
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["total"], float) for r in losses if r["kind"] == "train")
    if "sufd" in name:
        assert any("sufd/adv" in k or k.startswith("sufd/") for k in losses[-1])


def test_amp_on_cpu_uses_bfloat16_and_trains(tmp_path, capsys):
    overrides = [x for o in tiny_overrides(iters=2, **{"train.amp": "true"}) for x in ("--set", o)]
    code = main(
        [
            "train",
            "--config",
            "cpu_small/synthetic/unimatch_supmix_sufd",
            *overrides,
            "--run-dir",
            str(tmp_path / "amp"),
        ]
    )
    assert code == 0, capsys.readouterr().err


def test_supmix_from_a_strong_labeled_view_trains_from_the_cli(tmp_path, capsys):
    """``method.supmix_source=strong``: the trainer feeds the labeled strong view the mixer pastes."""
    sets = tiny_overrides(iters=2, **{"method.supmix_p": "1.0", "method.supmix_source": "strong"})
    overrides = [x for o in sets for x in ("--set", o)]
    run = tmp_path / "strong_source"
    config = "cpu_small/synthetic/unimatch_supmix"
    code = main(["train", "--config", config, *overrides, "--run-dir", str(run)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "results.json").read_text())["steps"] == 2
