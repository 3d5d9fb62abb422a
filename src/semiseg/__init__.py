"""semiseg: semi-supervised semantic segmentation when labels are scarce."""

__version__ = "0.1.0"
