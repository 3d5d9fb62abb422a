"""Pseudo-label policies, the unlabeled-loss recipe (warm-up, ramp-up, labeled weight, Dice / balanced
CE) and ``train.init_from``: each against its formula on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import Pointwise, make_batch, tiny_method

from semiseg.config import load_config
from semiseg.errors import ConfigError
from semiseg.losses import class_balance_weights, masked_pseudo_ce, masked_pseudo_dice, weighted_dice_loss
from semiseg.methods import StepInfo
from semiseg.methods.semi import sigmoid_rampup
from semiseg.pseudo_labels import PseudoLabelConfig, PseudoLabeler, convex_map, pseudo_label_diagnostics

IGN = 255


def labeler(mask: str = "fixed", align: str = "none", momentum: float = 0.0, tau: float = 0.95, c: int = 3):
    return PseudoLabeler(PseudoLabelConfig(mask=mask, align=align, momentum=momentum), c, tau)


def logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    return probs.log()


def test_fixed_policy_is_argmax_and_max_softmax():
    logits = torch.randn(2, 3, 5, 6)
    pl = labeler()(logits)
    probs = logits.softmax(1)
    assert torch.equal(pl.label, probs.argmax(1)) and torch.equal(pl.score, probs.max(1).values)
    assert pl.threshold == 0.95 and torch.equal(pl.mask, probs.max(1).values >= 0.95)


def test_distribution_alignment_rescales_by_prior_over_running_mean():
    lab = labeler(align="labeled_prior")
    y = torch.zeros(1, 4, 5, dtype=torch.long)
    y[0, 0, :2] = 1  # prior: 18/20 background, 2/20 class 1, 0 class 2
    y[0, 1, 0] = 2
    y[0, 3, 4] = IGN  # ignored pixels do not count
    lab.observe_labeled(y)
    counts = torch.tensor([16.0, 2.0, 1.0])
    assert torch.allclose(lab.prior, counts / counts.sum())
    probs = torch.softmax(torch.randn(2, 3, 4, 5), 1)
    pl = lab(logits_from_probs(probs), update=True)
    mean = probs.mean(dim=(0, 2, 3))
    assert torch.allclose(lab.pred_mean, mean, atol=1e-6)
    expected = probs * (lab.prior / mean).view(1, 3, 1, 1)
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(pl.probs, expected, atol=1e-5)
    assert torch.equal(pl.label, expected.argmax(1))


def test_alignment_lifts_an_under_predicted_rare_class():
    """The model predicts class 1 at 2 % on average where the labels hold 20 %: alignment raises it."""
    lab = labeler(align="labeled_prior")
    y = torch.zeros(1, 10, 10, dtype=torch.long)
    y[0, :2] = 1
    lab.observe_labeled(y)
    probs = torch.full((1, 3, 10, 10), 0.01)
    probs[:, 0] = 0.98
    probs[0, :, 0, 0] = torch.tensor([0.3, 0.69, 0.01])  # one pixel leans to class 1
    probs = probs / probs.sum(1, keepdim=True)
    pl = lab(logits_from_probs(probs), update=True)
    assert pl.probs[:, 1].mean() > probs[:, 1].mean()


def test_freematch_thresholds_follow_eq_6_to_10():
    lab = labeler(mask="freematch", momentum=0.5)
    assert torch.allclose(lab.thresholds(), torch.full((3,), 1 / 3))  # τ_0 = p̃_0 = 1/C
    probs = torch.softmax(3 * torch.randn(2, 3, 4, 4), 1)
    ignore = torch.zeros(2, 4, 4, dtype=torch.uint8)
    ignore[1] = IGN  # only sample 0 counts
    pl = lab(logits_from_probs(probs), ignore, update=True)
    conf = probs[0].max(0).values.mean()
    tau_t = 0.5 * (1 / 3) + 0.5 * conf
    p_t = 0.5 * (1 / 3) + 0.5 * probs[0].mean(dim=(1, 2))
    assert torch.allclose(lab.global_conf, tau_t, atol=1e-6)
    assert torch.allclose(lab.thresholds(), p_t / p_t.max() * tau_t, atol=1e-6)
    expected = probs.max(1).values >= (p_t / p_t.max() * tau_t)[probs.argmax(1)]
    assert torch.equal(pl.mask, expected) and pl.threshold == 0.5


def test_flexmatch_thresholds_with_warmup_and_convex_mapping():
    lab = labeler(mask="flexmatch", tau=0.9)
    lab.prior.copy_(torch.tensor([0.5, 0.25, 0.25]))
    # 4 pixels: two confident class 0, one confident class 1, one unconfident.
    probs = torch.tensor([[0.95, 0.03, 0.02], [0.97, 0.02, 0.01], [0.05, 0.92, 0.03], [0.4, 0.3, 0.3]])
    probs = probs.T.reshape(1, 3, 2, 2)
    lab(logits_from_probs(probs), update=True)
    sigma = torch.tensor([0.5 / 0.5, 0.25 / 0.25, 0.0])
    unused = torch.tensor(0.25)
    assert torch.allclose(lab.learned, torch.cat((sigma, unused.reshape(1))), atol=1e-6)
    beta = sigma / torch.maximum(sigma.max(), unused)
    assert torch.allclose(lab.thresholds(), convex_map(beta) * 0.9, atol=1e-6)
    assert lab.thresholds()[2] == 0  # a class never confidently predicted has the lowest bar


def test_policy_statistics_are_buffers_saved_and_restored():
    lab = labeler(mask="freematch", align="labeled_prior", momentum=0.9)
    lab.observe_labeled(torch.randint(0, 3, (2, 6, 6)))
    lab(torch.randn(2, 3, 6, 6), update=True)
    state = lab.state_dict()
    assert {"prior", "pred_mean", "global_conf", "class_prob", "learned", "seen"} <= set(state)
    again = labeler(mask="freematch", align="labeled_prior", momentum=0.9)
    again.load_state_dict(state)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(again(x).label, lab(x).label) and torch.equal(again(x).score, lab(x).score)


def test_diagnostics_against_brute_force():
    g = torch.Generator().manual_seed(1)
    lab = labeler(tau=0.6)
    logits_u, logits_l = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    y = torch.randint(0, 3, (2, 5, 5), generator=g)
    y[0, 0] = IGN
    ignore = torch.zeros(2, 5, 5, dtype=torch.uint8)
    ignore[1, :2] = IGN
    pu, pl = lab(logits_u), lab(logits_l)
    out = pseudo_label_diagnostics(pu, ignore, pl, y, 3)
    for c in range(3):
        used = [(pu.label[i] == c) & pu.mask[i] & (ignore[i] != IGN) for i in range(2)]
        n_used = int((ignore != IGN).sum())
        assert math.isclose(
            float(out[f"pl_used/{c}"]), sum(int(u.sum()) for u in used) / n_used, rel_tol=1e-6
        )
        truth = y == c
        right = (truth & pl.mask & (pl.label == c)).sum() / truth.sum()
        wrong = (truth & pl.mask & (pl.label != c)).sum() / truth.sum()
        assert math.isclose(float(out[f"pl_right/{c}"]), float(right), rel_tol=1e-6)
        assert math.isclose(float(out[f"pl_wrong/{c}"]), float(wrong), rel_tol=1e-6)


def official_dice(probs: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor) -> float:
    """SSL4MIS ``DiceLoss`` as the official medical UniMatch calls it, written out with loops."""
    c_count = probs.shape[1]
    total = 0.0
    keep = ignore.flatten() != 1
    for c in range(c_count):
        score = probs[:, c].flatten()[keep]
        t = (target.flatten() == c).float()[keep]
        inter, y_sum, z_sum = float((score * t).sum()), float((t * t).sum()), float((score * score).sum())
        total += 1 - (2 * inter + 1e-5) / (z_sum + y_sum + 1e-5)
    return total / c_count


def test_unlabeled_dice_matches_the_official_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 6, 7, generator=g)
    pseudo = torch.randint(0, 3, (2, 6, 7), generator=g)
    conf = torch.rand(2, 6, 7, generator=g)
    ignore = torch.zeros(2, 6, 7, dtype=torch.uint8)
    ours = masked_pseudo_dice(logits, pseudo, conf, ignore, 0.5)
    ref = official_dice(logits.softmax(1), pseudo, (conf < 0.5).float())
    assert math.isclose(float(ours), ref, rel_tol=1e-5)
    ignore[:, :2] = IGN  # padding is left out too
    ours = masked_pseudo_dice(logits, pseudo, conf, ignore, 0.5)
    ref = official_dice(logits.softmax(1), pseudo, ((conf < 0.5) | (ignore == IGN)).float())
    assert math.isclose(float(ours), ref, rel_tol=1e-5)


def test_linear_dice_is_the_previous_labeled_dice():
    logits, y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    probs, onehot = logits.softmax(1), F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1e-5) / (
        probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5
    )
    assert torch.allclose(weighted_dice_loss(logits, y, torch.ones(2, 4, 4)), 1 - dice.mean())


def test_balanced_ce_weights_and_loss():
    prior = torch.tensor([0.9, 0.1])
    w = class_balance_weights(prior)
    assert torch.allclose(w, torch.tensor([1 / 1.8, 1 / 0.2])) and math.isclose(float((prior * w).sum()), 1)
    logits, pseudo = torch.randn(1, 2, 3, 3), torch.randint(0, 2, (1, 3, 3))
    conf, ignore = torch.ones(1, 3, 3), torch.zeros(1, 3, 3, dtype=torch.uint8)
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    expected = (ce * w[pseudo]).sum() / 9
    assert torch.allclose(masked_pseudo_ce(logits, pseudo, conf, ignore, 0.5, None, w), expected)


def test_ramp_and_labeled_weight_in_the_total():
    m = tiny_method(
        {"name": "fixmatch", "warmup_iters": 2, "rampup_iters": 4, "labeled_weight": 1.0},
        model=Pointwise(),
    )
    x, u = torch.tensor(2.0), torch.tensor(3.0)
    assert m.recipe.ramp(2) == pytest.approx(math.exp(-5))  # the ramp starts after the warm-up
    assert m.recipe.ramp(4) == pytest.approx(sigmoid_rampup(2, 4)) and m.recipe.ramp(6) == 1.0
    assert float(m.recipe.total(x, [u], 0.5, 4)) == pytest.approx(2.0 + 0.5 * sigmoid_rampup(2, 4) * 3.0)
    default = tiny_method({"name": "fixmatch"}, model=Pointwise())
    assert float(default.recipe.total(x, [u], 0.5, 0)) == 0.5 * (2.0 + 3.0)


def test_warmup_step_is_the_supervised_step():
    torch.manual_seed(0)
    model = Pointwise()
    m = tiny_method({"name": "unimatch", "warmup_iters": 3, "dice_weight": 1.0}, model=model)
    sup = tiny_method({"name": "supervised", "dice_weight": 1.0}, model=model)
    batch = make_batch()
    warm = m.training_step(batch, StepInfo(2, 10)).named()
    plain = sup.training_step(batch, StepInfo(2, 10)).named()
    assert torch.equal(warm["total"], plain["total"]) and float(warm["loss_s1"]) == 0.0
    assert all(n == batch.x_l.shape[0] for *_, n in model.calls[-2:])  # labeled passes only
    after = m.training_step(batch, StepInfo(3, 10)).named()
    assert float(after["total"].detach()) != float(warm["total"].detach()) and "pl_used/0" in after


@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "mean_teacher"])
@pytest.mark.parametrize(
    "policy", [("freematch", "none"), ("flexmatch", "labeled_prior"), ("fixed", "labeled_prior")]
)
@pytest.mark.parametrize("loss", ["ce", "dice", "balanced_ce"])
def test_every_policy_and_loss_trains_with_every_method(method, policy, loss):
    opts = {"name": method, "pseudo": {"mask": policy[0], "align": policy[1]}, "unlabeled_loss": loss}
    if method == "mean_teacher":
        opts["consistency"] = "ce"
    else:
        opts["mix"] = "supmix"
    m = tiny_method(opts, plugins={"sufd": {}} if method == "unimatch" else None)
    losses = m.training_step(make_batch(), StepInfo(1, 10)).named()
    assert torch.isfinite(losses["total"]) and losses["total"].requires_grad
    losses["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.parameters())
    assert {"pl_used/0", "pl_right/1"} <= set(losses)


def test_invalid_recipe_values_name_the_key():
    for bad, key in [
        ("method.warmup_iters=-1", "method.warmup_iters"),
        ("method.pseudo.momentum=1.0", "method.pseudo.momentum"),
        ("method.pseudo.mask=softmatch", "method.pseudo.mask"),
        ("method.labeled_weight=-2", "method.labeled_weight"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["method.name=unimatch", bad])


def test_init_from_loads_another_runs_network(tmp_path):
    from helpers import tiny_overrides

    from semiseg.trainer import Trainer, load_trained_model, train

    first = train(load_config(None, tiny_overrides(2, **{"method.name": "supervised"})), tmp_path / "a")
    _, saved, _ = load_trained_model(first.run_dir / "latest.pt")
    cfg = load_config(
        None, tiny_overrides(2, **{"method.name": "mean_teacher", "train.init_from": str(first.run_dir)})
    )
    trainer = Trainer(cfg, tmp_path / "b")
    for name, value in saved.state_dict().items():
        assert torch.equal(trainer.method.model.state_dict()[name], value), name
        assert torch.equal(trainer.method.teacher.state_dict()[name], value), name  # EMA starts there too
    bad = load_config(None, tiny_overrides(2, **{"train.init_from": str(tmp_path / "missing")}))
    with pytest.raises(ConfigError, match="train.init_from"):
        Trainer(bad, tmp_path / "c")
    wider = load_config(
        None,
        tiny_overrides(2, **{"train.init_from": str(first.run_dir), "model.widths": "[8, 8, 16, 32, 64]"}),
    )
    with pytest.raises(ConfigError, match="does not match"):
        Trainer(wider, tmp_path / "d")


def test_pseudo_label_curves_figure(tmp_path):
    import json

    from semiseg.plots import plot_pseudo_label_curves

    with_keys, without = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = [
        {
            "step": s,
            "kind": "train",
            "pl_used/0": 0.9,
            "pl_used/1": 0.05,
            "pl_right/1": 0.5,
            "pl_wrong/1": 0.2,
        }
        for s in (20, 40)
    ]
    with_keys.write_text("".join(json.dumps(r) + "\n" for r in rows))
    without.write_text(json.dumps({"step": 20, "kind": "train", "total": 1.0}) + "\n")
    assert plot_pseudo_label_curves({"old": without}, tmp_path / "none.png") is None
    out = plot_pseudo_label_curves({"new": with_keys, "old": without}, tmp_path / "pl.png", ["bg", "vessel"])
    assert out is not None and out.stat().st_size > 1000


def test_benchmark_window_means_average_the_logged_diagnostics(tmp_path):
    """benchmarks/pseudo_label_curves.py --window: the numbers the benchmark tables quote are the
    plain mean of the logged pl_used / pl_wrong values inside the step window."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudo_label_curves.py"
    spec = importlib.util.spec_from_file_location("pseudo_label_curves", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [
        {"step": 10, "kind": "train", "pl_used/1": 0.9, "pl_wrong/1": 0.9},
        {"step": 20, "kind": "train", "pl_used/1": 0.1, "pl_wrong/1": 0.2, "loss_x": 1.0},
        {"step": 20, "kind": "val", "pl_used/1": 0.7},
        {"step": 30, "kind": "train", "pl_used/1": 0.3},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    means = module.window_means(metrics, 20, 30)
    assert means == pytest.approx({"pl_used/1": 0.2, "pl_wrong/1": 0.2})
    losses = module.window_means(metrics, 20, 30, ("loss_",))
    assert losses == pytest.approx({"loss_x": 1.0})
    assert module.format_mean("pl_used/1", 0.2) == "pl_used/1=20.0%"
    assert module.format_mean("loss_x", 0.4201) == "loss_x=0.4201"
