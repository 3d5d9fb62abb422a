"""BCP (methods/bcp.py): the box mask, the copy-paste of images and targets, the region-weighted loss
and the connected-component filter against brute-force loops; the two stages (the teacher copied at
the boundary, its EMA after), pseudo-labels from the teacher through the policy, the config checks,
and checkpoints / resume across the stage boundary. The registry-wide harness (tests/test_harness.py)
trains bcp alone and with every plug-in."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import Pointwise, exact_trainer, fit_interrupted, make_batch, tiny_method
from scipy import ndimage

from semiseg.checkpoint import load_checkpoint
from semiseg.config import build_config, config_hash, load_config
from semiseg.errors import ConfigError
from semiseg.methods import METHODS, build_method
from semiseg.methods.bcp import (
    BCP,
    Box,
    bidirectional_copy_paste,
    box_mask,
    box_side,
    copy_paste,
    draw_box,
    labeled_copy_paste,
    largest_component,
    mix_loss,
)
from semiseg.types import IGNORE_INDEX, StepInfo


@pytest.fixture(scope="module", autouse=True)
def _restore_global_determinism():
    """The trainer runs below set ``deterministic: true`` (torch's deterministic mode, for the whole
    process): put it back after this module."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


# ----------------------------------------------------------------------------------------------
# The box mask
# ----------------------------------------------------------------------------------------------


def test_box_side_is_the_released_int_of_two_thirds() -> None:
    for size in range(1, 600):
        assert box_side(size, 2.0 / 3.0) == int(size * 2 / 3), size


def test_draw_box_covers_exactly_the_released_positions() -> None:
    g = torch.Generator().manual_seed(0)
    height, width = 12, 9  # box 8 × 6: top in [0, 4), left in [0, 3) (numpy randint's exclusive end)
    seen = {draw_box(height, width, 2.0 / 3.0, g)[:2] for _ in range(400)}
    assert seen == {(t, left) for t in range(4) for left in range(3)}
    assert {draw_box(height, width, 2.0 / 3.0, g)[2:] for _ in range(5)} == {(8, 6)}


@pytest.mark.parametrize("box", [Box(0, 0, 8, 6), Box(3, 2, 8, 6), Box(1, 4, 2, 5)])
def test_box_mask_is_zero_inside_the_box_and_one_outside(box: Box) -> None:
    h, w = 12, 11
    mask = box_mask(h, w, box)
    assert mask.shape == (h, w) and mask.dtype == torch.bool
    for i in range(h):
        for j in range(w):
            inside = box.top <= i < box.top + box.height and box.left <= j < box.left + box.width
            assert bool(mask[i, j]) == (not inside), (i, j)
    assert int((~mask).sum()) == box.height * box.width


# ----------------------------------------------------------------------------------------------
# Copy-paste of images and targets
# ----------------------------------------------------------------------------------------------


def _mask(h: int = 9, w: int = 10) -> torch.Tensor:
    return box_mask(h, w, Box(2, 3, 6, 6))


def test_copy_paste_keeps_the_background_outside_and_pastes_the_crop_inside() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 9, 10, generator=g), torch.randn(2, 3, 9, 10, generator=g)
    ya, yb = torch.randint(0, 4, (2, 9, 10), generator=g), torch.randint(0, 4, (2, 9, 10), generator=g)
    mask = _mask()
    x, y = copy_paste(a, b, mask), copy_paste(ya, yb, mask)
    assert y.dtype == ya.dtype
    for n in range(2):
        for i in range(9):
            for j in range(10):
                src, lab = (a, ya) if mask[i, j] else (b, yb)
                assert torch.equal(x[n, :, i, j], src[n, :, i, j]) and y[n, i, j] == lab[n, i, j]


