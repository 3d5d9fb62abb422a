"""The harness every registered method × mixer × plug-in and every registered model passes, as
timm's and segmentation_models_pytorch's model tests do.

Combinations come from the registries (:mod:`semiseg.registry`), so an entry another package
registers through an entry point is enumerated like a built-in one:

* every method × every mixer (for a method whose config names one: ``method.mix``) × no plug-in and
  each plug-in alone; every method with all plug-ins together (at its default mixer); each on the
  tiny U-Net, or on the network a method is built for (:data:`METHOD_MODEL`); and ``supervised`` on
  every registered model no other combination trains.
* A combination the config rejects must be rejected by a :class:`~semiseg.errors.ConfigError` that
  names one of its own keys (``method.*``, ``plugins.<name>``, ``model.*``): the built-in ones are
  listed in :data:`REJECTED` and tested to be rejected so; any other is skipped with the error as
  the reason (``pytest -rs`` shows it).

Each accepted combination is built through the normal config path (:func:`load_config` of
:func:`tiny_overrides` with tiny plug-ins, :data:`TINY_PLUGINS`, and ``deterministic: true``) and
trained for two steps by the trainer itself (``Trainer.fit`` on the synthetic dataset, a checkpoint
after every step; the trainer's crop-size check, a pure shape check, runs once per model instead of
once per build). The checks:

* **one step**: every logged value is finite; each optimizer the trainer steps (the segmenter's,
  and every extra optimizer whose ``total/<name>`` the step returned) holds, when it steps, finite
  gradients, not all zero, equal to those of the loss it trains on (``total`` for the segmenter and
  an optimizer stepped on the total, ``total/<name>`` for the others); every trainable parameter
  belongs to exactly one optimizer;
* **state round trip**: the saved ``latest.pt`` loads into a freshly built method (another
  initialisation) and the result predicts exactly as the trained method in eval mode; the
  prediction path (``load_trained_model``) too;
* **resume**: the run directory as it was after step 1 (copied before step 2 ran), resumed for one
  step, ends with the same weights, optimizer states and logged losses as the uninterrupted run.

Every registered model (tiny widths, :data:`helpers.TINY_MODELS`; weights are never downloaded)
passes: forward ``N×K×H×W`` in train and eval mode, the ``encode`` / ``decode`` contract
(``forward = decode(encode(x))``, ``return_features``, ``fp_from``), a state-dict round trip, the
backbone / head split, and a gradient for every parameter from the plain logits (DDP needs it).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_MODELS, model_overrides, nonzero, tiny_model, tiny_overrides

from semiseg import trainer as trainer_module
from semiseg.checkpoint import load_checkpoint
from semiseg.config import CHOICES, RunConfig, load_config
from semiseg.data.validate import check_crop_size
from semiseg.errors import ConfigError
from semiseg.inference import load_trained_model
from semiseg.methods import Method, build_method
from semiseg.models import Segmenter, SegOutput, build_model
from semiseg.registry import METHODS, MIXERS, MODELS, PLUGINS
from semiseg.step import StepResult
from semiseg.trainer import Trainer

ITERS = 2
SETTINGS = {
    "deterministic": True,
    "train.device": "cpu",  # the same bits on every machine (and the round trip compares on the CPU)
    "train.ckpt_every": 1,
    "train.eval_every": -1,
    "eval.splits": "[]",
}

#: A method built around one network trains on it (its shipped configs do); the others on the U-Net.
METHOD_MODEL = {"guidedmix": "guidedmix"}

#: Plug-in options of a tiny instance (SUFD's discriminator 8-16-16-16 instead of 64-...-512);
#: a plug-in not listed here is built with its defaults.
TINY_PLUGINS: dict[str, dict[str, Any]] = {"sufd": {"channels": [8, 16, 16, 16]}}

#: Built-in combinations the config rejects → the key its error names (``supervised`` uses no
#: unlabeled data, which every built-in plug-in needs).
REJECTED = {
    ("supervised", None, ("mpmc",)): "plugins.mpmc",
    ("supervised", None, ("sufd",)): "plugins.sufd",
    ("supervised", None, ("mpmc", "sufd")): "plugins.mpmc",
}


# ----------------------------------------------------------------------------------------------
# Combinations
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Combo:
    method: str
    mix: str | None  # None: the method's config has no mixer field
    plugins: tuple[str, ...]
    model: str

    def __str__(self) -> str:  # the test id, selectable with -k (e.g. -k "mix:supmix and sufd")
        parts = [self.method]
        if self.mix is not None:
            parts.append(f"mix:{self.mix}")
        if self.plugins:
            parts.append(f"plugins:{'+'.join(self.plugins)}")
        return "-".join([*parts, f"model:{self.model}"])

    @property
    def key(self) -> tuple[str, str | None, tuple[str, ...]]:
        return self.method, self.mix, self.plugins

    @property
    def builtin(self) -> bool:
        """Whether semiseg itself registers every entry of the combination."""
        objects = [METHODS[self.method], *(PLUGINS[p] for p in self.plugins), MODELS[self.model]]
        if self.mix is not None:
            objects.append(MIXERS[self.mix])
        return all(getattr(obj, "__module__", "").startswith("semiseg.") for obj in objects)

    def config_keys(self) -> list[str]:
        """Prefixes of the config keys this combination chooses (one must start a rejection)."""
        return ["method.", *(f"plugins.{p}" for p in self.plugins), "model."]

    def overrides(self) -> list[str]:
        values: dict[str, Any] = {"method.name": self.method, **model_overrides(self.model), **SETTINGS}
        if self.mix is not None:
            values[f"method.{mixer_field(self.method)}"] = self.mix
        for name in self.plugins:
            values[f"plugins.{name}"] = json.dumps(TINY_PLUGINS.get(name, {}))
        return tiny_overrides(ITERS, **values)


def mixer_field(method: str) -> str | None:
    """The field of the method's config that names a registered mixer (``mix``), if any."""
    fields = dataclasses.fields(METHODS[method].Config)
    return next((f.name for f in fields if f.metadata.get(CHOICES) is MIXERS), None)


