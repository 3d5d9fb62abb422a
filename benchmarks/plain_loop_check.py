"""Independent check of the supervised CHASE_DB1 number: a plain PyTorch loop that shares only the
U-Net class with semiseg (PIL loading, its own crops/flips/normalisation/loss/poly schedule/eval).

If this loop and ``semiseg train`` agree on the same labeled images, a low vessel IoU comes from
the split and the budget, not from semiseg's data pipeline or trainer. Run from the repository root:

    python benchmarks/plain_loop_check.py --labeled Image_11L,Image_11R --steps 800 [--no-scale-jitter]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from semiseg.models.unet import UNet

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
TEST = ["Image_12R", "Image_13L", "Image_13R", "Image_14L", "Image_14R"]  # the papers' last 5


def load(root: str, name: str) -> tuple[Image.Image, Image.Image]:
    image = Image.open(f"{root}/{name}.jpg").convert("RGB")
    mask = Image.open(f"{root}/{name}_1stHO.png").convert("L")
    size = (round(image.size[0] * 0.5), round(image.size[1] * 0.5))  # cpu-small: ×0.5
    return image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)


def to_tensors(image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    x = (np.asarray(image, np.float32) / 255 - MEAN) / STD
    m = np.asarray(mask)
    y = (m > 127) if m.max() > 1 else m
    return torch.from_numpy(x.transpose(2, 0, 1)).float(), torch.from_numpy(y.astype(np.int64))


def sample(data, crop: int, scale_jitter: bool):
    image, mask = random.choice(data)
    if scale_jitter:
        s = random.uniform(0.5, 2.0)
        size = (int(image.size[0] * s), int(image.size[1] * s))
        image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
    x0, y0 = random.randint(0, image.size[0] - crop), random.randint(0, image.size[1] - crop)
    box = (x0, y0, x0 + crop, y0 + crop)
    image, mask = image.crop(box), mask.crop(box)
    if random.random() < 0.5:
        image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensors(image, mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="../shared/data/chase_db1")
    p.add_argument("--labeled", required=True, help="comma-separated image names")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--widths", default="16,32,64,128,256")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-scale-jitter", action="store_true")
    p.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    data = [load(args.root, n) for n in args.labeled.split(",")]
    model = UNet(3, 2, [int(w) for w in args.widths.split(",")])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    start = time.time()
    for it in range(args.steps):
        xs, ys = zip(*[sample(data, 128, not args.no_scale_jitter) for _ in range(4)])
        for group in opt.param_groups:
            group["lr"] = 0.01 * (1 - it / args.steps) ** 0.9
        loss = F.cross_entropy(model(torch.stack(xs)), torch.stack(ys), ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 200 == 0:
            print(f"step {it} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    confusion = np.zeros((2, 2))
    with torch.no_grad():
        for name in TEST:
            x, y = to_tensors(*load(args.root, name))
            h, w = y.shape
            padded = F.pad(x[None], (0, (32 - w % 32) % 32, 0, (32 - h % 32) % 32))
            pred = model(padded)[0, :, :h, :w].argmax(0)
            confusion += np.bincount((y * 2 + pred).flatten().numpy(), minlength=4).reshape(2, 2)
    iou = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    print(
        f"labeled {args.labeled} steps {args.steps} scale_jitter {not args.no_scale_jitter}: "
        f"IoU background {iou[0]:.4f} vessel {iou[1]:.4f} mIoU {iou.mean():.4f}"
    )
    if args.out:
        result = {
            "command": "python benchmarks/plain_loop_check.py " + " ".join(sys.argv[1:]),
            "labeled": args.labeled.split(","),
            "steps": args.steps,
            "widths": args.widths,
            "scale_jitter": not args.no_scale_jitter,
            "iou": {"background": float(iou[0]), "vessel": float(iou[1])},
            "miou": float(iou.mean()),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