def test_bidirectional_copy_paste_pairs_halves_and_mixes_targets_pixel_by_pixel() -> None:
    g = torch.Generator().manual_seed(2)
    n, h, w, k = 4, 9, 10, 2
    x_l, x_u = torch.randn(n, 1, h, w, generator=g), torch.randn(n, 1, h, w, generator=g)
    y_l = torch.randint(0, 4, (n, h, w), generator=g)
    y_l[0, 0, :] = IGNORE_INDEX
    pseudo = torch.randint(0, 4, (n, h, w), generator=g)
    pseudo[3, -1, :] = IGNORE_INDEX
    teach = torch.rand(n, h, w, generator=g)
    mask = _mask()
    ul, lu = bidirectional_copy_paste(x_l, y_l, x_u, pseudo, teach, mask, u_weight=0.5)
    assert (ul.weight_out, ul.weight_in, lu.weight_out, lu.weight_in) == (0.5, 1.0, 1.0, 0.5)
    for i in range(k):
        for r in range(h):
            for c in range(w):
                out = bool(mask[r, c])
                # X_ul: unlabeled sample i outside the box, labeled sample i inside
                img, tgt, q = (x_u[i], pseudo[i], teach[i]) if out else (x_l[i], y_l[i], None)
                assert torch.equal(ul.image[i, :, r, c], img[:, r, c])
                assert ul.target[i, r, c] == tgt[r, c]
                valid = tgt[r, c] != IGNORE_INDEX
                assert bool(ul.valid[i, r, c]) == bool(valid)
                assert float(ul.teach[i, r, c]) == (float(q[r, c]) if q is not None else 1.0) * float(valid)
                # X_lu: labeled sample k+i outside, unlabeled sample k+i inside
                j = k + i
                img, tgt, q = (x_l[j], y_l[j], None) if out else (x_u[j], pseudo[j], teach[j])
                assert torch.equal(lu.image[i, :, r, c], img[:, r, c])
                assert lu.target[i, r, c] == tgt[r, c]
                valid = tgt[r, c] != IGNORE_INDEX
                assert float(lu.teach[i, r, c]) == (float(q[r, c]) if q is not None else 1.0) * float(valid)


def test_labeled_copy_paste_mixes_the_two_labeled_halves_with_weight_one() -> None:
    g = torch.Generator().manual_seed(3)
    x_l, y_l = torch.randn(4, 3, 9, 10, generator=g), torch.randint(0, 3, (4, 9, 10), generator=g)
    mask = _mask()
    mix = labeled_copy_paste(x_l, y_l, mask)
    assert (mix.weight_out, mix.weight_in) == (1.0, 1.0) and mix.image.shape[0] == 2
    for i in range(2):
        for r in range(9):
            for c in range(10):
                src = i if mask[r, c] else 2 + i
                assert torch.equal(mix.image[i, :, r, c], x_l[src, :, r, c])
                assert mix.target[i, r, c] == y_l[src, r, c] and float(mix.teach[i, r, c]) == 1.0


# ----------------------------------------------------------------------------------------------
# The loss: regions scored apart, pseudo-labeled regions weighing u_weight
# ----------------------------------------------------------------------------------------------


def _hand_region_terms(logits, target, q, region, eps=1e-10):
    """CE_R and squared Dice_R by explicit loops over pixels and classes (plain floats)."""
    n, c, h, w = logits.shape
    probs = logits.double().softmax(1)
    ce_sum, count = 0.0, 0
    inter, psq, tsum = [0.0] * c, [0.0] * c, [0.0] * c
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if not region[i, j] or int(target[b, i, j]) == IGNORE_INDEX:
                    continue
                t, wq = int(target[b, i, j]), float(q[b, i, j])
                count += 1
                ce_sum += -math.log(float(probs[b, t, i, j])) * wq
                for k in range(c):
                    p = float(probs[b, k, i, j])
                    inter[k] += wq * p * (k == t)
                    psq[k] += wq * p * p
                    tsum[k] += wq * (k == t)
    ce = ce_sum / max(count, 1)
    dice = 1 - sum((2 * inter[k] + eps) / (psq[k] + tsum[k] + eps) for k in range(c)) / c
    return ce, dice


