"""ACDC: the published labeled sets (first K patients of train_slices.list in file order), the
patient-wise split writer, and the volume evaluation on the real data when it is present."""

from __future__ import annotations

import pytest
from helpers import NO_SHARED, SHARED_DATA
from test_formats import write_acdc

from semiseg.config import DataConfig
from semiseg.data import acdc
from semiseg.data.base import DATASETS, build_splits, make_splits
from semiseg.errors import DataError

ACDC_ROOT = SHARED_DATA / "acdc"
needs_acdc = pytest.mark.skipif(not (ACDC_ROOT / "train_slices.list").is_file(), reason=NO_SHARED)


def patients(records) -> set[str]:
    return {acdc.patient_of(r.name) for r in records}


@needs_acdc
@pytest.mark.parametrize(
    ("cases", "slices", "expected"),
    [
        (3, 68, {"patient099", "patient038", "patient050"}),
        (
            7,
            136,
            {
                "patient099",
                "patient038",
                "patient050",
                "patient100",
                "patient058",
                "patient021",
                "patient049",
            },
        ),
    ],
)
def test_published_labeled_sets(cases, slices, expected):
    splits = build_splits(DataConfig(name="acdc", root=str(ACDC_ROOT), labeled=cases), seed=0)
    assert patients(splits.labeled) == expected
    assert len(splits.labeled) == slices  # SSL4MIS patients_to_slices: 3 -> 68, 7 -> 136
    first_lines = [n.strip() for n in (ACDC_ROOT / "train_slices.list").read_text().split()][:slices]
    assert sorted(r.name for r in splits.labeled) == sorted(first_lines)
    assert len(splits.unlabeled) == 1312 - slices
    assert len({r.image for r in splits.test}) == 40 and len({r.image for r in splits.val}) == 20
    assert splits.eval_unit == "volume"


def test_patient_split_writer(tmp_path):
    write_acdc(tmp_path / "acdc", patients=5, order=[5, 2, 4, 1, 3])
    counts = acdc.write_patient_split(tmp_path / "acdc", 2, seed=3, out=tmp_path / "split")
    assert counts == {"labeled": 6, "unlabeled": 9}
    source = DATASETS["acdc"](DataConfig(name="acdc", root=str(tmp_path / "acdc")))
    cfg = DataConfig(name="acdc", root=str(tmp_path / "acdc"), split_dir=str(tmp_path / "split"))
    splits = make_splits(source, cfg, seed=0)
    assert len(patients(splits.labeled)) == 2 and not patients(splits.labeled) & patients(splits.unlabeled)
    assert splits.test == source.test  # val/test stay the dataset's volumes
    again = acdc.write_patient_split(tmp_path / "acdc", 2, seed=3, out=tmp_path / "again")
    assert again == counts
    assert (tmp_path / "again" / "labeled.txt").read_text() == (
        tmp_path / "split" / "labeled.txt"
    ).read_text()
    other = [acdc.write_patient_split(tmp_path / "acdc", 2, seed=s, out=tmp_path / f"s{s}") for s in range(6)]
    labeled_sets = {(tmp_path / f"s{s}" / "labeled.txt").read_text() for s in range(6)}
    assert len(labeled_sets) > 1 and all(o["labeled"] == 6 for o in other)
    with pytest.raises(DataError, match="exists"):
        acdc.write_patient_split(tmp_path / "acdc", 2, seed=3, out=tmp_path / "split")
    with pytest.raises(DataError, match="has 5 patients"):
        acdc.write_patient_split(tmp_path / "acdc", 6, seed=3, out=tmp_path / "too_many")


def test_data_split_command_for_acdc(tmp_path, capsys):
    from semiseg.cli import main

    write_acdc(tmp_path / "acdc", patients=4)
    out = tmp_path / "draw"
    args = ["data", "split", str(tmp_path / "acdc"), "--dataset", "acdc", "--labeled", "2", "--seed", "1"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "labeled: 6 slices" in printed and f"data.split_dir={out}" in printed
    assert main([*args, "--out", str(out)]) == 2  # refused: the files exist
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert main([*args[:-4], "--labeled", "0.5", "--out", str(out)]) == 2
    assert main([*args, "--out", str(out), "--val", "2"]) == 2
    assert main(args) == 2 and "--out: required" in capsys.readouterr().err


def test_train_and_eval_score_acdc_by_volume(tmp_path, capsys):
    """A tiny ACDC run: validation and test are scored per volume in 3-D (mean foreground Dice,
    HD95), best.pt follows the validation mean Dice, and `semiseg eval` scores the same way."""
    import json

    from helpers import tiny_overrides

    from semiseg.cli import main

    write_acdc(tmp_path / "acdc", patients=3)
    overrides = tiny_overrides(
        iters=2,
        **{
            "data.name": "acdc",
            "data.root": str(tmp_path / "acdc"),
            "data.labeled": 1,
            "data.size": "[16, 16]",
        },
        **{"data.crop_size": 16, "eval.splits": "[val, test]", "model.widths": "[4, 8, 16, 32, 64]"},
    )
    run = tmp_path / "run"
    sets = [a for o in overrides for a in ("--set", o)]
    assert main(["train", "--config", "configs/methods/supervised.yaml", *sets, "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())["results"]
    for split, depth in (("val", 2), ("test", 3)):
        res = results[split]
        assert res["evaluation"] == "volume" and res["volumes"] == 1
        assert res["mdice"] is not None and set(res["hd95"]) == {"background", "RV", "MYO", "LV"}
        assert sum(res["per_image"][0]["tp"]) + sum(res["per_image"][0]["fn"]) == depth * 8 * 10  # full size
    assert (run / "best.pt").is_file()
    assert main(["eval", str(run), "--split", "test", "--out", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["mdice"] == pytest.approx(results["test"]["mdice"])
    assert main(["eval", str(run), "--split", "labeled", "--out", str(tmp_path / "lab.json")]) == 0
    assert "evaluation" not in json.loads((tmp_path / "lab.json").read_text())