def default_mix(method: str) -> str | None:
    """The mixer the method's config chooses by default (None: no mixer field)."""
    name = mixer_field(method)
    return None if name is None else getattr(METHODS[method].Config(), name)


def combos() -> Iterator[Combo]:
    """Each method × each mixer × (no plug-in, each plug-in); all plug-ins together with the
    default mixer; ``supervised`` on the models no method combination trains."""
    plugins = sorted(PLUGINS)
    for method in sorted(METHODS):
        model = METHOD_MODEL.get(method, "unet")
        for mix in sorted(MIXERS) if mixer_field(method) else [None]:
            for chosen in [(), *((p,) for p in plugins)]:
                yield Combo(method, mix, chosen, model)
        if len(plugins) > 1:
            yield Combo(method, default_mix(method), tuple(plugins), model)
    covered = {"unet", *METHOD_MODEL.values()}
    for model in sorted(MODELS):
        if model not in covered:
            yield Combo("supervised", None, (), model)


COMBOS = list(combos())
TRAINED = [c for c in COMBOS if c.key not in REJECTED]


def build(combo: Combo, run_dir: Path, resume: bool = False) -> tuple[RunConfig, Trainer]:
    """The combination's config and trainer. The trainer's crop-size check (a forward pass on the
    meta device, ≈ 0.5 s: half of a tiny build) is left out here and tested once per model below."""
    cfg = load_config(None, combo.overrides())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "check_crop_size", lambda *args: None, raising=False)
        return cfg, Trainer(cfg, run_dir, resume)


def check_rejection(combo: Combo, exc: ConfigError) -> str:
    """The key a rejection names (``<key>: <why>``), which must be one of the combination's own."""
    key = str(exc).split(":", 1)[0]
    assert any(key.startswith(prefix) for prefix in combo.config_keys()), (
        f"{combo}: rejected by a ConfigError that names none of {combo.config_keys()}: {exc}"
    )
    return key


