"""Training methods; importing this package registers every built-in method."""

from . import supervised  # noqa: F401
from .base import METHODS, Batch, Method, MethodConfig, StepInfo, register_method

__all__ = ["METHODS", "Batch", "Method", "MethodConfig", "StepInfo", "register_method"]
