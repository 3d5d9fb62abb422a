"""How long the pre-training data check takes, on generated folder datasets.

Writes a folder dataset of N small images (default 1,000 RGB PNGs of 64×64 with index masks) with
split files (12.5 % labeled, 10 % val, 10 % test, the rest unlabeled with hidden masks), then times
:func:`semiseg.data.validate.check_data` — image headers and file ends, full decodes only of the
masks the run reads — against decoding every image and mask fully. Best of ``--repeat`` runs (the
files are in the page cache after the first).

    python benchmarks/data_check_speed.py [--images 1000] [--size 64] [--jpeg]
        -> benchmarks/results/data_check_speed.json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from semiseg.config import DataConfig
from semiseg.data.base import build_splits
from semiseg.data.io import inspect_image, read_mask_file
from semiseg.data.validate import check_data

RESULTS = Path(__file__).resolve().parent / "results"


def write_dataset(root: Path, n: int, size: int, jpeg: bool) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    ext = "jpg" if jpeg else "png"
    names = []
    for i in range(n):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[size // 4 : size // 2, size // 4 : size // 2] = 1
        mask[size // 2 :, size // 2 :] = 2
        Image.fromarray(image).save(root / "images" / f"im{i:05d}.{ext}")
        Image.fromarray(mask).save(root / "masks" / f"im{i:05d}.png")
        names.append(f"images/im{i:05d}.{ext}")
    (root / "classes.yaml").write_text("[background, a, b]\n")
    n_lab, n_val = max(1, n // 8), n // 10
    parts = {
        "labeled": names[:n_lab],
        "val": names[n_lab : n_lab + n_val],
        "test": names[n_lab + n_val : n_lab + 2 * n_val],
        "unlabeled": names[n_lab + 2 * n_val :],
    }
    (root / "splits").mkdir()
    for part, items in parts.items():
        (root / "splits" / f"{part}.txt").write_text("".join(f"{x}\n" for x in items))


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--jpeg", action="store_true", help="JPEG images instead of PNG")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_dataset(root, args.images, args.size, args.jpeg)
        cfg = DataConfig(name="folder", root=str(root), split_dir="splits")
        splits = build_splits(cfg, 0)
        report = check_data(splits, cfg)
        check_s = best_of(args.repeat, lambda: check_data(splits, cfg))
        build_s = best_of(args.repeat, lambda: build_splits(cfg, 0))

        def decode_all() -> None:
            for path in sorted((root / "images").iterdir()):
                inspect_image(path, decode=True)
            for path in sorted((root / "masks").iterdir()):
                read_mask_file(path)

        full_s = best_of(args.repeat, decode_all)

    kind = f"{args.size}×{args.size} RGB {'JPEG' if args.jpeg else 'PNG'}"
    payload = {
        "images": args.images,
        "kind": kind,
        "files_checked": report.files,
        "files_decoded": report.decoded,
        "dataset_scan_s": round(build_s, 3),
        "check_s": round(check_s, 3),
        "full_decode_s": round(full_s, 3),
        "per_1000_images_s": round(check_s * 1000 / args.images, 3),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"data_check_speed{'_jpeg' if args.jpeg else ''}"
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text(
        "\n".join(
            [
                f"# Data check speed ({payload['date']}, {payload['machine']})",
                "",
                f"`python benchmarks/data_check_speed.py --images {args.images} --size {args.size}"
                f"{' --jpeg' if args.jpeg else ''}`: {args.images} {kind} images with index masks; "
                "12.5 % labeled, 10 % val, 10 % test, the rest unlabeled (masks hidden). Best of "
                f"{args.repeat}.",
                "",
                "| step | seconds |",
                "|---|---:|",
                f"| dataset scan and split files (`build_splits`) | {build_s:.3f} |",
                f"| data check (`check_data`: {report.files} files, {report.decoded} decoded) "
                f"| {check_s:.3f} |",
                f"| for comparison: decoding every image and mask | {full_s:.3f} |",
                "",
            ]
        )
    )
    print(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
