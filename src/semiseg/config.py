"""Typed run configuration.

A config is YAML. A file may inherit from others with ``_base_: other.yaml`` (or a list; paths are
relative to the file); mappings merge deeply, everything else is replaced. Command-line overrides
``--set train.iters=200`` are applied last (the value is parsed as YAML). The merged mapping is then
checked against the schema dataclasses: an unknown key or a wrong type raises :class:`ConfigError`
naming the dotted key. The ``method`` section, every entry of ``plugins`` and the ``model`` section
are validated against the config dataclass registered by that method, plug-in or model, so each owns
its options.

The schema is derived from the registries (:mod:`semiseg.registry`): a field marked
``metadata={CHOICES: <registry>}`` (``model.name``, ``method.mix``, ``method.pseudo.mask``, ...)
accepts the registered names, and ``method`` / ``plugins.<name>`` / ``model`` use the ``Config``
class of the registered method / plug-in / model. Built-in registry entries are lazy, so importing
this module imports no method, plug-in or model (they are imported when a config naming them is built).

What enters :func:`config_hash` (the identity of a run's result, which caches grid cells) is
decided in one place, :mod:`semiseg.config_hashing`: the volatile settings, and the versioned
migrations that keep every earlier result's hash valid.

The code lives in three modules, re-exported here (import from ``semiseg.config``):
:mod:`semiseg.config_schema` (the dataclasses), :mod:`semiseg.config_load` (YAML, overrides,
validation) and :mod:`semiseg.config_hashing` (:func:`config_hash`, the schema version and its migrations).
"""

from __future__ import annotations

from .config_hashing import (
    FLAT_MODEL_DEFAULTS,
    MIGRATIONS,
    PINNED,
    SCHEMA_VERSION,
    VOLATILE,
    Added,
    Moved,
    Split,
    config_hash,
    flat_model_defaults,
    hashed_tree,
    version_one_view,
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
    build_model_config,
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
    MODEL_CONFIGS,
    PLUGIN_CONFIGS,
    SECTION,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    StrongAugConfig,
    SyntheticConfig,
    TrainConfig,
    registered_name,
    registered_section,
)

__all__ = [
    "BUILTIN_CONFIGS",
    "CHOICES",
    "FLAT_MODEL_DEFAULTS",
    "METHOD_CONFIGS",
    "MIGRATIONS",
    "MODEL_CONFIGS",
    "PINNED",
    "SCHEMA_VERSION",
    "PLUGIN_CONFIGS",
    "SECTION",
    "VOLATILE",
    "Added",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "Moved",
    "Split",
    "OptimConfig",
    "RunConfig",
    "StrongAugConfig",
    "SyntheticConfig",
    "TrainConfig",
    "_check_values",
    "_coerce",
    "_deep_merge",
    "_type_name",
    "apply_overrides",
    "build_config",
    "build_dataclass",
    "build_model_config",
    "config_hash",
    "config_to_dict",
    "dump_config",
    "flat_model_defaults",
    "hashed_tree",
    "load_config",
    "load_config_file",
    "load_yaml_tree",
    "registered_name",
    "registered_section",
    "resolve_config_path",
    "version_one_view",
]
