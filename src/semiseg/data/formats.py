"""Imports every built-in dataset module. Not needed to use them: the built-in datasets, readers and
label maps are registered lazily in :mod:`semiseg.registry` and imported on first use."""

from . import acdc, chase, cityscapes, covid, folder, synthetic, voc  # noqa: F401
