"""Plug-ins that attach to any semi-supervised method (SUFD, MPMC), registered by name in
:data:`semiseg.registry.PLUGINS`. The interface is documented in :mod:`semiseg.plugins.base`."""

from .base import PLUGINS, Plugin, PluginConfig, PluginHost, StepContext, register_plugin
from .mpmc import MPMC, MPMCConfig, MPMCHead
from .sufd import SUFD, Discriminator, SUFDConfig

__all__ = [
    "MPMC",
    "PLUGINS",
    "SUFD",
    "Discriminator",
    "MPMCConfig",
    "MPMCHead",
    "Plugin",
    "PluginConfig",
    "PluginHost",
    "SUFDConfig",
    "StepContext",
    "register_plugin",
]
