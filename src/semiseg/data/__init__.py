"""Datasets, readers, augmentations and samplers."""
