"""Training methods (registered by name in :data:`semiseg.registry.METHODS`, imported on first use).

:func:`build_method` is what the trainer calls: it builds the configured method around the segmenter
and attaches the configured plug-ins (``plugins.<name>`` sections, see :mod:`semiseg.plugins.base`).
"""

from __future__ import annotations

from ..config import RunConfig
from ..errors import ConfigError
from ..models.base import Segmenter
from ..plugins.base import PLUGINS, PluginHost
from .base import METHODS, Batch, Method, MethodConfig, StepInfo, StepResult, register_method
from .bcp import BCP, BCPConfig
from .fixmatch import FixMatch, FixMatchConfig
from .guidedmix import GuidedMix, GuidedMixConfig
from .mean_teacher import MeanTeacher, MeanTeacherConfig
from .semi import SemiSupervisedConfig, UnlabeledRecipe
from .supervised import Supervised, SupervisedConfig, labeled_loss
from .unimatch import UniMatch, UniMatchConfig


def build_method(cfg: RunConfig, model: Segmenter, num_classes: int) -> Method:
    """``METHODS[cfg.method.name](model, cfg.method, num_classes)`` with ``cfg.plugins`` attached.

    Each plug-in is built as ``PLUGINS[name](plugin_cfg, num_classes=..., model=model,
    total_steps=cfg.train.iters)``. Raises :class:`~semiseg.errors.ConfigError` naming
    ``plugins.<name>`` when the method cannot host it (a method without plug-in hooks, or a plug-in
    that needs unlabeled data on a method that uses none, e.g. ``supervised``).
    """
    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    METHODS[name].check_run(cfg)
    method = METHODS[name](model, cfg.method, num_classes)
    plugins = {}
    for pname, pcfg in cfg.plugins.items():
        if pname not in PLUGINS:
            raise ConfigError(f"plugins.{pname}: unknown plug-in (known: {', '.join(sorted(PLUGINS))})")
        cls = PLUGINS[pname]
        if cls.needs_unlabeled and not method.uses_unlabeled:
            raise ConfigError(
                f"plugins.{pname}: needs unlabeled data, but method {name!r} uses none; "
                f"remove plugins.{pname} or choose a semi-supervised method"
            )
        if not isinstance(method, PluginHost):
            raise ConfigError(f"plugins.{pname}: method {name!r} does not accept plug-ins")
        plugins[pname] = cls(pcfg, num_classes=num_classes, model=model, total_steps=cfg.train.iters)
    if plugins:
        method.attach_plugins(plugins)
    return method


__all__ = [
    "METHODS",
    "BCP",
    "BCPConfig",
    "Batch",
    "FixMatch",
    "FixMatchConfig",
    "GuidedMix",
    "GuidedMixConfig",
    "MeanTeacher",
    "MeanTeacherConfig",
    "Method",
    "MethodConfig",
    "SemiSupervisedConfig",
    "StepInfo",
    "StepResult",
    "Supervised",
    "SupervisedConfig",
    "UniMatch",
    "UniMatchConfig",
    "UnlabeledRecipe",
    "build_method",
    "labeled_loss",
    "register_method",
]