@pytest.mark.parametrize("u_weight,dice_weight", [(0.5, 1.0), (0.25, 1.0), (0.5, 0.0), (1.0, 3.0)])
def test_mix_loss_weighs_pseudo_labeled_regions_by_u_weight_by_hand(u_weight, dice_weight) -> None:
    g = torch.Generator().manual_seed(4)
    n, c, h, w = 2, 3, 6, 7
    x_l, x_u = torch.randn(2 * n, 1, h, w, generator=g), torch.randn(2 * n, 1, h, w, generator=g)
    y_l = torch.randint(0, c, (2 * n, h, w), generator=g)
    y_l[1, 0, :] = IGNORE_INDEX  # padding of a labeled image
    pseudo = torch.randint(0, c, (2 * n, h, w), generator=g)
    pseudo[2, :, -1] = IGNORE_INDEX  # padding of an unlabeled image
    teach = (torch.rand(2 * n, h, w, generator=g) > 0.3).float()  # the policy's pass mask
    mask = box_mask(h, w, Box(1, 2, 4, 4))
    ul, lu = bidirectional_copy_paste(x_l, y_l, x_u, pseudo, teach, mask, u_weight)
    for mix, pseudo_outside in ((ul, True), (lu, False)):
        logits = torch.randn(n, c, h, w, generator=g)
        loss, ce, dice = mix_loss(logits, mix, mask, dice_weight=dice_weight)
        ce_out, dice_out = _hand_region_terms(logits, mix.target, mix.teach, mask)
        ce_in, dice_in = _hand_region_terms(logits, mix.target, mix.teach, ~mask)
        a_out, a_in = (u_weight, 1.0) if pseudo_outside else (1.0, u_weight)
        want_ce, want_dice = a_out * ce_out + a_in * ce_in, a_out * dice_out + a_in * dice_in
        assert float(ce) == pytest.approx(want_ce, rel=1e-5)
        assert float(dice) == pytest.approx(want_dice, rel=1e-5)
        assert float(loss) == pytest.approx((want_ce + dice_weight * want_dice) / (1 + dice_weight), rel=1e-5)


def test_mix_loss_is_the_released_mix_loss_without_ignored_pixels() -> None:
    """No padding, every pixel teaching: the released ``mix_loss`` (Dice with squared sums and
    smooth 1e-10 over all classes; CE means per region) followed by ``(dice + ce)/2``."""
    g = torch.Generator().manual_seed(5)
    n, c, h, w = 3, 4, 8, 8
    logits = torch.randn(n, c, h, w, generator=g)
    img_l, patch_l = torch.randint(0, c, (n, h, w), generator=g), torch.randint(0, c, (n, h, w), generator=g)
    mask = box_mask(h, w, Box(1, 1, 5, 5))
    m = mask.expand(n, h, w).float()

    def dice(p, t, region):  # the released DiceLoss(p, t, mask)
        onehot = F.one_hot(t, c).permute(0, 3, 1, 2).float()
        out = 0.0
        for i in range(c):
            inter = (p[:, i] * onehot[:, i] * region).sum()
            den = (p[:, i] ** 2 * region).sum() + (onehot[:, i] ** 2 * region).sum()
            out = out + 1 - (2 * inter + 1e-10) / (den + 1e-10)
        return out / c

    soft = logits.softmax(1)
    ce_map = F.cross_entropy(logits, copy_paste(img_l, patch_l, mask), reduction="none")
    u = 0.5  # unlab=False: the image (outside) weighs 1, the patch (inside) u
    want_dice = dice(soft, img_l, m) + u * dice(soft, patch_l, 1 - m)
    ce_img = (F.cross_entropy(logits, img_l, reduction="none") * m).sum() / m.sum()
    ce_patch = (F.cross_entropy(logits, patch_l, reduction="none") * (1 - m)).sum() / (1 - m).sum()
    want = (want_dice + ce_img + u * ce_patch) / 2
    from semiseg.methods.bcp import CopyPaste

    target = copy_paste(img_l, patch_l, mask)
    mix = CopyPaste(
        torch.zeros(n, 1, h, w), target, torch.ones(n, h, w), torch.ones(n, h, w, dtype=torch.bool), 1.0, u
    )
    loss, _, _ = mix_loss(logits, mix, mask)
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert ce_map.shape == (n, h, w)


# ----------------------------------------------------------------------------------------------
# Largest connected component
# ----------------------------------------------------------------------------------------------


def _brute_lcc(label: np.ndarray, num_classes: int, usable: np.ndarray) -> np.ndarray:
    """The released get_ACDC_2DLargestCC, image by image and class by class, with scipy's 2-D
    labelling at 8-connectivity (skimage's default for 2-D) in place of skimage."""
    out = label.copy()
    for i in range(label.shape[0]):
        for c in range(1, num_classes):
            comps, count = ndimage.label((label[i] == c) & usable[i], structure=np.ones((3, 3)))
            keep = np.zeros_like(comps, dtype=bool)
            if count:
                keep = comps == np.argmax(np.bincount(comps.flat)[1:]) + 1
            out[i][(label[i] == c) & ~keep] = 0
    return out


