"""The one registry helper behind every registry: lazy built-ins, duplicate names refused, and
entry points through which another package adds a method, plug-in, mixer, dataset or model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from semiseg.errors import RegistryError, SemisegError
from semiseg.registry import ENTRY_POINT_GROUPS, REGISTRIES, LazyEntry, Registry


def ep(name: str, value: str, group: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group=group)


def fake_entry_points(points: list[metadata.EntryPoint]):
    def entry_points(group: str):
        return [p for p in points if p.group == group]

    return entry_points


def shout(text: str) -> str:  # a registrable object for the unit tests
    return text.upper()


def test_builtin_entries_are_lazy_and_resolved_on_first_use():
    reg = Registry("thing", builtins={"join": "os.path:join", "shout": f"{__name__}:shout"})
    assert "join" in reg and sorted(reg) == ["join", "shout"] and len(reg) == 2
    assert not reg.is_loaded("shout")
    assert reg["shout"] is shout and reg.is_loaded("shout")
    assert reg["join"]("a", "b") in ("a/b", "a\\b")
    with pytest.raises(KeyError):
        reg["nope"]
    assert reg.get("nope") is None


def test_duplicate_names_are_refused_with_both_objects_named():
    reg = Registry("thing", builtins={"shout": f"{__name__}:shout"})
    reg.add("shout", shout)  # the object the lazy entry names: the same entry, not a duplicate
    reg.add("shout", shout)  # registering the same object again is harmless
    with pytest.raises(RegistryError, match=r"thing 'shout' is registered twice: .*shout.* and .*<lambda>"):
        reg.add("shout", lambda text: text)

    @reg.register("lower")
    def lower(text: str) -> str:
        return text.lower()

    with pytest.raises(RegistryError, match="'lower' is registered twice"):
        reg.register("lower")(str.lower)
    with pytest.raises(RegistryError, match="'lower' is registered twice"):
        reg.add_lazy("lower", "os.path:join")
    assert issubclass(RegistryError, SemisegError)  # the CLI prints it on one line


def test_every_registry_uses_the_helper_with_its_entry_point_group():
    assert set(REGISTRIES) == set(ENTRY_POINT_GROUPS)
    for key, registry in REGISTRIES.items():
        assert isinstance(registry, Registry) and registry.group == ENTRY_POINT_GROUPS[key]
    from semiseg.data.base import DATASETS
    from semiseg.data.io import LABEL_MAPS, READERS
    from semiseg.methods import METHODS
    from semiseg.models.registry import MODELS
    from semiseg.plugins import PLUGINS

    keys = ("methods", "plugins", "datasets", "readers", "label_maps", "models")
    for old_home, key in zip([METHODS, PLUGINS, DATASETS, READERS, LABEL_MAPS, MODELS], keys):
        assert old_home is REGISTRIES[key]  # the old import paths name the same registries


def test_every_builtin_lazy_entry_names_the_object_its_module_registers():
    for registry in REGISTRIES.values():
        for name in registry.names():
            assert registry[name] is not None, (registry.kind, name)
    from semiseg.methods import METHODS, FixMatch
    from semiseg.mixers import MIXERS, SupMix
    from semiseg.plugins import MPMC

    assert METHODS["fixmatch"] is FixMatch and MIXERS["supmix"] is SupMix and MPMC.name == "mpmc"


def test_entry_points_add_entries_and_are_read_once(monkeypatch):
    group = "semiseg.tests"
    calls = []

    def entry_points(group: str):
        calls.append(group)
        return [ep("shout", f"{__name__}:shout", group), ep("join", "os.path:join", group)]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    reg = Registry("thing", group, builtins={"dirname": "os.path:dirname"})
    assert sorted(reg) == ["dirname", "join", "shout"]
    assert reg["shout"] is shout and "join" in reg
    assert calls == [group]


def test_an_entry_point_clashing_with_a_builtin_is_refused(monkeypatch):
    group = "semiseg.tests"
    monkeypatch.setattr(metadata, "entry_points", fake_entry_points([ep("join", f"{__name__}:shout", group)]))
    reg = Registry("thing", group, builtins={"join": "os.path:join"})
    with pytest.raises(
        RegistryError, match=r"'join' is registered twice: os.path:join \(built-in\) and .*shout"
    ):
        list(reg)
    with pytest.raises(RegistryError, match="registered twice"):  # refused on every lookup, not once
        reg["join"]


def test_a_broken_entry_point_is_one_clear_error(monkeypatch):
    group = "semiseg.tests"
    monkeypatch.setattr(
        metadata, "entry_points", fake_entry_points([ep("bad", "no_such_module_x:thing", group)])
    )
    reg = Registry("thing", group)
    with pytest.raises(RegistryError, match=r"thing 'bad': cannot load no_such_module_x:thing \(entry point"):
        reg["bad"]


def test_an_entry_point_may_name_a_module_that_registers_itself(monkeypatch, tmp_path):
    (tmp_path / "selfreg_mod.py").write_text(
        "from tests_registry_target import REG\n@REG.register('mine')\ndef mine():\n    return 42\n"
    )
    reg = Registry("thing", "semiseg.tests")
    target = type(sys)("tests_registry_target")
    target.REG = reg
    monkeypatch.setitem(sys.modules, "tests_registry_target", target)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        metadata, "entry_points", fake_entry_points([ep("mine", "selfreg_mod", "semiseg.tests")])
    )
    assert reg["mine"]() == 42
    assert isinstance(LazyEntry("selfreg_mod").load(), type(None))


# ----------------------------------------------------------------------------------------------
# A fake distribution: another package adds a method, a plug-in, a mixer, a dataset and a model
# ----------------------------------------------------------------------------------------------

TOY_PACKAGE = '''
from dataclasses import dataclass

from semiseg.data.synthetic import build_synthetic
from semiseg.methods.supervised import Supervised, SupervisedConfig
from semiseg.mixers import NoMix
from semiseg.models.unet import UNetConfig, build_unet
from semiseg.plugins.base import Plugin, PluginConfig


@dataclass
class ToyConfig(SupervisedConfig):
    toy_weight: float = 1.0


class Toy(Supervised):
    """The supervised step, scaled."""

    Config = ToyConfig

    def training_step(self, batch, info):
        result = super().training_step(batch, info)
        result.loss = result.loss * self.cfg.toy_weight
        return result


@dataclass
class ToyPluginConfig(PluginConfig):
    strength: float = 0.0


class ToyPlugin(Plugin):
    Config = ToyPluginConfig


class ToyMix(NoMix):
    pass


def toy_dataset(cfg):
    return build_synthetic(cfg)


def toy_net(cfg, in_channels, num_classes):
    return build_unet(cfg, in_channels, num_classes)


toy_net.Config = UNetConfig  # the schema of its model section: the U-Net's options
'''

ENTRY_POINTS_TXT = """
[semiseg.methods]
toy = semiseg_toy:Toy

