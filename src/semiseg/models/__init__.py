"""Segmentation networks behind one interface (:class:`~semiseg.models.base.Segmenter`), built by
name with :func:`build_model` (:data:`semiseg.registry.MODELS`; :func:`register_model` adds one)."""

from .base import Segmenter, SegOutput
from .registry import build_model, register_model

__all__ = ["SegOutput", "Segmenter", "build_model", "register_model"]
