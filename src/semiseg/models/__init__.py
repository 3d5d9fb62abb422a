"""Segmentation networks behind one interface (:class:`~semiseg.models.base.Segmenter`)."""

from .base import Segmenter, SegOutput
from .registry import build_model

__all__ = ["SegOutput", "Segmenter", "build_model"]
