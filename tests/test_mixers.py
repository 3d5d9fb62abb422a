"""Strong-view mixers (semiseg.mixers): paste, CutMix / ClassMix / SupMix masks, the StrongMixer and
its running class statistics. Property-based where a property is the specification."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semiseg.mixers import (
    ClassMixConfig,
    ClassStatistics,
    MixConfig,
    MixSample,
    StrongMixer,
    SupMixConfig,
    choose_classes,
    classmix_count,
    classmix_mask,
    labeled_source,
    match_size,
    paste,
    present_classes,
    supmix_count,
    supmix_mask,
)

IGN = 255
SETTINGS = settings(max_examples=40, deadline=None)


def sample_strategy(draw, n: int, h: int, w: int, num_classes: int, seed: int) -> MixSample:
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, (n, h, w), generator=g)
    ignore = torch.where(torch.rand(n, h, w, generator=g) < 0.2, IGN, 0).to(torch.uint8)
    return MixSample(
        torch.randn(n, 2, h, w, generator=g), label, torch.rand(n, h, w, generator=g), ignore,
        torch.rand(n, h, w, generator=g) if draw else None,
    )  # fmt: skip


@st.composite
def pair_and_mask(draw):
    n = draw(st.integers(1, 3))
    h = draw(st.integers(1, 6))
    w = draw(st.integers(1, 6))
    k = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 10_000))
    target = sample_strategy(draw(st.booleans()), n, h, w, k, seed)
    source = sample_strategy(draw(st.booleans()), n, h, w, k, seed + 1)
    mask = torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed + 2)) < draw(st.floats(0, 1))
    return target, source, mask


# ----------------------------------------------------------------------------------------------
# paste
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(pair_and_mask())
def test_paste_takes_every_field_from_source_inside_and_target_outside(case):
    target, source, mask = case
    out = paste(target, source, mask)
    inside, outside = mask, ~mask
    assert torch.equal(out.label[inside], source.label[inside])  # pasted pixels carry the source label
    assert torch.equal(out.label[outside], target.label[outside])
    assert torch.equal(out.confidence[inside], source.confidence[inside])
    assert torch.equal(out.confidence[outside], target.confidence[outside])
    img_mask = mask.unsqueeze(1).expand_as(out.image)
    assert torch.equal(out.image[img_mask], source.image[img_mask])
    assert torch.equal(out.image[~img_mask], target.image[~img_mask])
    # Ignore: the target's ignored pixels outside the mask stay ignored; the source's inside come along.
    assert bool((out.ignore[outside & (target.ignore == IGN)] == IGN).all())
    assert bool((out.ignore[inside & (source.ignore == IGN)] == IGN).all())
    assert bool((out.ignore[inside & (source.ignore != IGN)] != IGN).all())
    # Weights: None only when both sides have none; a missing side counts as ones.
    if target.weight is None and source.weight is None:
        assert out.weight is None
    else:
        t_w = target.weight if target.weight is not None else torch.ones_like(target.confidence)
        s_w = source.weight if source.weight is not None else torch.ones_like(target.confidence)
        assert torch.equal(out.weight, torch.where(mask, s_w, t_w))
    assert out.label.dtype == target.label.dtype and out.ignore.dtype == target.ignore.dtype


def test_paste_rejects_mismatched_shapes():
    t = sample_strategy(False, 2, 4, 4, 3, 0)
    with pytest.raises(ValueError, match="same N×H×W"):
        paste(t, t, torch.zeros(2, 4, 5, dtype=torch.bool))


def test_paste_carries_the_provenance_map_and_rejects_it_on_one_side():
    t = sample_strategy(False, 2, 4, 4, 3, 0)
    own = t._replace(source=torch.zeros(2, 4, 4, dtype=torch.uint8))
    other = t._replace(source=torch.ones(2, 4, 4, dtype=torch.uint8))
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1:3, :] = True
    assert torch.equal(paste(own, other, mask).source, mask.to(torch.uint8))
    assert paste(t, t, mask).source is None
    with pytest.raises(ValueError, match="one side only"):
        paste(own, t, mask)


def test_match_size_resizes_the_provenance_map_with_the_labels():
    t = sample_strategy(False, 2, 4, 4, 3, 0)._replace(source=torch.full((2, 4, 4), 2, dtype=torch.uint8))
    resized = match_size(t, (8, 6))
    assert resized.source.shape == (2, 8, 6) and resized.source.dtype == torch.uint8
    assert bool((resized.source == 2).all()) and resized.label.shape == (2, 8, 6)


def test_flip_is_the_reversed_batch_and_select_indexes():
    s = sample_strategy(True, 3, 2, 2, 3, 0)
    f = s.flip()
    for a, b in zip(s, f):
        assert (a is None and b is None) or torch.equal(a.flip(0), b)
    sel = s.select(torch.tensor([2, 0]))
    assert torch.equal(sel.label, s.label[[2, 0]])


# ----------------------------------------------------------------------------------------------
# Class selection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(0, 0), (1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (7, 3)])
def test_supmix_count_is_max_1_floor_half(n, k):
    assert supmix_count(n) == k


@pytest.mark.parametrize("n", range(0, 8))
def test_classmix_count(n):
    assert classmix_count(n, "ceil") == math.ceil(n / 2)
    assert classmix_count(n, "floor") == n // 2


def test_present_classes_drops_ignore_excluded_and_ignored_pixels():
    label = torch.tensor([[0, 1, 2], [255, 3, 3]])
    assert present_classes(label).tolist() == [0, 1, 2, 3]
    assert present_classes(label, exclude=(0, 3)).tolist() == [1, 2]
    ignore = torch.tensor([[0, 255, 0], [0, 0, 0]])
    assert present_classes(label, ignore=ignore).tolist() == [0, 2, 3]


def test_choose_classes_never_picks_zero_weight_classes():
    torch.manual_seed(0)
    cands = torch.tensor([1, 2, 3])
    weights = torch.tensor([1.0, 0.0, 1.0, 0.0])
    for _ in range(50):
        assert choose_classes(cands, 1, weights).item() == 2
    picked = choose_classes(cands, 2, torch.ones(4))
    assert picked.unique().numel() == 2 and set(picked.tolist()) <= {1, 2, 3}


def test_choose_classes_weighted_prefers_heavy_class():
    torch.manual_seed(0)
    cands = torch.tensor([1, 2])
    weights = torch.tensor([0.0, 1.0, 9.0])
    picks = [choose_classes(cands, 1, weights).item() for _ in range(400)]
    assert 0.8 < picks.count(2) / 400 < 0.97


@st.composite
def gt_labels(draw):
    n = draw(st.integers(1, 3))
    h = draw(st.integers(1, 8))
    w = draw(st.integers(1, 8))
    num_classes = draw(st.integers(1, 6))
    values = st.sampled_from([*range(num_classes), IGN])
    flat = draw(st.lists(values, min_size=n * h * w, max_size=n * h * w))
    exclude = tuple(draw(st.sets(st.integers(0, num_classes), max_size=2)))
    return torch.tensor(flat).reshape(n, h, w), exclude


@SETTINGS
@given(gt_labels(), st.integers(0, 10_000))
def test_supmix_mask_properties(case, seed):
    label, exclude = case
    torch.manual_seed(seed)
    mask, chosen = supmix_mask(label, exclude)
    for i in range(label.shape[0]):
        cands = set(label[i].unique().tolist()) - set(exclude) - {IGN}
        picked = set(chosen[i].tolist())
        # k = max(1, ⌊n/2⌋) distinct candidates (eq. 8); none when the image has no candidate class.
        assert len(picked) == len(chosen[i]) == supmix_count(len(cands))
        assert picked <= cands
        # Never an excluded class or an ignore pixel; the whole region of every chosen class (eq. 9).
        pasted = label[i][mask[i]]
        assert not bool(torch.isin(pasted, torch.tensor([IGN, *exclude])).any())
        assert torch.equal(mask[i], torch.isin(label[i], chosen[i]))
        if not cands:
            assert not bool(mask[i].any())  # no-op


def test_supmix_mask_noop_on_background_only_image():
    label = torch.zeros(2, 4, 4, dtype=torch.long)
    label[1, 0] = IGN
    mask, chosen = supmix_mask(label, (0,))
    assert not bool(mask.any()) and all(c.numel() == 0 for c in chosen)


@SETTINGS
@given(gt_labels(), st.integers(0, 10_000), st.sampled_from(["ceil", "floor"]))
def test_classmix_mask_properties(case, seed, rounding):
    label, _ = case
    label = label.clamp_max(5)  # pseudo-labels have no 255; padding comes through `ignore`
    ignore = torch.where(torch.rand(label.shape, generator=torch.Generator().manual_seed(seed)) < 0.3, IGN, 0)
    torch.manual_seed(seed)
    mask = classmix_mask(label, ignore, rounding)
    for i in range(label.shape[0]):
        present = label[i][ignore[i] != IGN].unique()
        picked = label[i][mask[i]].unique()
        assert set(picked.tolist()) <= set(present.tolist())
        assert picked.numel() == classmix_count(present.numel(), rounding)
        assert torch.equal(mask[i], torch.isin(label[i], picked))


# ----------------------------------------------------------------------------------------------
# StrongMixer
# ----------------------------------------------------------------------------------------------


def official_cutmix(own: MixSample, partner: MixSample, box: torch.Tensor) -> MixSample:
    """UniMatch's official assembly (``mask_u_w_cutmixed1[cutmix_box1 == 1] = ...``), verbatim logic."""
    img, lab, conf, ign = own.image.clone(), own.label.clone(), own.confidence.clone(), own.ignore.clone()
    img[box.unsqueeze(1).expand(img.shape) == 1] = partner.image[box.unsqueeze(1).expand(img.shape) == 1]
    lab[box == 1] = partner.label[box == 1]
    conf[box == 1] = partner.confidence[box == 1]
    ign[box == 1] = partner.ignore[box == 1]
    return MixSample(img, lab, conf, ign)


