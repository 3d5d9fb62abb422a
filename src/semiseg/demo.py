"""``semiseg demo``: supervised U-Net on the synthetic dataset; table, overlays and loss curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import RunConfig
from .data.io import image_to_tensor, read_record
from .evaluate import pad_value_for, predict_logits
from .plots import plot_training_curves, prediction_figure
from .run_dir import fresh_run_dir
from .trainer import Trainer

__all__ = ["fresh_run_dir", "run_demo", "write_overlays"]


def write_overlays(
    cfg: RunConfig,
    model: torch.nn.Module,
    records,
    class_names,
    palette,
    in_channels,
    out_dir: Path,
    device: torch.device,
    limit: int = 8,
) -> list[Path]:
    """For each record, one figure: image | ground truth | prediction, titled, with a class legend
    (ground truth and prediction both drawn over the image)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    model.eval()
    for record in records[:limit]:
        image, mask = read_record(record, cfg.data, len(class_names), in_channels)
        x = image_to_tensor(image, cfg.data).unsqueeze(0).to(device)
        with torch.inference_mode():
            logits = predict_logits(model, x, cfg.eval, pad_value=pad_value_for(cfg.data, in_channels))
            pred = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        path = out_dir / f"{record.name}_overlay.png"
        written.append(prediction_figure(image, mask, pred, class_names, palette, path, title=record.name))
    return written


def run_demo(cfg: RunConfig, run_dir: str | None = None) -> Path:
    target = Path(run_dir) if run_dir else fresh_run_dir(Path("runs") / cfg.name)
    print(
        f"semiseg demo: supervised U-Net on the synthetic dataset, {cfg.train.iters} iterations -> {target}"
    )
    trainer = Trainer(cfg, target, resume=False)
    trainer.fit()
    overlays = write_overlays(
        cfg,
        trainer.method.eval_model(),
        trainer.splits.test,
        trainer.splits.class_names,
        trainer.splits.palette,
        trainer.splits.in_channels,
        target / "overlays",
        trainer.device,
    )
    curve = plot_training_curves({cfg.name: target / "metrics.jsonl"}, target / "loss_curve.png")
    print(f"\noverlays (image | ground truth | prediction): {len(overlays)} files in {target / 'overlays'}")
    print(f"loss curve: {curve}")
    print(f"checkpoint: {target / 'latest.pt'}  (try: semiseg eval {target / 'latest.pt'})")
    return target
