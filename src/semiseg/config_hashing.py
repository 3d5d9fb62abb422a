"""What enters a run's :func:`config_hash` (the identity of its result, which caches grid cells).

Two dataclass field-metadata keys decide it, so no key list lives here: ``VOLATILE`` (a setting that
cannot change a result: worker and thread counts, logging and checkpoint intervals, names; declared
with :func:`volatile`) and ``HASH_NEUTRAL`` (an option added after results were cached, left out of
the hash at its default). The schema (:mod:`semiseg.config_schema`) and the method / plug-in config
classes mark their fields with them; :mod:`semiseg.config` re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config_schema import RunConfig

HASH_NEUTRAL = "hash_neutral"  # dataclass field metadata key, see config_hash
VOLATILE = "volatile"  # dataclass field metadata key: cannot change a result, see config_hash


@dataclass(frozen=True)
class HashedAs:
    """``metadata={VOLATILE: HashedAs(value)}``: volatile, but hashed as the constant ``value``.

    For a setting that was part of the hash before it was declared volatile: ``value`` is what every
    cached run had, so their hashes stay valid while any value now gives the same hash.
    """

    value: Any


def volatile(default: Any = dataclasses.MISSING, *, hashed_as: Any = dataclasses.MISSING) -> Any:
    """A field that cannot change a run's result (left out of :func:`config_hash`, or hashed as
    the constant ``hashed_as``)."""
    mark = True if hashed_as is dataclasses.MISSING else HashedAs(hashed_as)
    return field(default=default, metadata={VOLATILE: mark})


def _field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (built from its ``default_factory`` when it has one)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _hash_view(obj: Any, tree: dict) -> None:
    """Apply the field metadata to ``tree`` (``asdict(obj)``), recursively (nested sections and
    plug-in configs): a ``VOLATILE`` field is removed (or set to its ``HashedAs`` constant), a
    ``HASH_NEUTRAL`` field at its default is removed."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        mark = f.metadata.get(VOLATILE)
        if isinstance(mark, HashedAs):
            tree[f.name] = mark.value
        elif mark or f.metadata.get(HASH_NEUTRAL) and value == _field_default(f):
            tree.pop(f.name, None)
        elif dataclasses.is_dataclass(value) and isinstance(tree.get(f.name), dict):
            _hash_view(value, tree[f.name])
        elif isinstance(value, dict) and isinstance(tree.get(f.name), dict):  # plug-in configs
            for key, item in value.items():
                if dataclasses.is_dataclass(item) and isinstance(tree[f.name].get(key), dict):
                    _hash_view(item, tree[f.name][key])


_drop_hash_neutral = _hash_view  # its name before volatile fields joined it


def hashed_tree(cfg: Any) -> dict:
    """The mapping :func:`config_hash` hashes: ``asdict(cfg)`` after the field metadata."""
    tree = dataclasses.asdict(cfg)
    _hash_view(cfg, tree)
    return tree


def config_hash(cfg: RunConfig) -> str:
    """Stable short hash of everything that changes a run's result (it caches grid cells and
    guards ``--resume``).

    Field metadata decides what enters it, so no key list lives here:

    * ``VOLATILE`` (:func:`volatile`): a setting that cannot change a result (``name``,
      ``run_dir``, ``data.num_workers`` / ``resize_crop_only``, ``train.threads`` / ``channels_last`` /
      ``log_every`` / ``ckpt_every`` / ``progress``: thread count, memory format and windowed
      resampling change only float rounding) is
      left out, so resuming or finishing a grid with other worker or thread counts
      never re-runs a cell. A field that used to be hashed is hashed as a constant instead
      (``HashedAs``), so cached hashes stay valid.
    * ``HASH_NEUTRAL``: an option added after results were cached, whose default reproduces the
      old behaviour, is declared ``field(default=..., metadata={HASH_NEUTRAL: True})``: at its
      default it is left out, so adding it does not invalidate finished grid cells; any other value
      changes the hash.
    """
    blob = json.dumps(hashed_tree(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
