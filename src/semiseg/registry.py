"""Name → object registries: methods, plug-ins, mixers, pseudo-label policies, datasets, readers,
label maps and models, all built on one :class:`Registry`.

Dependency-free (standard library and :mod:`semiseg.errors` only), so the config schema
(:mod:`semiseg.config`) can ask which names exist without importing a method, plug-in or model.

* **Built-in entries are lazy**: ``"module:attr"`` references, imported on first use
  (``METHODS["unimatch"]`` imports :mod:`semiseg.methods.unimatch`); ``name in METHODS``,
  ``sorted(METHODS)`` and ``len(METHODS)`` import nothing.
* **Decorators** (``@register_method("x")``, ``@register_plugin``, ``@register_dataset``, ...)
  register an object directly; a built-in module registering the object its lazy entry names is
  the same entry, not a duplicate.
* **Duplicate names are refused** with a :class:`~semiseg.errors.RegistryError` naming both
  objects (and the distribution of an entry point).
* **Entry points**: an installed distribution adds its own entries through the registry's
  entry-point group (``semiseg.methods``, ``semiseg.plugins``, ...; :data:`ENTRY_POINT_GROUPS`),
  e.g. in its ``pyproject.toml``::

      [project.entry-points."semiseg.methods"]
      mymethod = "mypackage.methods:MyMethod"

  Entry points are read once, the first time a name is looked up or the names are listed; the
  object is imported on first use like a built-in one. An entry point may also name a module
  (``"mypackage.plugins"``) whose import registers the name with the decorator.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

from .errors import RegistryError

T = TypeVar("T")


class LazyEntry:
    """A registry entry not imported yet: ``"module:attr"`` (or a bare module that registers the
    name itself when imported), from the built-in table or an entry point."""

    def __init__(self, target: str, origin: str = "built-in") -> None:
        self.target = target
        self.origin = origin

    def load(self) -> Any:
        module_name, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module_name.strip())
        if not attr:
            return None  # a module registering its entries when imported
        for part in attr.strip().split("."):
            obj = getattr(obj, part)
        return obj

    def names(self, obj: Any) -> bool:
        """Whether ``obj`` is the object this entry refers to (``module:qualname``; for a bare
        module, any object that module defines)."""
        module_name, _, attr = self.target.partition(":")
        if getattr(obj, "__module__", None) != module_name.strip():
            return False
        return not attr or getattr(obj, "__qualname__", None) == attr.strip()

    def __repr__(self) -> str:
        return f"{self.target} ({self.origin})"


def _describe(obj: Any) -> str:
    if isinstance(obj, LazyEntry):
        return repr(obj)
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(obj)


class Registry(Mapping[str, T], Generic[T]):
    """Names → objects of one kind, read like a dict (``REG[name]``, ``name in REG``, ``sorted(REG)``).

    ``kind`` names an entry in messages (``"method"``); ``group`` is the entry-point group read on
    first lookup; ``builtins`` maps names to lazy ``"module:attr"`` references; ``on_load`` is
    called with ``(name, obj)`` when an object enters the registry (decorator or first use).
    """

    def __init__(
        self,
        kind: str,
        group: str | None = None,
        builtins: Mapping[str, str] | None = None,
        on_load: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.kind = kind
        self.group = group
        self._on_load = on_load
        self._entries: dict[str, Any] = {}
        self._discovered = group is None
        for name, target in (builtins or {}).items():
            self._entries[name] = LazyEntry(target)

    # -- registration -------------------------------------------------------------------------

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name``; refuses a name that already holds another object."""
        current = self._entries.get(name)
        same = current is None or current is obj or (isinstance(current, LazyEntry) and current.names(obj))
        if not same:
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice: {_describe(current)} and {_describe(obj)}"
            )
        self._entries[name] = obj
        if self._on_load is not None:
            self._on_load(name, obj)
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REG.register("name")``."""

        def wrap(obj: T) -> T:
            return self.add(name, obj)

        return wrap

    def add_lazy(self, name: str, target: str, origin: str = "built-in") -> None:
        """Register ``"module:attr"`` under ``name``, imported on first use."""
        entry = LazyEntry(target, origin)
        current = self._entries.get(name)
        if current is None:
            self._entries[name] = entry
            return
        if isinstance(current, LazyEntry):
            same = current.target == target
        else:
            same = entry.names(current)  # already imported: the very object the reference names
        if not same:
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice: {_describe(current)} and {entry!r}"
            )

    def discover(self) -> None:
        """Read the entry-point group once (called by every lookup). A clash is raised again by
        every later lookup: the registry is not used with a name refused."""
        if self._discovered:
            return
        for ep in metadata.entry_points(group=self.group):
            dist = getattr(ep, "dist", None)
            where = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
            self.add_lazy(ep.name, ep.value, f"entry point {ep.name!r} of group {self.group}, {where}")
        self._discovered = True

    # -- lookup ---------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> T:
        self.discover()
        entry = self._entries[name]  # KeyError for an unknown name, as a dict
        if not isinstance(entry, LazyEntry):
            return entry
        try:
            obj = entry.load()
        except Exception as exc:
            if entry.origin == "built-in":
                raise
            # an installed package that is broken becomes one clear line naming it
            raise RegistryError(f"{self.kind} {name!r}: cannot load {entry!r}: {exc}") from exc
        current = self._entries[name]
        if obj is None:  # a module that registers the name itself
            if isinstance(current, LazyEntry):
                raise RegistryError(f"{self.kind} {name!r}: importing {entry!r} did not register it")
            return current
        if current is entry or current is obj:
            if current is entry:
                self._entries[name] = obj
                if self._on_load is not None:
                    self._on_load(name, obj)
            return obj
        raise RegistryError(  # the import registered another object under this name
            f"{self.kind} {name!r} is registered twice: {_describe(current)} and {_describe(obj)}"
        )

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self.discover()
        return len(self._entries)

    def names(self) -> list[str]:
        """The registered names, sorted (nothing imported)."""
        return sorted(self)

    def is_loaded(self, name: str) -> bool:
        """Whether ``name``'s object has been imported (for tests and diagnostics)."""
        return name in self._entries and not isinstance(self._entries[name], LazyEntry)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"

    # A registry is one object, compared by identity (Mapping's == would import every entry).
    __eq__ = object.__eq__
    __hash__ = object.__hash__


