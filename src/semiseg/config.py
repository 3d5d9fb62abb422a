"""Typed run configuration.

A config is YAML. A file may inherit from others with ``_base_: other.yaml`` (or a list; paths are
relative to the file); mappings merge deeply, everything else is replaced. Command-line overrides
``--set train.iters=200`` are applied last (the value is parsed as YAML). The merged mapping is then
checked against the schema dataclasses: an unknown key or a wrong type raises :class:`ConfigError`
naming the dotted key. The ``method`` section and every entry of ``plugins`` are validated against
the config dataclass registered by that method or plug-in, so each method owns its options.

The schema is derived from the registries (:mod:`semiseg.registry`): a field marked
``metadata={CHOICES: <registry>}`` (``model.name``, ``method.mix``, ``method.pseudo.mask``, ...)
accepts the registered names, and ``method`` / ``plugins.<name>`` use the ``Config`` class of the
registered method / plug-in. Built-in registry entries are lazy, so importing this module imports no
method, plug-in or model (they are imported when a config naming them is built).

Two other field-metadata keys describe how a field enters :func:`config_hash` (the identity of a
run's result, which caches grid cells): ``VOLATILE`` (a setting that cannot change a result:
worker and thread counts, logging and checkpoint intervals, names) and ``HASH_NEUTRAL`` (an option
added after results were cached, left out of the hash at its default).

The code lives in three modules, re-exported here (import from ``semiseg.config``):
:mod:`semiseg.config_schema` (the dataclasses), :mod:`semiseg.config_load` (YAML, overrides,
validation) and :mod:`semiseg.config_hashing` (:func:`config_hash` and the field markers).
"""

from __future__ import annotations

from .config_hashing import (
    HASH_NEUTRAL,
    VOLATILE,
    HashedAs,
    _drop_hash_neutral,
    _field_default,
    _hash_view,
    config_hash,
    hashed_tree,
    volatile,
)
from .config_load import (
    BUILTIN_CONFIGS,
    _check_values,
    _coerce,
    _deep_merge,
    _type_name,
    apply_overrides,
    build_config,
    build_dataclass,
    config_to_dict,
    dump_config,
    load_config,
    load_config_file,
    load_yaml_tree,
    resolve_config_path,
)
from .config_schema import (
    CHOICES,
    METHOD_CONFIGS,
    PLUGIN_CONFIGS,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    StrongAugConfig,
    SyntheticConfig,
    TrainConfig,
    registered_name,
)

__all__ = [
    "BUILTIN_CONFIGS",
    "CHOICES",
    "HASH_NEUTRAL",
    "METHOD_CONFIGS",
    "PLUGIN_CONFIGS",
    "VOLATILE",
    "DataConfig",
    "EvalConfig",
    "HashedAs",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "StrongAugConfig",
    "SyntheticConfig",
    "TrainConfig",
    "_check_values",
    "_coerce",
    "_deep_merge",
    "_drop_hash_neutral",
    "_field_default",
    "_hash_view",
    "_type_name",
    "apply_overrides",
    "build_config",
    "build_dataclass",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "hashed_tree",
    "load_config",
    "load_config_file",
    "load_yaml_tree",
    "registered_name",
    "resolve_config_path",
    "volatile",
]
