"""The config hash: the identity of a run's result, which caches grid cells and guards ``--resume``.

One versioned hash, every rule in this module (the config classes carry no hash markers):

* :data:`VOLATILE`: settings that cannot change a result (names, worker and thread counts, memory
  format, compilation, logging and checkpoint intervals) are left out, so finishing or resuming a
  grid with other worker or thread counts never re-runs a cell. :data:`PINNED`: a setting that was
  hashed before it was declared volatile is hashed as the constant every cached run had.
* :data:`MIGRATIONS`: every change of the config schema since version 1, the schema of the first
  cached results, in order. The hash is always taken of the **version-1 view** of a config: each
  migration, newest first, turns the current tree back into the tree its version replaced (an
  option added at its no-op value is left out; a moved option goes back to its old place; a section
  split per choice is flattened again, the other choices' options at their frozen old defaults). A run
  recorded under any earlier version therefore keeps its hash, and a new option changes a hash only
  when it is set to something that changes the run. :data:`SCHEMA_VERSION` is the current version;
  checkpoints and ``results.json`` carry it.

A schema change that alters a result at its default is not a migration: it must change the hash
(bump nothing, let the old records go stale). ``tests/test_config.py`` re-hashes every committed
record of every grid, so a migration that does not reproduce the old view fails there.

This module lives at the bottom of the package (it imports nothing from it): the trainer's resume
guard and checkpoints need the hash as much as the grids in :mod:`semiseg.experiment` do.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config_schema import RunConfig

Tree = dict[str, Any]

# Dotted paths of settings that cannot change a result (thread count, memory format and windowed
# resampling change only float rounding; resume is exact from any checkpoint step).
VOLATILE: frozenset[str] = frozenset(
    {
        "name",
        "run_dir",
        "data.resize_crop_only",
        "train.log_every",
        "train.ckpt_every",
        "train.threads",
        "train.channels_last",
        "train.compile",
        "train.progress",
        "plugins.sufd.fused",
    }
)
# Volatile settings that were hashed before they were declared volatile: hashed as this constant.
PINNED: dict[str, Any] = {"data.num_workers": 0}


@dataclass(frozen=True)
class Added:
    """Schema ``version`` added the option at ``path``; runs of the version before it behaved as
    ``value``, so the version-1 view leaves the key out while it equals ``value`` (any other value
    enters the hash). ``method`` / ``other_than``: only in configs whose ``method.name`` is / is not
    one of these (an option whose no-op value differs between methods)."""

    version: int
    path: str
    value: Any
    method: str | None = None
    other_than: tuple[str, ...] = ()

    def undo(self, tree: Tree) -> None:
        method = tree.get("method", {}).get("name")
        if self.method is not None and method != self.method or method in self.other_than:
            return
        parent, key = _parent(tree, self.path)
        if parent is not None and key in parent and parent[key] == self.value:
            del parent[key]


@dataclass(frozen=True)
class Moved:
    """Schema ``version`` moved options into the section at ``path``; ``undo`` writes the old tree
    back (``to_old`` maps the section and its parent to the keys the parent had)."""

    version: int
    path: str
    to_old: Callable[[Tree, Tree], Tree]

    def undo(self, tree: Tree) -> None:
        parent, key = _parent(tree, self.path)
        if parent is not None and key in parent:
            parent.update(self.to_old(parent.pop(key), parent))


@dataclass(frozen=True)
class Split:
    """Schema ``version`` split the flat section at ``path`` into one section per choice of its
    ``name`` (each holding only its own options); ``undo`` writes the flat section back: every old
    key at ``old_defaults(tree)`` (the value runs of the version before it recorded where the chosen
    choice did not read the key), overwritten by the section's own keys."""

    version: int
    path: str
    old_defaults: Callable[[Tree], Tree]

    def undo(self, tree: Tree) -> None:
        parent, key = _parent(tree, self.path)
        if parent is not None and isinstance(parent.get(key), dict):
            parent[key] = {**self.old_defaults(tree), **parent[key]}


Migration = Added | Moved | Split

_PSEUDO_FIXED = {
    "mask": "fixed",
    "align": "none",
    "momentum": 0.99,
    "flexmatch_warmup": True,
    "flexmatch_mapping": "convex",
    "min_prior": 0.0001,
}

_FLAT_MIXER_DEFAULTS = {
    "classmix_p": 0.5,
    "classmix_rounding": "ceil",
    "supmix_p": 0.5,
    "supmix_fallback": "cutmix",
    "supmix_exclude": [0],
    "supmix_strategy": "paper",
    "supmix_difficulty": "iou",
    "supmix_stat_momentum": 0.99,
    "supmix_min_weight": 0.05,
    "supmix_source": "weak",
}

# The flat ``model`` section of versions 1-2 (every model's options in one class) at its defaults.
# Frozen: version 3 gave each model its own section, and this is what runs before it recorded for the
# options their model did not read.
FLAT_MODEL_DEFAULTS: Tree = {
    "name": "unet",
    "widths": [16, 32, 64, 128, 256],
    "dropout": None,
    "upsample": "bilinear",
    "backbone": "resnet101",
    "pretrained": False,
    "weights": None,
    "output_stride": 16,
    "aspp_rates": [6, 12, 18],
    "low_level_channels": 48,
    "fp_dropout": 0.5,
    "backbone_widths": None,
    "psp_bins": [1, 2, 3, 6],
    "psp_channels": 512,
    "decoder_channels": [256, 128, 64, 32, 16],
    "mitrans": True,
    "mitrans_levels": [0, 1],
    "mitrans_zero_init": False,
}
# Where a protocol file set an option of one model for every run composed with it, runs of the other
# models recorded that value (unread): protocols/cpu_small.yaml's U-Net widths in GuidedMix-Net runs.
FLAT_MODEL_PROTOCOL_DEFAULTS: dict[str, Tree] = {"cpu-small": {"widths": [8, 16, 32, 64, 128]}}


