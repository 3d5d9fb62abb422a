"""Names → segmentation networks: :func:`build_model` turns a model's config (a
:class:`~semiseg.config.ModelConfig` subclass) into a :class:`~semiseg.models.base.Segmenter`
(weights loaded, feature-perturbation rate set).

Models are registered by name in :data:`semiseg.registry.MODELS` (``model.name``): a builder
``(cfg, in_channels, num_classes) -> Segmenter`` per network, the built-in ones beside their classes
(:func:`~semiseg.models.unet.build_unet`, :func:`~semiseg.models.deeplabv3plus.build_deeplabv3plus`,
:func:`~semiseg.models.guidedmix.build_guidedmix`) and imported on first use. A builder's ``Config``
attribute is the schema of its ``model`` section (:data:`~semiseg.config.MODEL_CONFIGS`; the
options every model has, :class:`~semiseg.config.ModelConfig`, when it has none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from ..config import MODEL_CONFIGS, ModelConfig
from ..errors import ConfigError
from ..registry import MODELS
from .base import Segmenter
from .weights import load_backbone_weights

ModelBuilder = Callable[[ModelConfig, int, int], Segmenter]


def register_model(
    name: str, config: type[ModelConfig] | None = None
) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder ``(cfg, in_channels, num_classes) -> Segmenter`` under ``model.name``;
    ``config``: the dataclass of its options (a :class:`~semiseg.config.ModelConfig` subclass, set as
    the builder's ``Config``), validated by the config loader like a method's."""
    register = MODELS.register(name)

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if config is not None:
            builder.Config = config  # type: ignore[attr-defined]
        return register(builder)

    return decorate


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> Segmenter:
    """Build the segmenter named by ``cfg.name``, load ``cfg.weights`` into its backbone, set
    ``fp_dropout``.

    Raises:
        ConfigError: unknown ``model.name``, invalid option, unreadable or mismatching weights file.
    """
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r} (known: {', '.join(sorted(MODELS))})")
    own = MODEL_CONFIGS[cfg.name]
    if not isinstance(cfg, own):  # the options every model has (ModelConfig()): the model's defaults
        cfg = own(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    if not 0.0 <= cfg.fp_dropout < 1.0:
        raise ConfigError(f"model.fp_dropout: must be in [0, 1), got {cfg.fp_dropout}")
    if cfg.pretrained and cfg.weights:
        raise ConfigError("model.weights: set either model.pretrained or model.weights, not both")
    if in_channels < 1 or num_classes < 1:
        raise ConfigError(
            f"model: need in_channels >= 1 and num_classes >= 1, got {in_channels}, {num_classes}"
        )
    model = MODELS[cfg.name](cfg, in_channels, num_classes)
    if cfg.weights:
        load_backbone_weights(backbone_module(model), cfg.weights)
    model.fp_dropout = cfg.fp_dropout
    return model


def backbone_module(model: Segmenter) -> nn.Module:
    """The sub-module whose parameters :meth:`Segmenter.backbone_parameters` returns."""
    get = getattr(model, "backbone_module", None)
    if callable(get):
        return get()
    raise TypeError(f"{type(model).__name__} has no backbone_module()")


__all__ = ["MODELS", "ModelBuilder", "backbone_module", "build_model", "register_model"]