[semiseg.plugins]
toyplug = semiseg_toy:ToyPlugin

[semiseg.mixers]
toymix = semiseg_toy:ToyMix

[semiseg.datasets]
toyset = semiseg_toy:toy_dataset

[semiseg.models]
toynet = semiseg_toy:toy_net
"""


@pytest.fixture
def toy_distribution(tmp_path):
    """A directory holding an installed-looking distribution ``semiseg-toy`` (a module plus its
    ``.dist-info`` with ``entry_points.txt``), to put on ``PYTHONPATH``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "semiseg_toy.py").write_text(TOY_PACKAGE)
    info = site / "semiseg_toy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: semiseg-toy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS_TXT)
    return site


def run_with(site, code: str) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240, env=env
    )


def test_a_fake_distribution_registers_its_method_plugin_mixer_dataset_and_model(toy_distribution, tmp_path):
    from helpers import tiny_overrides

    overrides = [
        *tiny_overrides(iters=2),
        "data.name=toyset",
        "model.name=toynet",
        "method.name=toy",
        "method.toy_weight=0.5",
    ]
    code = f"""
    import sys
    import semiseg
    from semiseg.config import load_config
    from semiseg.cli import main

    names = semiseg.registered()
    assert "toy" in names["methods"] and "toyplug" in names["plugins"], names
    assert "toymix" in names["mixers"] and "toyset" in names["datasets"] and "toynet" in names["models"]
    assert "semiseg_toy" not in sys.modules  # listed, not imported

    cfg = load_config(None, ["method.name=unimatch", "method.mix=toymix", "plugins.toyplug={{strength: 2}}"])
    assert cfg.method.mix == "toymix" and cfg.plugins["toyplug"].strength == 2.0
    from semiseg.methods import build_method
    from semiseg.models import build_model
    method = build_method(cfg, build_model(cfg.model, 3, 3), 3)
    assert type(method.mixer.kind).__name__ == "ToyMix" and method.plugins["toyplug"].name == "toyplug"

    result = semiseg.train(overrides={overrides!r}, run_dir={str(tmp_path / "run")!r})
    assert result.steps == 2 and result.results["test"]["miou"] >= 0
    assert main(["list"]) == 0
    print("ok")
    """
    done = run_with(toy_distribution, code)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
    assert "toy" in done.stdout  # semiseg list shows the installed entries


def test_a_fake_distribution_clashing_with_a_builtin_name_is_refused(toy_distribution):
    (toy_distribution / "semiseg_toy-1.0.dist-info" / "entry_points.txt").write_text(
        "[semiseg.methods]\nunimatch = semiseg_toy:Toy\n"
    )
    done = run_with(
        toy_distribution,
        """
        from semiseg.cli import main
        raise SystemExit(main(["train", "--set", "method.name=unimatch"]))
        """,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "method 'unimatch' is registered twice" in done.stderr and "semiseg-toy 1.0" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
