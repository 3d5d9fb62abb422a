"""Export a trained run and check, in a fresh process that never imports semiseg's training code,
that the exported model gives the same masks as ``semiseg predict`` on the run's checkpoint.

    python benchmarks/export_check.py runs/grids/cpu_small_recipe/chase_db1/1-8/supervised+cedice/seed0 \\
        ../shared/data/chase_db1 --glob 'Image_1[34]*.jpg' --name chase_db1

Writes ``benchmarks/results/export_check_<name>.{json,md}``: per image, the pixels whose class differs
(must be 0) and the modules of the training code the loading process imported (must be none).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
TRAINING_CODE = (
    "semiseg.trainer",
    "semiseg.methods",
    "semiseg.plugins",
    "semiseg.checkpoint",
    "semiseg.experiment",
)

LOADER = f"""
import json, sys
import numpy as np
from PIL import Image
from semiseg.api import load
predictor = load(sys.argv[1])
out = {{}}
for path in sys.argv[3:]:
    mask = predictor.predict(np.asarray(Image.open(path))).mask
    np.save(f"{{sys.argv[2]}}/{{path.rsplit('/', 1)[-1]}}.npy", mask)
training = [m for m in sys.modules if m.startswith({TRAINING_CODE!r})]
print(json.dumps(training))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run directory")
    p.add_argument("images", type=Path, help="folder of images to predict")
    p.add_argument("--glob", default="*.png", help="which images of the folder")
    p.add_argument("--name", required=True, help="suffix of the result files")
    args = p.parse_args()
    images = sorted(args.images.glob(args.glob))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exe = [sys.executable, "-m", "semiseg"]
        subprocess.run([*exe, "export", str(args.run), str(tmp / "export")], check=True)
        chosen = tmp / "images"
        chosen.mkdir()
        for image in images:
            shutil.copy(image, chosen / image.name)
        subprocess.run(
            [*exe, "predict", str(args.run / "latest.pt"), str(chosen), str(tmp / "cli")], check=True
        )
        (tmp / "exported").mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", LOADER, str(tmp / "export"), str(tmp / "exported"), *map(str, images)],
            check=True,
            capture_output=True,
            text=True,
        )
        imported = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = []
        for image in images:
            cli = np.asarray(Image.open(tmp / "cli" / f"{image.stem}_mask.png"))
            exported = np.load(tmp / "exported" / f"{image.name}.npy")
            rows.append(
                {"image": image.name, "pixels": int(cli.size), "differing": int((cli != exported).sum())}
            )
    command = " ".join(["python benchmarks/export_check.py", str(args.run), str(args.images), "--glob",
                        repr(args.glob), "--name", args.name])  # fmt: skip
    payload = {
        "command": command,
        "run": str(args.run),
        "training_modules_imported": imported,
        "images": rows,
    }
    lines = [
        f"# Export round trip: {args.name}",
        "",
        f"`{command}`",
        "",
        f"Training-code modules imported by the process that loaded the export: {imported or 'none'}.",
        "",
        "| image | pixels | pixels whose class differs (export vs `semiseg predict` on the checkpoint) |",
        "|---|---:|---:|",
        *(f"| {r['image']} | {r['pixels']} | {r['differing']} |" for r in rows),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"export_check_{args.name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"export_check_{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
