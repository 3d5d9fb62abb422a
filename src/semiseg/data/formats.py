"""Importing this module registers every built-in dataset builder and reader."""

from . import acdc, chase, cityscapes, covid, folder, synthetic, voc  # noqa: F401