@pytest.mark.parametrize("seed", range(6))
def test_largest_component_matches_per_image_scipy_labelling(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c, h, w = 5, 4, 14, 13
    # blobs: a smoothed random field, so components of every size occur
    field = ndimage.uniform_filter(rng.random((n, c, h, w)), size=(1, 1, 3, 3))
    label = field.argmax(1)
    ignore = np.zeros((n, h, w), dtype=np.uint8)
    if seed % 2:
        ignore[:, :, -2:] = IGNORE_INDEX
    got = largest_component(torch.from_numpy(label), c, torch.from_numpy(ignore))
    want = _brute_lcc(label, c, ignore != IGNORE_INDEX)
    assert got.dtype == torch.int64 and np.array_equal(got.numpy(), want)


def test_largest_component_is_8_connected_and_breaks_ties_in_raster_order() -> None:
    label = torch.tensor(
        [
            [
                [1, 0, 0, 0, 2, 2],
                [0, 1, 0, 0, 0, 0],  # the two 1s touch diagonally: one component of 2
                [0, 0, 0, 1, 0, 0],  # a single 1: dropped
                [2, 2, 0, 0, 0, 0],  # two components of two 2s: the first in raster order stays
            ]
        ]
    )
    got = largest_component(label, 3)
    want = label.clone()
    want[0, 2, 3] = 0
    want[0, 3, 0:2] = 0
    assert torch.equal(got, want)
    assert torch.equal(
        largest_component(torch.zeros(2, 4, 4, dtype=torch.long), 3), torch.zeros(2, 4, 4, dtype=torch.long)
    )


# ----------------------------------------------------------------------------------------------
# The method: stages, teacher, pseudo-labels, config
# ----------------------------------------------------------------------------------------------


def _pointwise_bcp(iters: int = 6, **options) -> BCP:
    torch.manual_seed(0)
    method = tiny_method({"name": "bcp", "teacher_mode": "eval", **options}, model=Pointwise(), iters=iters)
    assert isinstance(method, BCP)
    return method


def _train(method: BCP, batch, step: int, total: int, lr: float = 0.5) -> dict[str, float]:
    info = StepInfo(step, total)
    result = method.training_step(batch, info)
    method.model.zero_grad()
    result.loss.backward()
    with torch.no_grad():
        for p in method.model.parameters():
            p -= lr * p.grad
    method.after_step(info)
    return result.logged()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_stage_one_uses_labeled_data_only_and_leaves_the_teacher_alone() -> None:
    method = _pointwise_bcp(stage1_iters=2)
    batch = make_batch(4, 4, 12)
    batch.x_w = torch.full_like(batch.x_w, float("nan"))  # never read in stage 1
    initial = _state(method.teacher.module)
    for step in range(2):
        logged = _train(method, batch, step, 6)
        assert math.isfinite(logged["total"]) and set(logged) == {"loss_ce", "loss_dice", "total"}
        # the student sees n/2 mixed images per step
        assert method.model.calls[-1][2] == 2
    assert all(torch.equal(v, initial[k]) for k, v in method.teacher.module.state_dict().items())
    assert int(method.started) == 0


def test_the_teacher_is_copied_at_the_stage_boundary_then_averaged() -> None:
    method = _pointwise_bcp(stage1_iters=2, ema_decay=0.9)
    batch = make_batch(4, 4, 12)
    for step in range(2):
        _train(method, batch, step, 6)
    student = _state(method.model)
    assert any(not torch.equal(v, method.teacher.module.state_dict()[k]) for k, v in student.items())
    # step 2 (the first of stage 2) starts from a copy: its pseudo-labels are the student's own
    seen = {}
    original = method.teacher_predict

    def spy(x, features):
        seen["teacher"] = _state(method.teacher.module)
        return original(x, features)

    method.teacher_predict = spy  # type: ignore[method-assign]
    _train(method, batch, 2, 6)
    assert all(torch.equal(seen["teacher"][k], v) for k, v in student.items())
    assert int(method.started) == 1
    # after the step: θ_t ← 0.9·θ_t + 0.1·θ (no warm-up of the decay)
    for k, v in method.teacher.module.state_dict().items():
        torch.testing.assert_close(v, 0.9 * student[k] + 0.1 * method.model.state_dict()[k])


def test_stage_two_trains_on_the_teachers_pseudo_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher and student differ: the loss is the bidirectional copy-paste loss with the teacher's
    argmax pseudo-labels, filtered to their largest components."""
    import semiseg.methods.bcp as bcp

    method = _pointwise_bcp(stage1_iters=0)
    with torch.no_grad():
        for p in method.teacher.module.parameters():
            p.copy_(torch.randn_like(p))
    method.started.fill_(1)  # as if the boundary had passed
    batch = make_batch(4, 4, 12, pad_unlabeled=2)
    box = Box(2, 3, 8, 8)
    monkeypatch.setattr(bcp, "draw_box", lambda h, w, ratio, generator=None: box)
    result = method.training_step(batch, StepInfo(1, 6))  # step 1: no boundary copy
    with torch.no_grad():
        t_label = method.teacher.module(batch.x_w).argmax(1)
        s_label = method.model(batch.x_w).argmax(1)
    assert not torch.equal(t_label, s_label), "teacher and student must differ for this test"
    pseudo = largest_component(t_label, 3, batch.ignore).masked_fill(
        batch.ignore == IGNORE_INDEX, IGNORE_INDEX
    )
    mask = box_mask(12, 12, box)
    teach = torch.ones(4, 12, 12)
    ul, lu = bidirectional_copy_paste(batch.x_l, batch.y_l, batch.x_w, pseudo, teach, mask, 0.5)
    want = mix_loss(method.model(ul.image), ul, mask)[0] + mix_loss(method.model(lu.image), lu, mask)[0]
    torch.testing.assert_close(result.loss, want)


def test_the_policy_mask_decides_which_pseudo_labeled_pixels_teach(monkeypatch: pytest.MonkeyPatch) -> None:
    """τ above every confidence: only the ground-truth regions of the two mixed images teach."""
    import semiseg.methods.bcp as bcp

    method = _pointwise_bcp(stage1_iters=0, threshold=1.0)
    batch = make_batch(4, 4, 12, pad_unlabeled=0)
    box = Box(1, 1, 8, 8)
    monkeypatch.setattr(bcp, "draw_box", lambda h, w, ratio, generator=None: box)
    result = method.training_step(batch, StepInfo(0, 6))
    mask = box_mask(12, 12, box)
    ul, lu = bidirectional_copy_paste(
        batch.x_l, batch.y_l, batch.x_w, batch.y_l, torch.zeros(4, 12, 12), mask, 0.5
    )
    want = mix_loss(method.model(ul.image), ul, mask)[0] + mix_loss(method.model(lu.image), lu, mask)[0]
    torch.testing.assert_close(result.loss, want)
    assert float(result.logs["pl_used/0"]) == 0.0


def test_stage_one_length_fraction_or_count() -> None:
    cfg = build_config({"method": {"name": "bcp"}, "train": {"iters": 40000}})
    assert cfg.method.stage1_steps(40000) == 10000  # the released 10 000 + 30 000
    assert cfg.method.stage1_steps(2) == 1  # rounded half up
    assert cfg.method.stage1_steps(30) == 8
    cfg = build_config({"method": {"name": "bcp", "stage1_iters": 7}, "train": {"iters": 10}})
    assert cfg.method.stage1_iters == 7 and cfg.method.stage1_steps(10) == 7
    assert build_config({"method": {"name": "bcp", "stage1_iters": 0}}).method.stage1_steps(100) == 0


@pytest.mark.parametrize(
    "options,key",
    [
        ({"warmup_iters": 10}, "method.warmup_iters"),
        ({"labeled_weight": 1.0}, "method.labeled_weight"),
        ({"unlabeled_loss": "dice"}, "method.unlabeled_loss"),
        ({"box_ratio": 1.0}, "method.box_ratio"),
        ({"stage1_iters": 1.5}, "method.stage1_iters"),
        ({"stage1_iters": -1}, "method.stage1_iters"),
        ({"ema_decay": 1.0}, "method.ema_decay"),
        ({"u_weight": -0.1}, "method.u_weight"),
        ({"teacher_mode": "student"}, "method.teacher_mode"),
    ],
)
def test_bad_options_name_their_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"method": {"name": "bcp", **options}})
    assert str(info.value).startswith(key)


@pytest.mark.parametrize(
    "tree,key",
    [
        ({"data": {"batch_size": 4, "unlabeled_batch_size": 2}}, "data.unlabeled_batch_size"),
        ({"data": {"batch_size": 3, "unlabeled_batch_size": 3}}, "data.unlabeled_batch_size"),
        ({"method": {"name": "bcp", "stage1_iters": 20}, "train": {"iters": 10}}, "method.stage1_iters"),
    ],
)
def test_run_settings_bcp_cannot_train_with_are_rejected(tree: dict, key: str) -> None:
    cfg = build_config({"method": {"name": "bcp"}, **tree})
    with pytest.raises(ConfigError) as info:
        build_method(cfg, Pointwise(), 3)
    assert str(info.value).startswith(key)


def test_eval_model_is_the_student_unless_eval_teacher_once_stage_two_began() -> None:
    assert _pointwise_bcp().eval_model() is not None
    method = _pointwise_bcp()
    assert method.eval_model() is method.model
    method = _pointwise_bcp(eval_teacher=True)
    assert method.eval_model() is method.model  # stage 1: the teacher is not one yet
    method.start_teacher()
    assert method.eval_model() is method.teacher.module


def test_the_shipped_config_is_the_released_scripts_defaults() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "src/semiseg/configs/methods/bcp.yaml")
    m = cfg.method
    assert type(build_method(cfg, Pointwise(), 3)) is METHODS["bcp"]
    assert (m.stage1_iters, m.u_weight, m.ema_decay, m.box_ratio) == (0.25, 0.5, 0.99, pytest.approx(2 / 3))
    assert (m.teacher_mode, m.largest_cc, m.dice_weight, m.dice_squared, m.threshold) == (
        "train",
        True,
        1.0,
        True,
        0.0,
    )
    assert config_hash(cfg) == config_hash(build_config({"method": {"name": "bcp"}}))


# ----------------------------------------------------------------------------------------------
# Checkpoints: the teacher travels, resume is exact across the stage boundary
# ----------------------------------------------------------------------------------------------

ITERS = 5
STAGE1 = 2


def _trainer(run_dir: Path, resume: bool = False, **extra):
    return exact_trainer({"name": "bcp", "stage1_iters": STAGE1}, run_dir, ITERS, resume, **extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("bcp") / "straight"
    _trainer(run).fit()
    return load_checkpoint(run / "latest.pt")


def test_checkpoints_hold_the_teacher(straight: dict) -> None:
    state = straight["model"]
    teacher = {k for k in state if k.startswith("teacher.module.")}
    student = {k for k in state if k.startswith("model.")}
    assert {k.removeprefix("teacher.module.") for k in teacher} == {k.removeprefix("model.") for k in student}
    assert int(state["started"]) == 1 and int(state["teacher.updates"]) == ITERS - STAGE1
    assert any(
        not torch.equal(state[f"teacher.module.{k}"], state[f"model.{k}"]) for k in (s[6:] for s in student)
    )


@pytest.mark.parametrize("at_step", [1, STAGE1, STAGE1 + 1])  # mid stage 1, the boundary, mid stage 2
def test_resume_gives_the_uninterrupted_run(
    straight: dict, tmp_path: Path, monkeypatch, at_step: int
) -> None:
    run = tmp_path / "run"
    fit_interrupted(_trainer(run), monkeypatch, at_step=at_step)
    monkeypatch.undo()
    assert load_checkpoint(run / "latest.pt")["step"] == at_step
    _trainer(run, resume=True).fit()
    resumed = load_checkpoint(run / "latest.pt")
    for key in ("model", "optimizer"):
        _assert_same(resumed[key], straight[key], key)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_stage_two_only_starts_the_teacher_from_init_from(straight: dict, tmp_path: Path) -> None:
    source = tmp_path / "source.pt"
    torch.save(straight, source)
    trainer = _trainer(tmp_path / "run", **{"train.init_from": str(source)})
    trainer.cfg.method.stage1_iters = 0
    method = trainer.method
    want = {k.removeprefix("model."): v for k, v in straight["model"].items() if k.startswith("model.")}
    seen = {}
    original = method.teacher_predict

    def spy(x, features):
        seen.setdefault("teacher", _state(method.teacher.module))
        return original(x, features)

    method.teacher_predict = spy  # type: ignore[method-assign]
    trainer.fit()
    assert seen["teacher"].keys() == want.keys()
    assert all(torch.equal(seen["teacher"][k], v) for k, v in want.items())
