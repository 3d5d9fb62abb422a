"""Plug-ins that attach to any semi-supervised method (SUFD, later MPMC); importing this package
registers them. The interface is documented in :mod:`semiseg.plugins.base`."""

from . import sufd  # noqa: F401
from .base import PLUGINS, Plugin, PluginConfig, PluginHost, StepContext, register_plugin
from .sufd import SUFD, Discriminator, SUFDConfig

__all__ = [
    "PLUGINS",
    "SUFD",
    "Discriminator",
    "Plugin",
    "PluginConfig",
    "PluginHost",
    "SUFDConfig",
    "StepContext",
    "register_plugin",
]