def _name_plugin(name: str, cls: Any) -> None:
    """A plug-in class knows its registered name (``plugins.<name>``)."""
    cls.name = name


#: Entry-point group of each registry: an installed distribution adds entries through them.
ENTRY_POINT_GROUPS = {
    "methods": "semiseg.methods",
    "plugins": "semiseg.plugins",
    "mixers": "semiseg.mixers",
    "pseudo_label_masks": "semiseg.pseudo_label_masks",
    "pseudo_label_alignment": "semiseg.pseudo_label_alignment",
    "datasets": "semiseg.datasets",
    "readers": "semiseg.readers",
    "label_maps": "semiseg.label_maps",
    "models": "semiseg.models",
}

#: ``method.name`` → a :class:`~semiseg.methods.base.Method` subclass (its ``Config`` is the schema).
METHODS: Registry[Any] = Registry(
    "method",
    ENTRY_POINT_GROUPS["methods"],
    {
        "supervised": "semiseg.methods.supervised:Supervised",
        "fixmatch": "semiseg.methods.fixmatch:FixMatch",
        "unimatch": "semiseg.methods.unimatch:UniMatch",
        "mean_teacher": "semiseg.methods.mean_teacher:MeanTeacher",
        "guidedmix": "semiseg.methods.guidedmix:GuidedMix",
        "bcp": "semiseg.methods.bcp:BCP",
    },
)

#: ``plugins.<name>`` → a :class:`~semiseg.plugins.base.Plugin` subclass (its ``Config`` is the schema).
PLUGINS: Registry[Any] = Registry(
    "plug-in",
    ENTRY_POINT_GROUPS["plugins"],
    {"sufd": "semiseg.plugins.sufd:SUFD", "mpmc": "semiseg.plugins.mpmc:MPMC"},
    on_load=_name_plugin,
)

#: ``method.mix`` → a :class:`~semiseg.mixers.Mixer` subclass.
MIXERS: Registry[Any] = Registry(
    "mixer",
    ENTRY_POINT_GROUPS["mixers"],
    {
        "cutmix": "semiseg.mixers:CutMix",
        "classmix": "semiseg.mixers:ClassMix",
        "supmix": "semiseg.mixers:SupMix",
        "none": "semiseg.mixers:NoMix",
    },
)

