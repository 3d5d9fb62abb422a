"""semiseg: semi-supervised semantic segmentation when labels are scarce.

The Python API (:mod:`semiseg.api`) is available at the top level and imported on first use, so
``import semiseg`` stays light (no torch)::

    import semiseg

    result = semiseg.train("demo", overrides={"train.iters": 200})
    predictor = semiseg.load(result.run_dir)          # a run, a checkpoint or an export folder
    prediction = predictor.predict(image)             # .mask H×W, .probs C×H×W

Library messages go to the ``semiseg`` logger (:mod:`logging`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

logging.getLogger("semiseg").addHandler(logging.NullHandler())

#: Public name -> module (relative to this package) that defines it; imported on first access.
_LAZY = {
    "train": "api",
    "load": "api",
    "registered": "api",
    "Predictor": "api",
    "Prediction": "api",
    "TrainResult": "trainer",
    "export_model": "export",
    "load_exported": "export",
}

if TYPE_CHECKING:
    from .api import Prediction, Predictor, load, registered, train
    from .export import export_model, load_exported
    from .trainer import TrainResult

__all__ = [
    "Prediction",
    "Predictor",
    "TrainResult",
    "__version__",
    "export_model",
    "load",
    "load_exported",
    "registered",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'semiseg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
