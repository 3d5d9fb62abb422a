"""The plug-in interface: what SUFD, MPMC and future add-ons may do to any semi-supervised method.

A plug-in is an ``nn.Module`` attached to a method (``method.plugins[<name>]``), so its modules and
buffers are saved in ``method.state_dict()`` and moved by ``method.to(device)``. It is configured under
``plugins.<name>`` in the run config (a dataclass registered with :func:`register_plugin`), and the
same plug-in composes with every method that hosts plug-ins (:class:`PluginHost`: FixMatch, UniMatch,
Mean Teacher) and every mixer, e.g. ``method: {name: unimatch, mix: supmix}`` + ``plugins: {sufd: {}}``.

Each training step the host method builds a :class:`StepContext` right after its weak forward pass
(labeled logits, weak unlabeled logits *with* gradient, detached pseudo-labels and confidences, the
ignore map, encoder features when a plug-in asks for them, the batch, the host's loss multipliers).
It is all a plug-in sees of the step: its fields are documented on the class, plug-ins read them
and keep their own per-step state in ``ctx.extras[<name>]``, and the host keeps its private state
(the policy's output, the mix partner, the mixed views) out of it. The host then calls, in order:

1. :meth:`Plugin.pixel_weights` ``(ctx) -> N_u×H×W tensor | None`` — a per-pixel multiplier of the
   unlabeled losses, in the weak view's geometry (MPMC's λ_s). Weights of several plug-ins multiply.
   The method carries them through the strong-view mixing like the pseudo-label: pixels pasted from
   the flipped partner carry :meth:`Plugin.partner_pixel_weights` ``(ctx, labels, own)`` — the
   partner's weight *for the label the mix pastes* (the partner's eval-mode pseudo-label; default:
   ``own.flip(0)``, right for weights that do not depend on the label) — and SupMix's ground-truth
   pixels weight 1.
2. :meth:`Plugin.losses` ``(ctx) -> {name: loss}`` — extra terms for the segmenter, already weighted
   (e.g. ``λ_adv·BCE``); each is added to ``total`` (after the method's own normalisation, e.g.
   outside UniMatch's ``/2``) and logged as ``<plugin>/<name>``.
3. :meth:`Plugin.optimizer_losses` ``(ctx) -> {optimizer name: loss}`` — losses of modules the
   plug-in trains with its own optimizer (SUFD's discriminator), handed to the trainer in the step's
   :class:`~semiseg.step.StepResult` ``optimizer_losses``; :meth:`Plugin.optimizers` /
   :meth:`Plugin.schedulers` expose the optimizer and its per-step lr update through the method's
   ``extra_optimizers()`` / ``extra_schedulers()``. The update zeroes that optimizer's gradients
   before back-propagating its loss, so gradients a module picked up from the segmenter's loss
   never reach its step — unless the plug-in sets ``optimizer_on_total``: its module appears in the
   segmenter's loss only through the plug-in's own terms, whose gradient is exactly the module's
   (MPMC's head), so the optimizer goes to ``steps_with_loss`` (zeroed with the segmenter's,
   stepped after that loss's backward) and its loss is only logged, as ``total/<name>``.
4. :meth:`Plugin.after_step` ``(info)`` — after all optimizer steps (EMA statistics, ...).

``needs_unlabeled`` (default True) makes :func:`semiseg.methods.build_method` reject the plug-in on a
method without unlabeled data (``supervised``); ``needs_features`` makes the host request encoder
features (``forward(..., return_features=True)``) and fill ``features_l`` / ``features_w``;
``needs_strong_features`` makes FixMatch / UniMatch set ``ctx.has_strong_views`` and, after their
strong forward (so after :meth:`Plugin.pixel_weights`, before :meth:`Plugin.losses`), fill the mixed
strong views' features and provenance maps (``ctx.features_s`` / ``ctx.sources_s``, ``None`` until
then and on other hosts).
``trains_in_warmup`` makes the host call :meth:`Plugin.losses` / :meth:`Plugin.optimizer_losses` in
its labeled-only warm-up steps too, with a ``ctx.warmup`` context (labeled fields only; MPMC's
labeled patch loss trains from step 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..models.base import Segmenter
from ..registry import PLUGINS
from ..step import StepResult
from ..types import StepContext, StepInfo


@dataclass
class PluginConfig:
    """Options every plug-in understands; plug-ins subclass this with their own fields."""

    def validate(self, prefix: str) -> None:  # called by the config loader with "plugins.<name>"
        """Raise :class:`~semiseg.errors.ConfigError` naming ``prefix.<field>`` for a bad value."""


class Plugin(nn.Module):
    """Base class of plug-ins; every hook has a no-op default (see the module docstring)."""

    Config: type[PluginConfig] = PluginConfig
    name: str = ""
    needs_unlabeled: bool = True
    needs_features: bool = False
    optimizer_on_total: bool = False  # its module's gradient is exactly what ``total`` gives it

    def __init__(self, cfg: PluginConfig, num_classes: int, model: Segmenter, total_steps: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.total_steps = total_steps

    @property
    def needs_strong_features(self) -> bool:
        return False

    @property
    def trains_in_warmup(self) -> bool:
        return False

    def pixel_weights(self, ctx: StepContext) -> Tensor | None:
        return None

    def partner_pixel_weights(self, ctx: StepContext, labels: Tensor, own: Tensor) -> Tensor:
        """Weights of the flipped batch's pixels when they are pasted with ``labels`` (N_u×H×W, the
        partner's pseudo-labels, already in flipped order); ``own``: this plug-in's
        :meth:`pixel_weights`. Default ``own.flip(0)``: weights that do not depend on the label."""
        return own.flip(0)

    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def optimizer_losses(self, ctx: StepContext) -> dict[str, Tensor]:
        return {}

    def diagnostics(self, ctx: StepContext) -> dict[str, Tensor]:
        """Scalars logged as ``<name>/<key>`` (metrics.jsonl, TensorBoard), never added to ``total``;
        called after :meth:`losses`. Keys may differ between steps and ranks."""
        return {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def schedulers(self) -> dict[str, Callable[[int], None]]:
        return {}

    def after_step(self, info: StepInfo) -> None:
        """Runs after every optimizer step."""


class OwnOptimizerPlugin(Plugin):
    """A plug-in that trains its own module with its own optimizer (SUFD's discriminator, MPMC's head).

    The optimizer, from :meth:`make_optimizer`, is created on first use (after the trainer moved the
    method) and exposed under the plug-in's name, with a per-step poly schedule
    ``cfg.lr·(1 − step/total)^cfg.poly_power`` (the segmenter's). ``cfg`` has ``lr`` and ``poly_power``.
    """

    def __init__(self, cfg: PluginConfig, num_classes: int, model: Segmenter, total_steps: int) -> None:
        super().__init__(cfg, num_classes, model, total_steps)
        self._optimizer: torch.optim.Optimizer | None = None

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The plug-in's optimizer over its own parameters, with ``lr = cfg.lr``."""
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        if self._optimizer is None:
            self._optimizer = self.make_optimizer()
        return {self.name: self._optimizer}

    def schedulers(self) -> dict[str, Callable[[int], None]]:
        return {self.name: self.set_lr}

    def lr_at(self, step: int) -> float:
        """Poly decay ``lr·(1 − step/total)^power`` (the segmenter's schedule)."""
        frac = min(max(step, 0), self.total_steps) / max(1, self.total_steps)
        return self.cfg.lr * (1.0 - frac) ** self.cfg.poly_power

    def set_lr(self, step: int) -> None:
        """Called by the trainer after optimizer step ``step``: set the lr of step ``step + 1``
        (the segmenter's poly schedule is likewise evaluated at the step about to run)."""
        for group in self.optimizers()[self.name].param_groups:
            group["lr"] = self.lr_at(step + 1)


def register_plugin(name: str) -> Callable[[type[Plugin]], type[Plugin]]:
    """Register a plug-in class (and so its config dataclass) under ``plugins.<name>``; it learns its
    name (``cls.name``); a name registered twice is an error (:data:`semiseg.registry.PLUGINS`)."""
    return PLUGINS.register(name)


class PluginHost:
    """Mixin for :class:`~semiseg.methods.base.Method` subclasses that accept plug-ins.

    Use as ``class UniMatch(PluginHost, Method)``; it adds ``self.plugins`` (an ``nn.ModuleDict``),
    :meth:`attach_plugins`, the hook helpers the training step calls, and merges plug-in optimizers,
    schedulers and ``after_step`` into the method's. Subclasses overriding ``after_step`` call
    ``super().after_step(info)``.
    """

    plugins: nn.ModuleDict

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plugins = nn.ModuleDict()

    def attach_plugins(self, plugins: Mapping[str, Plugin] | Iterable[Plugin]) -> None:
        """Attach plug-ins (a name → plug-in mapping, or plug-ins keyed by their registered name)."""
        items = plugins.items() if isinstance(plugins, Mapping) else ((p.name, p) for p in plugins)
        for name, plugin in items:
            if name in self.plugins:
                raise ValueError(f"plug-in {name!r} is attached twice")
            self.plugins[name] = plugin

    @property
    def plugins_need_features(self) -> bool:
        return any(p.needs_features for p in self.plugins.values())

    @property
    def plugins_need_strong_features(self) -> bool:
        return any(p.needs_strong_features for p in self.plugins.values())

    @property
    def plugins_train_in_warmup(self) -> bool:
        return any(p.trains_in_warmup for p in self.plugins.values())

    def plugin_pixel_weights(self, ctx: StepContext) -> Tensor | None:
        """Product of every plug-in's per-pixel weights (``None`` when no plug-in gives any)."""
        return self.plugin_mix_weights(ctx, None)[0]

    def plugin_mix_weights(
        self, ctx: StepContext, partner_labels: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(own, partner)`` products of every plug-in's per-pixel weights: of the weak view's
        pixels with their own pseudo-labels, and of the flipped batch's pixels with
        ``partner_labels`` (``None`` when no partner is pasted); ``None`` when no plug-in gives any."""
        own = partner = None
        for plugin in self.plugins.values():
            w = plugin.pixel_weights(ctx)
            if w is None:
                continue
            own = w if own is None else own * w
            if partner_labels is not None:
                pw = plugin.partner_pixel_weights(ctx, partner_labels, w)
                partner = pw if partner is None else partner * pw
        return own, partner

    def add_plugin_losses(self, ctx: StepContext, result: StepResult) -> StepResult:
        """Add plug-in terms to ``result.loss`` (logged as ``<plugin>/<term>``) and their
        optimizers to the result: an optimizer loss to ``optimizer_losses``, or, for a plug-in with
        ``optimizer_on_total``, the optimizer to ``steps_with_loss`` (its loss only logged, as
        ``total/<optimizer>``). In a labeled-only warm-up step (``ctx.warmup``) only plug-ins that
        train in it take part."""
        loss = result.loss
        for name, plugin in self.plugins.items():
            if ctx.warmup and not plugin.trains_in_warmup:
                continue
            for key, value in plugin.losses(ctx).items():
                result.logs[f"{name}/{key}"] = value
                loss = loss + value
            for opt_name, value in plugin.optimizer_losses(ctx).items():
                if plugin.optimizer_on_total:
                    result.steps_with_loss.add(opt_name)
                    result.logs[f"total/{opt_name}"] = value.detach()
                else:
                    result.optimizer_losses[opt_name] = value
            for key, value in plugin.diagnostics(ctx).items():
                result.logs[f"{name}/{key}"] = value.detach()
        result.loss = loss
        return result

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        out: dict[str, torch.optim.Optimizer] = {}
        for plugin in self.plugins.values():
            for name, opt in plugin.optimizers().items():
                if name in out:
                    raise ValueError(f"two plug-ins define an optimizer named {name!r}")
                out[name] = opt
        return out

    def extra_schedulers(self) -> dict[str, Callable[[int], None]]:
        out: dict[str, Callable[[int], None]] = {}
        for plugin in self.plugins.values():
            out.update(plugin.schedulers())
        return out

    def after_step(self, info: StepInfo) -> None:
        for plugin in self.plugins.values():
            plugin.after_step(info)


__all__ = [
    "PLUGINS",
    "Plugin",
    "PluginConfig",
    "PluginHost",
    "StepContext",
    "register_plugin",
]
