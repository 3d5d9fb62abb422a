"""Export a trained segmenter as plain files, and load it back without the training code.

:func:`export_model` turns a run directory or checkpoint into a folder holding

* ``model.safetensors`` — the evaluated network's weights only (the segmenter, or a Mean Teacher's
  teacher), no optimizer, RNG or method state;
* ``model.yaml`` — everything inference needs: the model config (``model.*``, with ``pretrained``
  off and no ``weights`` file, since the weights are in ``model.safetensors``), input channels,
  number of classes, class names, palette, normalisation mean / std, ``data.size`` /
  ``data.resize`` / ``data.long_side`` and the inference settings ``eval.mode`` / ``window`` / ``overlap`` /
  ``size_divisor``;
* optionally ``model.pt2`` (``torch_export=True``): a :func:`torch.export.export` program mapping a
  **normalised** ``N×C×H×W`` float batch to ``N×K×H×W`` logits at the input size, for consumers
  without semiseg (``torch.export.load(path).module()(x)``); batch, height and width are dynamic
  when the network allows it (height / width as multiples of ``size_divisor``), else the shape of
  the example input is fixed (``model.yaml`` says which);
* optionally ``model.onnx`` (``onnx=True``) when the ``onnx`` and ``onnxscript`` packages are
  installed (a one-line error otherwise, before anything is written).

:func:`load_exported` rebuilds the network from ``model.yaml`` and ``model.safetensors`` alone,
with the model classes (:mod:`semiseg.models`) and nothing of the trainer, methods, plug-ins or
checkpoints, and returns it with its :class:`InferenceSpec`. ``semiseg.load(export_dir)`` wraps it
in a :class:`~semiseg.api.Predictor` that preprocesses exactly like ``semiseg predict``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn

from . import __version__
from .config import DataConfig, EvalConfig, ModelConfig, build_dataclass, build_model_config
from .data.io import normalization
from .errors import OutputExistsError, SemisegError
from .models.registry import build_model

log = logging.getLogger("semiseg")

EXPORT_FORMAT = "semiseg-export"
EXPORT_VERSION = 2  # 2: data.size (a fixed input size); 1 is still written when it is unset
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.yaml"
TORCH_EXPORT_FILE = "model.pt2"
ONNX_FILE = "model.onnx"


def _fixed_size(value: Any) -> list[int] | None:
    """``data.size`` of an export (absent in exports written before it existed): ``[H, W]`` or None."""
    if value is None:
        return None
    size = [int(v) for v in value]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"data.size must be [H, W] with H, W >= 1, got {value}")
    return size


@dataclass
class InferenceSpec:
    """What a trained network needs at inference, from a checkpoint or an export's ``model.yaml``."""

    model: ModelConfig
    in_channels: int
    num_classes: int
    class_names: list[str]
    palette: list[tuple[int, int, int]]
    mean: list[float]
    std: list[float]
    resize: float = 1.0
    long_side: int | None = None
    size: list[int] | None = None  # data.size: a fixed [H, W] input, before resize / long_side
    eval: EvalConfig = field(default_factory=EvalConfig)

    def data_config(self) -> DataConfig:
        """The data settings inference reads (size / resize, normalisation) as a :class:`DataConfig`."""
        return DataConfig(
            resize=self.resize,
            long_side=self.long_side,
            size=None if self.size is None else list(self.size),
            mean=list(self.mean),
            std=list(self.std),
        )

    @classmethod
    def from_run(cls, cfg: Any, ckpt: dict) -> InferenceSpec:
        """From a run's resolved config and checkpoint (:func:`~semiseg.inference.load_trained_model`)."""
        in_channels, num_classes = int(ckpt["in_channels"]), int(ckpt["num_classes"])
        mean, std = normalization(cfg.data, in_channels)
        model_cfg = dataclasses.replace(cfg.model, pretrained=False, weights=None)
        return cls(
            model=model_cfg,
            in_channels=in_channels,
            num_classes=num_classes,
            class_names=[str(n) for n in ckpt["class_names"]],
            palette=[tuple(int(v) for v in c) for c in ckpt["palette"]],
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            resize=float(cfg.data.resize),
            long_side=cfg.data.long_side,
            size=None if not cfg.data.size else [int(v) for v in cfg.data.size],
            eval=dataclasses.replace(cfg.eval),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "data": {"resize": self.resize, "long_side": self.long_side, "size": self.size},
            "eval": {
                "mode": self.eval.mode,
                "window": self.eval.window,
                "overlap": self.eval.overlap,
                "size_divisor": self.eval.size_divisor,
            },
        }

    @classmethod
    def from_dict(cls, tree: dict, where: str = SPEC_FILE) -> InferenceSpec:
        """Validate an export's ``model.yaml`` mapping (one-line :class:`SemisegError` naming the key)."""
        try:
            # an export of schema version <= 2 lists every model's options (unread by its network)
            model_cfg = build_model_config(dict(tree["model"]), strict=False)
            eval_cfg = build_dataclass(EvalConfig, dict(tree.get("eval") or {}), "eval")
            data = tree.get("data") or {}
            norm = tree["normalization"]
            spec = cls(
                model=model_cfg,
                in_channels=int(tree["in_channels"]),
                num_classes=int(tree["num_classes"]),
                class_names=[str(n) for n in tree["class_names"]],
                palette=[tuple(int(v) for v in c) for c in tree["palette"]],
                mean=[float(v) for v in norm["mean"]],
                std=[float(v) for v in norm["std"]],
                resize=float(data.get("resize", 1.0)),
                long_side=None if data.get("long_side") is None else int(data["long_side"]),
                size=_fixed_size(data.get("size")),
                eval=eval_cfg,
            )
        except SemisegError as exc:
            raise SemisegError(f"{where}: {exc}") from None
        except KeyError as exc:
            raise SemisegError(f"{where}: missing entry {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise SemisegError(f"{where}: malformed export description ({exc})") from None
        for name, values in (("normalization.mean", spec.mean), ("normalization.std", spec.std)):
            if len(values) != spec.in_channels or not all(math.isfinite(v) for v in values):
                raise SemisegError(f"{where}: {name}: need {spec.in_channels} finite values, got {values}")
        if len(spec.class_names) != spec.num_classes or len(spec.palette) < spec.num_classes:
            raise SemisegError(
                f"{where}: {spec.num_classes} classes but {len(spec.class_names)} class names and "
                f"{len(spec.palette)} palette colours"
            )
        return spec


class Exported(NamedTuple):
    """:func:`load_exported`'s result: the network (eval mode, on the device) and its spec."""

    model: nn.Module
    spec: InferenceSpec


class LogitsModel(nn.Module):
    """``forward(x) -> logits`` at the input size: the traced / exported form of a segmenter."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        logits = getattr(out, "logits", out)
        if logits.shape[-2:] != x.shape[-2:]:
            logits = torch.nn.functional.interpolate(
                logits, size=x.shape[-2:], mode="bilinear", align_corners=False
            )
        return logits


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def is_export_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / SPEC_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def read_spec(export_dir: str | Path) -> InferenceSpec:
    """The :class:`InferenceSpec` of an export folder's ``model.yaml``."""
    path = Path(export_dir) / SPEC_FILE
    if not path.is_file():
        raise SemisegError(f"{path}: not found (an export folder holds {SPEC_FILE} and {WEIGHTS_FILE})")
    try:
        tree = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SemisegError(f"{path}: invalid YAML ({first})") from None
    if not isinstance(tree, dict) or tree.get("format") != EXPORT_FORMAT:
        raise SemisegError(f"{path}: not a semiseg export description (no 'format: {EXPORT_FORMAT}')")
    version = tree.get("format_version")
    if not isinstance(version, int) or version > EXPORT_VERSION:
        raise SemisegError(
            f"{path}: export format_version {version!r} is newer than this semiseg reads ({EXPORT_VERSION})"
        )
    return InferenceSpec.from_dict(tree, str(path))


def load_exported(export_dir: str | Path, device: str | torch.device = "cpu") -> Exported:
    """Rebuild an exported network from ``model.yaml`` + ``model.safetensors`` (eval mode, on ``device``).

    Uses only :func:`semiseg.models.build_model` (no trainer, method or checkpoint code) and loads
    the weights strictly. Raises :class:`~semiseg.errors.SemisegError` with one line naming the file
    when either file is missing, malformed, or does not match the described network.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    spec = read_spec(export_dir)
    weights = export_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise SemisegError(f"{weights}: not found")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SemisegError(f"{weights}: cannot read weights ({first[:200]})") from None
    model = build_model(spec.model, spec.in_channels, spec.num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SemisegError(f"{weights}: does not match the network {SPEC_FILE} describes ({first})") from None
    model.eval()
    return Exported(model.to(torch.device(device)), spec)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def onnx_missing() -> str | None:
    """Name of the first package ONNX export needs that is not installed (``None``: all there)."""
    for name in ("onnx", "onnxscript"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


def _example_input(spec: InferenceSpec, batch: int = 2) -> torch.Tensor:
    """A normalised example batch whose sides are distinct multiples of the size divisor."""
    div = max(1, spec.eval.size_divisor)
    unit = div * max(1, math.ceil(32 / div))  # at least 32: every built-in network's output stride
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, spec.in_channels, 4 * unit, 5 * unit, generator=generator)


def _dynamic_shapes(spec: InferenceSpec) -> dict[str, dict[int, Any]]:
    div = max(1, spec.eval.size_divisor)
    dim = torch.export.Dim
    return {
        "x": {
            0: dim("batch", min=1, max=1024),
            2: div * dim("height_blocks", min=1, max=16384 // div),
            3: div * dim("width_blocks", min=1, max=16384 // div),
        }
    }


def _torch_export(net: LogitsModel, spec: InferenceSpec) -> tuple[Any, dict[str, Any]]:
    """``(ExportedProgram, description)``: dynamic shapes when the network allows, else static."""
    example = _example_input(spec)
    try:
        program = torch.export.export(net, (example,), dynamic_shapes=_dynamic_shapes(spec))
        info = {"dynamic": True, "example_shape": list(example.shape)}
    except Exception as exc:  # noqa: BLE001 - a network that does not trace symbolically
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("torch.export with dynamic shapes failed (%s); exporting a fixed input shape", first)
        program = torch.export.export(net, (example,))
        info = {"dynamic": False, "example_shape": list(example.shape)}
    info["input"] = "normalised N×C×H×W float32 (see normalization); H and W multiples of eval.size_divisor"
    info["output"] = "N×K×H×W logits"
    return program, info


def _write_onnx(net: LogitsModel, spec: InferenceSpec, path: Path) -> None:
    example = _example_input(spec)
    torch.onnx.export(
        net,
        (example,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_shapes=_dynamic_shapes(spec),
        dynamo=True,
        external_data=False,
    )


def export_model(
    source: str | Path,
    out_dir: str | Path,
    torch_export: bool = False,
    onnx: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export the evaluated network of a run directory or checkpoint to ``out_dir`` (module docstring).

    Returns ``out_dir``. Existing export files are never replaced unless ``overwrite``; a missing
    ONNX package is reported before anything is written, and files appear only once all of them
    have been produced (written to temp names, then renamed).
    """
    from safetensors.torch import save_file

    # Imported here, not above: loading an export (load_exported) must not import checkpoint code.
    from .checkpoint import check_writable, staged_writes
    from .inference import load_trained_model, resolve_run_checkpoint

    out_dir = Path(out_dir)
    if onnx and (missing := onnx_missing()) is not None:
        raise SemisegError(
            f"--onnx: the {missing} package is not installed (pip install onnx onnxscript), so no ONNX "
            "file can be written; export without --onnx, or install it"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise SemisegError(f"{out_dir}: exists and is not a folder")
    names = (
        [WEIGHTS_FILE, SPEC_FILE]
        + ([TORCH_EXPORT_FILE] if torch_export else [])
        + ([ONNX_FILE] if onnx else [])
    )
    if not overwrite:
        for name in names:
            if (out_dir / name).exists():
                raise OutputExistsError(out_dir / name)
    checkpoint = resolve_run_checkpoint(str(source))
    cfg, model, ckpt = load_trained_model(checkpoint, ["model.pretrained=false", "model.weights=null"])
    spec = InferenceSpec.from_run(cfg, ckpt)
    check_writable(out_dir, "export folder")

    description = {
        "format": EXPORT_FORMAT,
        # an export with a fixed input size must not be read by a semiseg that would ignore it
        "format_version": EXPORT_VERSION if spec.size else 1,
        "semiseg_version": __version__,
        "source": {
            "checkpoint": str(checkpoint),
            "step": int(ckpt.get("step", 0)),
            "config_hash": ckpt.get("config_hash"),
            "name": cfg.name,
        },
        **spec.to_dict(),
        "files": {"weights": WEIGHTS_FILE},
    }
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    with staged_writes(out_dir, created, "the export") as staged:

        def stage(name: str) -> Path:
            final = out_dir / name
            tmp = final.with_name(f".{final.stem}.partial{final.suffix}")  # torch.export wants .pt2
            return staged(tmp, final)

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(stage(WEIGHTS_FILE)), metadata={"format": "pt", "description": SPEC_FILE})
        net = LogitsModel(model).eval()
        if torch_export:
            with torch.no_grad():
                program, info = _torch_export(net, spec)
            torch.export.save(program, str(stage(TORCH_EXPORT_FILE)))
            description["files"]["torch_export"] = {"file": TORCH_EXPORT_FILE, **info}
        if onnx:
            _write_onnx(net, spec, stage(ONNX_FILE))
            description["files"]["onnx"] = ONNX_FILE
        stage(SPEC_FILE).write_text(
            yaml.safe_dump(description, sort_keys=False, allow_unicode=True, default_flow_style=None)
        )
    log.info("exported %s (step %s) to %s", checkpoint, ckpt.get("step"), out_dir)
    return out_dir


__all__ = [
    "EXPORT_FORMAT",
    "Exported",
    "InferenceSpec",
    "LogitsModel",
    "export_model",
    "is_export_dir",
    "load_exported",
    "read_spec",
]