def flat_model_defaults(protocol: Any) -> Tree:
    """The flat ``model`` section of versions 1-2 as a run labelled ``protocol`` recorded it for the
    options its model did not read (a fresh copy)."""
    extra = FLAT_MODEL_PROTOCOL_DEFAULTS.get(protocol, {}) if isinstance(protocol, str) else {}
    return copy.deepcopy({**FLAT_MODEL_DEFAULTS, **extra})


# Every schema change since version 1, oldest first. Version 2: the options added while the first
# grids were being cached (model variants, evaluation options, the unlabeled-loss recipe, the EMA
# teacher, plug-in variants), each with the value that reproduces the runs before it. Version 3: the
# flat ``model`` section split into one per model (undone onto FLAT_MODEL_DEFAULTS).
MIGRATIONS: tuple[Migration, ...] = (
    Added(2, "data.size", None),
    Added(2, "data.mask_values", None),
    Added(2, "model.backbone_widths", None),
    Added(2, "model.psp_bins", [1, 2, 3, 6]),
    Added(2, "model.psp_channels", 512),
    Added(2, "model.decoder_channels", [256, 128, 64, 32, 16]),
    Added(2, "model.mitrans", True),
    Added(2, "model.mitrans_levels", [0, 1]),
    Added(2, "model.mitrans_zero_init", False),
    Added(2, "train.init_from", None),
    Added(2, "eval.surface_metrics", True),
    Added(2, "eval.unit", "auto"),
    Added(2, "eval.ema", False),
    Added(2, "eval.ema_decay", 0.99),
    Added(2, "eval.ema_start", 0),
    Added(2, "eval.ema_warmup", True),
    Added(2, "eval.ema_bn_batches", 50),
    Added(2, "method.dice_squared", False, other_than=("bcp",)),
    Added(2, "method.dice_squared", True, method="bcp"),
    Added(2, "method.pseudo", _PSEUDO_FIXED),
    Added(2, "method.warmup_iters", 0),
    Added(2, "method.rampup_iters", 0),
    Added(2, "method.labeled_weight", None),
    Added(2, "method.unlabeled_loss", "ce"),
    Added(2, "method.diagnostics", True),
    Added(2, "method.supmix_source", "weak"),
    Added(2, "method.teacher", "self"),
    Added(2, "method.teacher_decay", 0.99),
    Added(2, "method.unmix", False),
    Added(2, "plugins.sufd.input_scale", 1.0),
    Added(2, "plugins.mpmc.lambda_s", "gamma"),
    # Version 3: the mixers own their options (``method.mixer``, validated against the registered
    # mixer's Config) instead of flat ``classmix_*`` / ``supmix_*`` fields of every method config.
    Moved(3, "method.mixer", lambda section, method: _flat_mixer_options(section, method["mix"])),
    # Version 3: each model owns its section (``model``, validated against the chosen model's Config)
    # instead of one flat class with every model's options.
    Split(3, "model", lambda tree: flat_model_defaults(tree.get("protocol"))),
)
SCHEMA_VERSION = 3


def _flat_mixer_options(section: Tree | None, mix: str) -> Tree:
    """Version 2's flat mixer fields of a method: every built-in mixer's options at the defaults
    they had then, the chosen mixer's own ones (``section``) under its prefix."""
    flat = dict(_FLAT_MIXER_DEFAULTS)
    flat.update({f"{mix}_{key}": value for key, value in (section or {}).items()})
    return flat


def _parent(tree: Tree, path: str) -> tuple[Tree | None, str]:
    """The mapping holding the last key of dotted ``path`` (``None`` where a section is absent)."""
    *sections, key = path.split(".")
    node: Any = tree
    for name in sections:
        node = node.get(name) if isinstance(node, dict) else None
        if node is None:
            return None, key
    return (node if isinstance(node, dict) else None), key


def version_one_view(tree: Tree) -> Tree:
    """``tree`` (a config as nested mappings) as the version-1 schema had it, with the volatile
    settings left out or pinned: what :func:`config_hash` hashes."""
    view = copy.deepcopy(tree)
    for path in VOLATILE:
        parent, key = _parent(view, path)
        if parent is not None:
            parent.pop(key, None)
    for path, value in PINNED.items():
        parent, key = _parent(view, path)
        if parent is not None and key in parent:
            parent[key] = value
    for migration in sorted(MIGRATIONS, key=lambda m: m.version, reverse=True):
        migration.undo(view)
    return view


def hashed_tree(cfg: Any) -> Tree:
    """The mapping :func:`config_hash` hashes: :func:`version_one_view` of ``asdict(cfg)``."""
    return version_one_view(dataclasses.asdict(cfg))


def config_hash(cfg: RunConfig) -> str:
    """Stable short hash of everything that changes a run's result (module docstring)."""
    blob = json.dumps(hashed_tree(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