@st.composite
def boxes(draw, n: int, h: int, w: int):
    box = torch.zeros(n, h, w)
    for i in range(n):
        if draw(st.booleans()):
            y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            y1, x1 = draw(st.integers(y0 + 1, h)), draw(st.integers(x0 + 1, w))
            box[i, y0:y1, x0:x1] = 1
    return box


@SETTINGS
@given(st.data())
def test_cutmix_assembly_matches_unimatch_official(data):
    n, h, w = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 7)), data.draw(st.integers(2, 7))
    seed = data.draw(st.integers(0, 10_000))
    own = sample_strategy(False, n, h, w, 4, seed)
    partner_pred = sample_strategy(False, n, h, w, 4, seed + 1)
    partner = MixSample(own.image.flip(0), partner_pred.label, partner_pred.confidence, own.ignore.flip(0))
    box = data.draw(boxes(n, h, w))
    mixer = StrongMixer(MixConfig(mix="cutmix"), 4)
    out = mixer(own, partner, None, box)
    ref = official_cutmix(own, partner, box)
    for a, b in zip(out[:4], ref):
        assert torch.equal(a, b)


def test_mix_none_returns_the_strong_view_untouched():
    own = sample_strategy(True, 2, 4, 4, 3, 0)
    out = StrongMixer(MixConfig(mix="none"), 3)(own, None, None, torch.ones(2, 4, 4))
    assert out is own


