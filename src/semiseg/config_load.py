"""Loading a run configuration: YAML with ``_base_`` inheritance, ``--set`` overrides, validation.

A file may inherit from others with ``_base_: other.yaml`` (or a list; paths are relative to the
file); mappings merge deeply, everything else is replaced. Several files given together
(``semiseg train -c protocols/cpu_small.yaml -c datasets/chase_db1.yaml -c methods/unimatch.yaml``)
merge the same way, in order. Command-line overrides
``--set train.iters=200`` are applied last (the value is parsed as YAML). The merged mapping is then
checked against the schema (:mod:`semiseg.config_schema`): an unknown key or a wrong type raises
:class:`~semiseg.errors.ConfigError` naming the dotted key. Import it from :mod:`semiseg.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .config_hashing import flat_model_defaults
from .config_schema import CHOICES, MODEL_CONFIGS, SECTION, ModelConfig, RunConfig
from .errors import ConfigError, SemisegError
from .registry import METHODS, MODELS, PLUGINS


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and everything it inherits through ``_base_``."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular _base_ inheritance")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"{path}: invalid YAML ({first})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = raw.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of them")
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, path)))
    return _deep_merge(merged, raw)


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping."""
    tree = dict(tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. train.iters=200")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
            value = float(value)  # YAML 1.1 reads "1e30" as a string
        parts = key.strip().split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return tree


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; return it (dataclasses are built). Raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if isinstance(value, int) and not isinstance(value, bool) and int in args:
            return value  # ``float | int``: an integer stays a count, not a fraction
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {value!r}")
    raise ConfigError(f"{key}: unsupported schema type {tp!r}")  # pragma: no cover


def build_dataclass(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    upgrade = getattr(cls, "upgrade", None)
    if callable(upgrade):  # a class that reads an older layout of its options
        values = upgrade(values, prefix or "config")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{dotted}: unknown config key (known here: {known})")
        if SECTION in fields[key].metadata:
            continue  # below, once the entry that owns it is known
        kwargs[key] = _coerce(value, hints[key], dotted)
        registry = fields[key].metadata.get(CHOICES)
        if registry is not None and kwargs[key] not in registry:
            known = ", ".join(sorted(registry))
            raise ConfigError(f"{dotted}: unknown {registry.kind} {kwargs[key]!r} (known: {known})")
    for f in fields.values():
        if SECTION in f.metadata:
            kwargs[f.name] = _build_section(f, values.get(f.name), kwargs, fields, prefix)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(prefix)
    return obj


def _build_section(f: dataclasses.Field, raw: Any, kwargs: dict, fields: dict, prefix: str) -> Any:
    """A :func:`~semiseg.config_schema.registered_section` field's options, validated against the
    ``Config`` of the entry its selector field names."""
    selector, registry = f.metadata[SECTION]
    name = kwargs.get(selector, fields[selector].default)
    dotted = f"{prefix}.{f.name}" if prefix else f.name
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{dotted}: expected a mapping of options, got {raw!r}")
    options_class = getattr(registry[name], "Config", None)
    if options_class is None:
        if raw:
            raise ConfigError(f"{dotted}: {registry.kind} {name!r} takes no options, got {sorted(raw)}")
        return None
    return build_dataclass(options_class, raw or {}, dotted)


def build_model_config(raw: Any, protocol: Any = None, strict: bool = True) -> ModelConfig:
    """Validate a raw ``model`` mapping against the chosen model's class (:data:`MODEL_CONFIGS`).

    Keys of the flat section of schema versions 1-2 that the chosen model does not own are dropped
    while they hold the value runs recorded for them (:func:`flat_model_defaults` of ``protocol``),
    so saved run configs load; any other value is an unknown key. ``strict=False`` drops them whatever
    their value (an export's description: the old network never read them)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a mapping, got {raw!r}")
    name = raw.get("name", "unet")
    if not isinstance(name, str) or name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    cls = MODEL_CONFIGS[name]
    own = {f.name for f in dataclasses.fields(cls)}
    old = flat_model_defaults(protocol)
    raw = {k: v for k, v in raw.items() if k in own or k not in old or (strict and v != old[k])}
    return build_dataclass(cls, {**raw, "name": name}, "model")


def build_config(tree: dict) -> RunConfig:
    """Validate a merged raw mapping into a :class:`RunConfig`."""
    tree = dict(tree)
    method_raw = tree.pop("method", None) or {"name": "supervised"}
    plugins_raw = tree.pop("plugins", None) or {}
    model_raw = tree.pop("model", None)
    cfg: RunConfig = build_dataclass(RunConfig, tree)
    cfg.model = build_model_config(model_raw, cfg.protocol)
    if not isinstance(method_raw, dict):
        raise ConfigError(f"method: expected a mapping, got {method_raw!r}")
    name = method_raw.get("name", "supervised")
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    cfg.method = build_dataclass(METHODS[name].Config, {**method_raw, "name": name}, "method")
    if not isinstance(plugins_raw, dict):
        raise ConfigError(f"plugins: expected a mapping of plug-in name to options, got {plugins_raw!r}")
    for pname, options in plugins_raw.items():
        if pname not in PLUGINS:
            known = ", ".join(sorted(PLUGINS)) or "none"
            raise ConfigError(f"plugins.{pname}: unknown plug-in (known: {known})")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"plugins.{pname}: expected a mapping of options, got {options!r}")
        cfg.plugins[pname] = build_dataclass(PLUGINS[pname].Config, options or {}, f"plugins.{pname}")
    _check_values(cfg)
    return cfg


def _check_values(cfg: RunConfig) -> None:
    d = cfg.data
    if isinstance(d.labeled, float) and not 0.0 < d.labeled <= 1.0:
        raise ConfigError(f"data.labeled: a fraction must be in (0, 1], got {d.labeled}")
    if isinstance(d.labeled, int) and d.labeled < 1:
        raise ConfigError(f"data.labeled: a count must be >= 1, got {d.labeled}")
    if d.crop_size < 8:
        raise ConfigError(f"data.crop_size: must be >= 8, got {d.crop_size}")
    if d.batch_size < 1 or d.unlabeled_batch_size < 1:
        raise ConfigError("data.batch_size: batch sizes must be >= 1")
    if d.resize <= 0:
        raise ConfigError(f"data.resize: must be > 0, got {d.resize}")
    if d.size is not None and (len(d.size) != 2 or min(d.size) < 1):
        raise ConfigError(f"data.size: expected [height, width] of positive sizes, got {d.size}")
    if len(d.scale_range) != 2 or d.scale_range[0] > d.scale_range[1]:
        raise ConfigError(f"data.scale_range: expected [low, high], got {d.scale_range}")
    if cfg.train.iters < 1:
        raise ConfigError(f"train.iters: must be >= 1, got {cfg.train.iters}")
    if not 0.0 <= cfg.eval.overlap < 1.0:
        raise ConfigError(f"eval.overlap: must be in [0, 1), got {cfg.eval.overlap}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")

    # NaN/inf anywhere, and the remaining signs/ranges that crash a run later
    def finite(obj: Any, prefix: str) -> None:
        fields = () if isinstance(obj, dict) else dataclasses.fields(obj)
        items = obj.items() if isinstance(obj, dict) else ((f.name, getattr(obj, f.name)) for f in fields)
        for key, value in items:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{dotted}: must be a finite number, got {value}")
            if isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(f"{dotted}: must hold finite numbers, got {value}")
            if dataclasses.is_dataclass(value) or isinstance(value, dict):
                finite(value, dotted)

    finite(cfg, "")
    o, t = cfg.optim, cfg.train
    for key, value, ok, want in (
        ("optim.lr_multi", o.lr_multi, o.lr_multi > 0, "> 0"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.poly_power", o.poly_power, o.poly_power >= 0, ">= 0"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.ckpt_every", t.ckpt_every, t.ckpt_every >= 1, ">= 1"),
        ("train.eval_every", t.eval_every, t.eval_every >= -1, ">= -1 (0: auto, -1: never)"),
    ):
        if not ok:
            raise ConfigError(f"{key}: must be {want}, got {value}")
    e = cfg.eval
    if not 0.0 <= e.ema_decay < 1.0:
        raise ConfigError(f"eval.ema_decay: must be in [0, 1), got {e.ema_decay}")
    if e.ema_start < 0:
        raise ConfigError(f"eval.ema_start: must be >= 0, got {e.ema_start}")
    if e.ema_bn_batches < 0:
        raise ConfigError(
            f"eval.ema_bn_batches: must be >= 0 (0: the averaged statistics), got {e.ema_bn_batches}"
        )


#: The configs shipped with the package (``configs/`` in the repository links here).
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


ConfigPaths = str | Path | Sequence[str | Path] | None


def _path_list(paths: ConfigPaths) -> list[Path]:
    if paths is None:
        return []
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def compose_yaml_trees(paths: ConfigPaths) -> dict:
    """Several config files merged in order, later files winning (as one file whose ``_base_`` lists
    them would be): ``protocols/cpu_small.yaml``, ``datasets/chase_db1.yaml``, ``methods/unimatch.yaml``.
    With more than one file and no ``name`` in any of them, the run is named after the files
    (:func:`config_file_label`) joined by ``-`` (``cpu_small-chase_db1-unimatch``); the name never
    enters the config hash."""
    files = _path_list(paths)
    tree: dict = {}
    for file in files:
        tree = _deep_merge(tree, load_yaml_tree(file))
    if len(files) > 1 and "name" not in tree:
        tree["name"] = "-".join(config_file_label(file) for file in files)
    return tree


def config_file_label(file: Path) -> str:
    """A config file's part of a composed run name: its stem, or for a built-in config inside a
    sub-folder of its kind the sub-folders too (``methods/recipe/unimatch.yaml`` → ``recipe_unimatch``,
    ``methods/guidedmix/cpu_small.yaml`` → ``guidedmix_cpu_small``), so two built-in method files never
    give two different runs the same name."""
    try:
        inside = Path(file).resolve().relative_to(BUILTIN_CONFIGS)
    except ValueError:
        return Path(file).stem
    return "_".join([*inside.parts[1:-1], inside.stem])


def load_config(path: ConfigPaths = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a config file, or several merged in order (:func:`compose_yaml_trees`; the defaults when
    ``path`` is None or empty), apply overrides, validate."""
    tree = compose_yaml_trees(path)
    tree = apply_overrides(tree, overrides or [])
    return build_config(tree)


def resolve_config_path(name: str | None) -> Path | None:
    """A config path, or a name inside the built-in configs (``methods/unimatch``, ``demo``).

    The README's ``configs/...`` paths work from any folder: ``configs/`` is the repository's link
    to the built-in configs, so that prefix is also looked up there.
    """
    if name is None:
        return None
    path = Path(name)
    if path.is_file():
        return path
    names = [name]
    parts = Path(name).parts
    if len(parts) > 1 and parts[0] == "configs":
        names.append(Path(*parts[1:]).as_posix())
    for item in names:
        for candidate in (BUILTIN_CONFIGS / item, BUILTIN_CONFIGS / f"{item}.yaml"):
            if candidate.is_file():
                return candidate
    raise SemisegError(f"{name}: config file not found (nor as a built-in config under {BUILTIN_CONFIGS})")


def resolve_config_paths(names: Sequence[str] | None) -> list[Path] | None:
    """:func:`resolve_config_path` of each name (``--config`` given several times); None for none."""
    if not names:
        return None
    return [resolve_config_path(name) for name in names]  # type: ignore[misc]


def load_config_file(path: ConfigPaths, overrides: list[str]) -> RunConfig:
    """:func:`load_config` (one file or several merged in order), with any failure to read a file (a
    ``_base_`` that is not a file name, text that is not UTF-8, nesting too deep, ...) as a one-line
    ConfigError naming the file(s)."""
    unexpected = (TypeError, ValueError, AttributeError, KeyError, RecursionError, OSError)
    try:
        return load_config(path, overrides)
    except SemisegError:
        raise
    except unexpected as exc:
        where = ", ".join(map(str, _path_list(path))) or "config"
        for i in range(len(overrides) + 1):  # the first override that breaks it, if any, is named
            try:
                load_config(path, overrides[:i])
            except SemisegError:
                break
            except unexpected:
                if i:
                    where = f"--set {overrides[i - 1]}"
                break
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: cannot read config ({type(exc).__name__}: {detail[:200]})") from None


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain mapping of a resolved config (round-trips through :func:`build_config`)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