# ----------------------------------------------------------------------------------------------
# Two recorded training steps of a combination
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepRecord:
    stepped: set[str] = dataclasses.field(default_factory=set)  # optimizers the result names
    expected: dict[str, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    seen: dict[str, list[torch.Tensor | None]] = dataclasses.field(default_factory=dict)
    logged: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Trained:
    combo: Combo
    cfg: RunConfig
    run_dir: Path
    snapshot: Path  # the run directory as it was when step 1 was about to run
    method: Method
    optimizers: dict[str, list[torch.nn.Parameter]]  # "segmenter" and the extra optimizers' names
    on_total: set[str]
    in_channels: int
    num_classes: int
    steps: list[StepRecord]
    checkpoint: dict[str, Any]  # latest.pt of the uninterrupted run


SEGMENTER = "segmenter"


def params_of(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def grads(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def train_recorded(combo: Combo, root: Path) -> Trained:
    """``Trainer.fit`` of the combination, recording each step's losses and gradients (see the
    module docstring) and copying the run directory before step 1 runs."""
    run_dir, snapshot = root / "run", root / "snapshot"
    cfg, trainer = build(combo, run_dir)
    method = trainer.method
    optimizers = {SEGMENTER: trainer.optimizer, **trainer.extra_optimizers}
    params = {name: params_of(opt) for name, opt in optimizers.items()}
    on_total: set[str] = set()
    steps: list[StepRecord] = []

    def trained_on(name: str, result: StepResult) -> torch.Tensor | None:
        """The loss whose gradient optimizer ``name`` should step on (None: not stepped)."""
        if name == SEGMENTER or name in result.steps_with_loss:
            return result.loss
        return result.optimizer_losses.get(name)

    training_step = method.training_step

    def recording_training_step(batch, info):
        result = training_step(batch, info)
        record = steps[-1]
        record.stepped = {SEGMENTER, *result.optimizer_losses, *result.steps_with_loss}
        on_total.update(result.steps_with_loss)
        for name, group in params.items():
            loss = trained_on(name, result)
            if loss is None:
                continue
            if not loss.requires_grad:
                record.expected[name] = [None] * len(group)
                continue
            found = torch.autograd.grad(loss, group, retain_graph=True, allow_unused=True)
            record.expected[name] = [None if g is None else g.detach().clone() for g in found]
        return result

    def spy(name: str, opt: torch.optim.Optimizer) -> None:
        original = opt.step

        def step(*args, **kwargs):
            steps[-1].seen[name] = grads(params[name])
            return original(*args, **kwargs)

        opt.step = step  # type: ignore[method-assign]

    for name, opt in optimizers.items():
        spy(name, opt)
    train_step = trainer.train_step

    def snapshotting_train_step(batch, info):
        if info.step == 1:  # latest.pt holds step 1: the directory a run killed now would leave
            shutil.copytree(run_dir, snapshot)
        steps.append(StepRecord())
        steps[-1].logged = train_step(batch, info)
        return steps[-1].logged

    method.training_step = recording_training_step  # type: ignore[method-assign]
    trainer.train_step = snapshotting_train_step  # type: ignore[method-assign]
    trainer.fit()
    method.training_step = training_step  # type: ignore[method-assign]
    return Trained(
        combo,
        cfg,
        run_dir,
        snapshot,
        method,
        params,
        on_total,
        trainer.splits.in_channels,
        trainer.splits.num_classes,
        steps,
        load_checkpoint(run_dir / "latest.pt"),
    )


@pytest.fixture(scope="module", autouse=True)
def _restore_global_determinism() -> Iterator[None]:
    """``deterministic: true`` switches torch's deterministic mode on for the process: put it back."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@pytest.fixture(scope="module", params=TRAINED, ids=str)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    combo: Combo = request.param
    try:
        return train_recorded(combo, tmp_path_factory.mktemp("harness"))
    except ConfigError as exc:
        if combo.builtin:
            pytest.fail(f"{combo}: a built-in combination the harness expects to train was rejected: {exc}")
        check_rejection(combo, exc)
        pytest.skip(f"{combo}: rejected by the config: {exc}")


# ----------------------------------------------------------------------------------------------
# Methods × mixers × plug-ins
# ----------------------------------------------------------------------------------------------


def test_the_harness_enumerates_every_registered_name() -> None:
    assert {c.method for c in TRAINED} == set(METHODS)
    assert {c.mix for c in TRAINED if c.mix is not None} == set(MIXERS)
    assert {p for c in TRAINED for p in c.plugins} == set(PLUGINS)
    assert {c.model for c in TRAINED} == set(MODELS)
    assert set(REJECTED) <= {c.key for c in COMBOS}  # the table names real combinations


@pytest.mark.parametrize("combo", [c for c in COMBOS if c.key in REJECTED], ids=str)
def test_a_rejected_combination_is_a_config_error_naming_its_key(combo: Combo, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        build(combo, tmp_path / "run")
    assert check_rejection(combo, info.value) == REJECTED[combo.key]
    assert not (tmp_path / "run").exists()


def test_each_step_has_finite_losses_and_finite_gradients_of_what_each_optimizer_trains_on(
    trained: Trained,
) -> None:
    method = trained.method
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    owners = [id(p) for group in trained.optimizers.values() for p in group]
    assert len(owners) == len(set(owners)), "a parameter is in two optimizers"
    assert set(owners) == trainable, "a trainable parameter is in no optimizer (or a frozen one is)"
    assert len(trained.steps) == ITERS
    for step, record in enumerate(trained.steps):
        where = f"{trained.combo}, step {step}"
        bad = {k: v for k, v in record.logged.items() if not math.isfinite(v)}
        assert not bad and "total" in record.logged, (where, bad)
        stepped = record.stepped
        assert set(record.seen) == stepped == set(record.expected), where
        for name in stepped:
            seen, expected = record.seen[name], record.expected[name]
            assert any(nonzero(g) for g in seen), f"{where}: {name} stepped without a gradient"
            for i, (got, want) in enumerate(zip(seen, expected)):
                assert (got is None) == (want is None), (where, name, i)
                if got is not None:
                    assert bool(torch.isfinite(got).all()), (where, name, i)
                    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (where, name, i)


def test_state_dict_round_trip(trained: Trained) -> None:
    cfg, state = trained.cfg, trained.checkpoint["model"]
    method = trained.method.eval()
    assert_same(state, method.state_dict(), "latest.pt")
    torch.manual_seed(12345)  # not the run's initialisation
    fresh = build_method(
        cfg, build_model(cfg.model, trained.in_channels, trained.num_classes), trained.num_classes
    )
    fresh.eval()
    x = torch.randn(2, trained.in_channels, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = method.eval_model()(x)
        assert not torch.equal(fresh.eval_model()(x), want), "the round trip would prove nothing"
        fresh.load_state_dict(state)
        assert_same(fresh.state_dict(), state, "loaded")
        assert torch.equal(fresh.eval_model()(x), want)
        assert torch.equal(fresh.model(x), method.model(x))
        _, predictor, _ = load_trained_model(trained.run_dir / "latest.pt")
        assert torch.equal(predictor(x), want)


def test_resume_from_step_1_gives_the_uninterrupted_run(trained: Trained) -> None:
    snapshot = trained.snapshot
    _, trainer = build(trained.combo, snapshot, resume=True)
    trainer.fit()
    straight, resumed = trained.checkpoint, load_checkpoint(snapshot / "latest.pt")
    assert straight["step"] == resumed["step"] == ITERS
    for key in ("model", "optimizer", "extra_optimizers", "scaler"):
        assert_same(resumed[key], straight[key], key)
    straight_log, resumed_log = (train_records(d) for d in (trained.run_dir, snapshot))
    assert [r["step"] for r in resumed_log] == list(range(1, ITERS + 1))
    assert resumed_log == straight_log


def train_records(run_dir: Path) -> list[dict]:
    """The logged training records, without the timing."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "it/s"} for r in records if r["kind"] == "train"]


def assert_same(a: Any, b: Any, where: str) -> None:
    """Equal nested state (dicts, lists, tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=sorted(MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


def built(name: str, in_channels: int = 3, num_classes: int = 3, seed: int = 0) -> Segmenter:
    """A fresh copy of the tiny ``name`` network initialised from ``seed`` (built once)."""
    return copy.deepcopy(_built(name, in_channels, num_classes, seed))


@functools.cache
def _built(name: str, in_channels: int, num_classes: int, seed: int) -> Segmenter:
    torch.manual_seed(seed)
    return tiny_model(name, in_channels, num_classes)


@pytest.mark.parametrize("in_channels,num_classes,size", [(3, 3, (32, 32)), (1, 2, (33, 47))])
def test_model_output_is_n_k_h_w(model_name: str, in_channels: int, num_classes: int, size) -> None:
    model = built(model_name, in_channels, num_classes)
    x = torch.randn(2, in_channels, *size)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes, *size), train
        assert bool(torch.isfinite(out).all())


def test_model_encode_decode_contract(model_name: str) -> None:
    model = built(model_name).eval()
    x = torch.randn(3, 3, 40, 36)
    with torch.no_grad():
        feats = model.encode(x)
        assert isinstance(feats, list) and feats
        assert all(isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[0] == 3 for f in feats)
        logits = model(x)
        assert torch.equal(model.decode(feats, (40, 36)), logits)
        out = model(x, return_features=True)
        assert isinstance(out, SegOutput) and out.logits_fp is None and torch.equal(out.logits, logits)
        assert out.features is not None and len(out.features) == len(feats)
        assert all(torch.equal(f, g) for f, g in zip(out.features, feats))
        fp = model(x, fp_from=1)
    assert isinstance(fp, SegOutput) and fp.logits.shape == logits.shape
    assert fp.logits_fp is not None and fp.logits_fp.shape == (2, 3, 40, 36)
    torch.testing.assert_close(fp.logits, logits, rtol=1e-4, atol=1e-5)


def test_model_state_dict_round_trip(model_name: str) -> None:
    a, b = built(model_name, seed=0).eval(), built(model_name, seed=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(a(x), b(x))
        b.load_state_dict(a.state_dict())
        assert torch.equal(a(x), b(x))
    assert_same(b.state_dict(), a.state_dict(), model_name)


def test_model_parameters_split_and_all_get_a_gradient(model_name: str) -> None:
    model = built(model_name).train()
    everything = [id(p) for p in model.parameters()]
    backbone = [id(p) for p in model.backbone_parameters()]
    assert backbone and len(backbone) == len(set(backbone)) and set(backbone) <= set(everything)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    F.cross_entropy(model(x), y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing  # DDP (find_unused_parameters=False) needs every one
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_model_passes_the_trainers_crop_size_check(model_name: str) -> None:
    cfg = load_config(None, tiny_overrides(**model_overrides(model_name)))
    check_crop_size(cfg, 3, 3)  # a ConfigError when the training crop cannot go through the model


def test_tiny_model_settings_name_registered_models() -> None:
    assert set(TINY_MODELS) <= set(MODELS)