#: ``method.pseudo.mask`` → a :class:`~semiseg.pseudo_labels.MaskRule` subclass.
MASK_POLICIES: Registry[Any] = Registry(
    "pseudo-label mask",
    ENTRY_POINT_GROUPS["pseudo_label_masks"],
    {
        "fixed": "semiseg.pseudo_labels:FixedMask",
        "freematch": "semiseg.pseudo_labels:FreeMatchMask",
        "flexmatch": "semiseg.pseudo_labels:FlexMatchMask",
    },
)

#: ``method.pseudo.align`` → a :class:`~semiseg.pseudo_labels.AlignRule` subclass.
ALIGN_POLICIES: Registry[Any] = Registry(
    "pseudo-label alignment",
    ENTRY_POINT_GROUPS["pseudo_label_alignment"],
    {"none": "semiseg.pseudo_labels:NoAlign", "labeled_prior": "semiseg.pseudo_labels:LabeledPriorAlign"},
)

#: ``data.name`` → a dataset builder ``(DataConfig) -> DatasetSource`` (:mod:`semiseg.data.base`).
DATASETS: Registry[Any] = Registry(
    "dataset",
    ENTRY_POINT_GROUPS["datasets"],
    {
        "synthetic": "semiseg.data.synthetic:build_synthetic",
        "folder": "semiseg.data.folder:build_folder",
        "chase_db1": "semiseg.data.chase:build_chase",
        "covid_infnet": "semiseg.data.covid:build_covid_infnet",
        "covid_medseg": "semiseg.data.covid:build_covid_medseg",
        "acdc": "semiseg.data.acdc:build_acdc",
        "voc": "semiseg.data.voc:build_voc",
        "cityscapes": "semiseg.data.cityscapes:build_cityscapes",
    },
)

#: ``Record.reader`` → ``(Record, DataConfig) -> (image, mask | None)`` (:mod:`semiseg.data.io`).
READERS: Registry[Any] = Registry(
    "reader",
    ENTRY_POINT_GROUPS["readers"],
    {
        "file": "semiseg.data.io:read_file_record",
        "synthetic": "semiseg.data.synthetic:read_synthetic",
        "nifti": "semiseg.data.covid:read_nifti_record",
        "h5": "semiseg.data.acdc:read_h5_record",
    },
)

#: ``Record.label_map`` → a mask value mapping ``(H×W array) -> H×W array``.
LABEL_MAPS: Registry[Any] = Registry(
    "label map",
    ENTRY_POINT_GROUPS["label_maps"],
    {"cityscapes_trainid": "semiseg.data.cityscapes:labelids_to_trainids"},
)

#: ``model.name`` → a builder ``(cfg, in_channels, num_classes) -> Segmenter``; its ``Config`` attribute
#: (a ``ModelConfig`` subclass) is the schema of the ``model`` section.
MODELS: Registry[Any] = Registry(
    "model",
    ENTRY_POINT_GROUPS["models"],
    {
        "unet": "semiseg.models.unet:build_unet",
        "deeplabv3plus": "semiseg.models.deeplabv3plus:build_deeplabv3plus",
        "guidedmix": "semiseg.models.guidedmix:build_guidedmix",
    },
)

#: Every registry by its section name (``semiseg list``, :func:`semiseg.api.registered`).
REGISTRIES: dict[str, Registry[Any]] = {
    "methods": METHODS,
    "mixers": MIXERS,
    "plugins": PLUGINS,
    "pseudo_label_masks": MASK_POLICIES,
    "pseudo_label_alignment": ALIGN_POLICIES,
    "datasets": DATASETS,
    "readers": READERS,
    "label_maps": LABEL_MAPS,
    "models": MODELS,
}

__all__ = [
    "ALIGN_POLICIES",
    "DATASETS",
    "ENTRY_POINT_GROUPS",
    "LABEL_MAPS",
    "MASK_POLICIES",
    "METHODS",
    "MIXERS",
    "MODELS",
    "PLUGINS",
    "READERS",
    "REGISTRIES",
    "LazyEntry",
    "Registry",
]