def _supmix_case(n_l: int = 2, n_u: int = 3, h: int = 6, w: int = 6):
    g = torch.Generator().manual_seed(3)
    x_l = torch.randn(n_l, 2, h, w, generator=g)
    y_l = torch.zeros(n_l, h, w, dtype=torch.long)
    y_l[0, :2] = 1
    y_l[0, 4:] = 2
    y_l[1, :, :3] = 3
    y_l[1, 0, 0] = IGN
    own = sample_strategy(True, n_u, h, w, 4, 7)
    return x_l, y_l, own


def test_supmix_pastes_labeled_gt_with_confidence_one():
    torch.manual_seed(0)
    x_l, y_l, own = _supmix_case()
    labeled = labeled_source(x_l, y_l, own.label.shape[0], with_weight=True)
    mixer = StrongMixer(MixConfig(mix="supmix", mixer=SupMixConfig(p=1.0, fallback="none")), 4)
    out = mixer(own, None, labeled, None)
    for i in range(own.label.shape[0]):
        j = i % x_l.shape[0]  # labeled partner = labeled sample i mod n_l
        region = out.confidence[i] == 1.0  # the SupMix mask: confidence 1 there (own conf is in [0, 1))
        chosen = y_l[j][region].unique()
        cands = {1, 2} if j == 0 else {3}
        assert set(chosen.tolist()) <= cands and chosen.numel() == max(1, len(cands) // 2)
        assert torch.equal(region, torch.isin(y_l[j], chosen))  # the whole region of the chosen classes
        assert torch.equal(out.label[i][region], y_l[j][region])  # pasted pixels carry the GT label
        assert bool((out.ignore[i][region] != IGN).all())
        assert bool((out.weight[i][region] == 1.0).all())
        assert torch.equal(out.image[i][:, region], x_l[j][:, region])
        assert torch.equal(out.label[i][~region], own.label[i][~region])
        assert torch.equal(out.ignore[i][~region], own.ignore[i][~region])


def test_supmix_probability_zero_falls_back_to_cutmix():
    x_l, y_l, own = _supmix_case()
    partner = MixSample(own.image.flip(0), own.label.flip(0), own.confidence.flip(0), own.ignore.flip(0))
    box = torch.zeros_like(own.confidence)
    box[0, 1:4, 1:4] = 1
    labeled = labeled_source(x_l, y_l, own.label.shape[0], with_weight=False)
    sup = StrongMixer(MixConfig(mix="supmix", mixer=SupMixConfig(p=0.0)), 4)(own, partner, labeled, box)
    cut = StrongMixer(MixConfig(mix="cutmix"), 4)(own, partner, None, box)
    for a, b in zip(sup, cut):
        assert (a is None and b is None) or torch.equal(a, b)


def test_supmix_without_candidates_falls_back_to_cutmix():
    x_l, _, own = _supmix_case()
    y_bg = torch.zeros(2, 6, 6, dtype=torch.long)  # background only: SupMix has nothing to paste
    partner = MixSample(own.image.flip(0), own.label.flip(0), own.confidence.flip(0), own.ignore.flip(0))
    box = torch.zeros_like(own.confidence)
    box[:, 2:5, 2:5] = 1
    labeled = labeled_source(x_l, y_bg, 3, with_weight=False)
    out = StrongMixer(MixConfig(mix="supmix", mixer=SupMixConfig(p=1.0)), 4)(own, partner, labeled, box)
    ref = official_cutmix(own, partner, box)
    assert torch.equal(out.label, ref.label) and torch.equal(out.image, ref.image)


def test_classmix_probability_one_pastes_partner_classes():
    torch.manual_seed(0)
    own = sample_strategy(False, 2, 5, 5, 3, 1)
    pl = torch.tensor([0, 1, 2]).repeat(2, 5, 2)[:, :, :5]
    partner = MixSample(own.image.flip(0), pl, torch.full((2, 5, 5), 0.5), own.ignore.flip(0))
    out = StrongMixer(MixConfig(mix="classmix", mixer=ClassMixConfig(p=1.0)), 3)(own, partner, None, None)
    for i in range(2):
        m = out.confidence[i] == 0.5
        assert pl[i][m].unique().numel() == 2  # ⌈3/2⌉ of the partner's 3 classes
        assert torch.equal(out.label[i][m], pl[i][m])


def test_match_size_resizes_labeled_source():
    x_l, y_l, _ = _supmix_case(h=4, w=4)
    src = match_size(labeled_source(x_l, y_l, 2, True), (8, 8))
    assert src.image.shape == (2, 2, 8, 8) and src.label.shape == (2, 8, 8)
    assert set(src.label.unique().tolist()) <= set(y_l.unique().tolist())


# ----------------------------------------------------------------------------------------------
# Running class statistics
# ----------------------------------------------------------------------------------------------


def test_class_statistics_ema_is_exact():
    stats = ClassStatistics(3, momentum=0.5)
    y = torch.tensor([[[0, 0, 1, 255]]])
    logits = torch.zeros(1, 3, 1, 4)
    logits[0, 0, 0, :] = 1.0  # predicts class 0 everywhere
    stats.update(logits, y)
    assert torch.allclose(stats.frequency, torch.tensor([2 / 3, 1 / 3, 0.0]))  # first observation
    assert torch.allclose(stats.iou[:2], torch.tensor([2 / 3, 0.0]))
    assert stats.iou[2] == 0 and not bool(stats.seen[1, 2])  # class 2 never in the union
    stats.update(logits, torch.tensor([[[1, 1, 1, 1]]]))
    assert torch.allclose(stats.frequency, torch.tensor([1 / 3, 2 / 3, 0.0]))  # 0.5·old + 0.5·new
    pseudo = torch.tensor([[[0, 1, 1, 2]]])
    conf = torch.tensor([[[0.2, 0.4, 0.8, 0.9]]])
    ignore = torch.tensor([[[0, 0, 0, 255]]])
    stats.update(logits, y, pseudo, conf, ignore)
    assert torch.allclose(stats.confidence, torch.tensor([0.2, 0.6, 0.0]))
    assert set(stats.state_dict()) == {"frequency", "iou", "confidence", "seen"}


def test_selection_weights_per_strategy():
    stats = ClassStatistics(3, momentum=0.9)
    assert stats.weights("paper", "iou", 0.05) is None
    stats.frequency.copy_(torch.tensor([0.9, 0.08, 0.02]))
    stats.iou.copy_(torch.tensor([0.9, 0.2, 1.0]))
    inv = stats.weights("inverse_frequency", "iou", 0.05)
    assert inv[2] > inv[1] > inv[0]
    diff = stats.weights("difficulty", "iou", 0.05)
    assert torch.allclose(diff, torch.tensor([0.1, 0.8, 0.05]))


def test_strong_mixer_statistics_are_buffers_in_state_dict():
    mixer = StrongMixer(MixConfig(mix="supmix", mixer=SupMixConfig(strategy="difficulty")), 4)
    keys = set(mixer.state_dict())
    assert {"stats.frequency", "stats.iou", "stats.confidence"} <= keys


def test_a_registered_mixer_owns_its_options(monkeypatch):
    """A mixer a package registers declares ``Config``; ``method.mixer`` is validated against it and
    reaches the mixer (as ``cfg`` of the instance the method builds)."""
    from dataclasses import dataclass

    from semiseg.config import load_config
    from semiseg.errors import ConfigError
    from semiseg.mixers import Mixer, MixerConfig
    from semiseg.registry import MIXERS

    @dataclass
    class StripesConfig(MixerConfig):
        width: int = 2

    class Stripes(Mixer):
        Config = StripesConfig

        def __call__(self, own, partner, labeled, box_mask, stats):
            return own

    monkeypatch.setitem(MIXERS._entries, "stripes", Stripes)
    cfg = load_config(None, ["method.name=unimatch", "method.mix=stripes", "method.mixer={width: 5}"])
    assert cfg.method.mixer == StripesConfig(width=5)
    assert StrongMixer(cfg.method, 3).kind.cfg.width == 5
    with pytest.raises(ConfigError, match=r"method\.mixer\.depth: unknown config key"):
        load_config(None, ["method.name=unimatch", "method.mix=stripes", "method.mixer={depth: 1}"])
