"""Training / eval datasets, the seeded endless batch stream, and Batch assembly."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from semiseg.config import DataConfig, StrongAugConfig, SyntheticConfig
from semiseg.data.base import make_splits
from semiseg.data.datasets import (
    EvalDataset,
    InfiniteBatches,
    LabeledDataset,
    UnlabeledDataset,
    derive_seed,
    make_batch,
)
from semiseg.data.synthetic import build_synthetic
from semiseg.methods.base import Batch


def small_cfg(**kw) -> DataConfig:
    syn = SyntheticConfig(num_labeled_pool=6, num_val=1, num_test=2, size=24, num_classes=3)
    return DataConfig(crop_size=32, scale_range=[0.5, 1.5], synthetic=syn, labeled=2, **kw)


@pytest.fixture(scope="module")
def splits():
    cfg = small_cfg()
    return cfg, make_splits(build_synthetic(cfg), cfg, seed=0)


# ------------------------------------------------------------------ datasets


def test_labeled_dataset_item(splits):
    cfg, sp = splits
    ds = LabeledDataset(sp.labeled, cfg, sp.num_classes, sp.in_channels)
    assert len(ds) == 2
    item = ds[(1, 123)]
    assert set(item) == {"image", "label"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.long
    assert float(item["image"].min()) < 0  # normalised (ImageNet mean/std for RGB)
    assert (item["label"] == 255).any()  # 24 px image scaled <= 1.5x, crop 32: padding is ignored
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 255}
    again = ds[(1, 123)]
    assert torch.equal(item["image"], again["image"]) and torch.equal(item["label"], again["label"])
    assert not torch.equal(item["image"], ds[(1, 124)]["image"])


def test_unlabeled_dataset_item(splits):
    cfg, sp = splits
    ds = UnlabeledDataset(sp.unlabeled, cfg, sp.num_classes, sp.in_channels)
    item = ds[(0, 5)]
    assert set(item) == {"x_w", "x_s1", "x_s2", "ignore", "box1", "box2"}
    for k in ("x_w", "x_s1", "x_s2"):
        assert item[k].shape == (3, 32, 32)
    for k in ("ignore", "box1", "box2"):
        assert item[k].shape == (32, 32) and item[k].dtype == torch.uint8
    assert set(item["ignore"].unique().tolist()) == {0, 255}
    assert not torch.equal(item["x_s1"], item["x_s2"])  # independent strong draws
    same = ds[(0, 5)]
    assert all(torch.equal(item[k], same[k]) for k in item)


def test_unlabeled_strong_views_share_the_weak_geometry():
    cfg = small_cfg()
    cfg.strong = StrongAugConfig(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutmix_p=1.0)
    sp = make_splits(build_synthetic(cfg), cfg, seed=0)
    ds = UnlabeledDataset(sp.unlabeled, cfg, sp.num_classes, sp.in_channels)
    for seed in range(5):
        item = ds[(seed % len(ds), seed)]
        assert torch.equal(item["x_w"], item["x_s1"]) and torch.equal(item["x_w"], item["x_s2"])
        assert item["box1"].any() and item["box2"].any()


def test_unlabeled_weak_view_does_not_depend_on_strong_recipe(splits):
    cfg, sp = splits
    other = small_cfg()
    other.strong = StrongAugConfig(color_jitter_p=0.1, blur_p=0.9, cutmix_p=0.9)
    a = UnlabeledDataset(sp.unlabeled, cfg, sp.num_classes, sp.in_channels)[(2, 9)]
    b = UnlabeledDataset(sp.unlabeled, other, sp.num_classes, sp.in_channels)[(2, 9)]
    assert torch.equal(a["x_w"], b["x_w"]) and torch.equal(a["ignore"], b["ignore"])


def test_eval_dataset(splits):
    cfg, sp = splits
    ds = EvalDataset(sp.test, cfg, sp.num_classes, sp.in_channels)
    item = ds[0]
    assert item["image"].shape == (3, 24, 24) and item["label"].shape == (24, 24)
    assert item["name"] == sp.test[0].name
    assert (item["label"] != 255).all() and (item["label"] > 0).any()
    unl = EvalDataset([sp.test[0].unlabeled()], cfg, sp.num_classes, sp.in_channels)[0]
    assert (unl["label"] == 255).all()
    assert torch.equal(unl["image"], item["image"])


def test_make_batch(splits):
    cfg, sp = splits
    lab = InfiniteBatches(LabeledDataset(sp.labeled, cfg, sp.num_classes, sp.in_channels), 2, seed=0)
    unl = InfiniteBatches(UnlabeledDataset(sp.unlabeled, cfg, sp.num_classes, sp.in_channels), 3, seed=0)
    batch = make_batch(next(lab), next(unl))
    assert isinstance(batch, Batch)
    assert batch.x_l.shape == (2, 3, 32, 32) and batch.y_l.shape == (2, 32, 32)
    assert batch.x_w.shape == batch.x_s1.shape == batch.x_s2.shape == (3, 3, 32, 32)
    assert batch.ignore.shape == batch.box1.shape == batch.box2.shape == (3, 32, 32)
    sup = make_batch(next(lab), None)
    assert sup.x_w is None and sup.ignore is None and sup.x_l.shape == (2, 3, 32, 32)


# ------------------------------------------------------------------ InfiniteBatches


class KeyDataset(Dataset):
    """Returns its key, so the stream's indices and seeds can be inspected without any I/O."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, seed = key
        return {"index": torch.tensor(index), "seed": torch.tensor(seed)}


def take(it, k):
    return [(b["index"].tolist(), b["seed"].tolist()) for b in itertools.islice(it, k)]


def test_same_seed_same_batches_and_other_seed_differs():
    a = take(InfiniteBatches(KeyDataset(10), 3, seed=1), 12)
    b = take(InfiniteBatches(KeyDataset(10), 3, seed=1), 12)
    c = take(InfiniteBatches(KeyDataset(10), 3, seed=2), 12)
    assert a == b and a != c
    assert all(len(idx) == 3 for idx, _ in a)  # fixed batch size


def test_epochs_are_permutations_and_drop_the_partial_batch():
    it = InfiniteBatches(KeyDataset(10), 3, seed=0)
    assert it.batches_per_epoch == 3
    batches = take(it, 6)
    for epoch in range(2):
        idx = sum((b[0] for b in batches[3 * epoch : 3 * epoch + 3]), [])
        assert len(set(idx)) == 9  # 9 distinct of 10, the 10th dropped with the partial batch
    first = sum((b[0] for b in batches[:3]), [])
    second = sum((b[0] for b in batches[3:]), [])
    assert first != second  # a new permutation each epoch
    seeds = [s for b in batches for s in b[1]]
    assert len(set(seeds)) == len(seeds)  # every item gets its own augmentation seed


def test_resume_with_start_batch_equals_skipping():
    fresh = take(InfiniteBatches(KeyDataset(7), 2, seed=3), 11)
    for k in (0, 1, 3, 4, 7):
        resumed = take(InfiniteBatches(KeyDataset(7), 2, seed=3, start_batch=k), 11 - k)
        assert resumed == fresh[k:]


def test_start_batch_loads_nothing_it_skips():
    class Counting(KeyDataset):
        calls = 0

        def __getitem__(self, key):
            Counting.calls += 1
            return super().__getitem__(key)

    it = InfiniteBatches(Counting(5), 2, seed=0, start_batch=1000)
    next(it)
    assert Counting.calls == 2 and it.next_batch == 1001


def test_ranks_are_disjoint_and_cover_the_epoch():
    n, bs = 8, 2
    r0 = InfiniteBatches(KeyDataset(n), bs, seed=4, rank=0, world_size=2)
    r1 = InfiniteBatches(KeyDataset(n), bs, seed=4, rank=1, world_size=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch == 2
    a, b = take(r0, 4), take(r1, 4)
    for epoch in range(2):
        i0 = sum((x[0] for x in a[2 * epoch : 2 * epoch + 2]), [])
        i1 = sum((x[0] for x in b[2 * epoch : 2 * epoch + 2]), [])
        assert not set(i0) & set(i1)
        assert sorted(i0 + i1) == list(range(n))
    single = InfiniteBatches(KeyDataset(n), bs, seed=4)
    assert sorted(single.epoch_indices(0)) == list(range(n))
    assert r0.epoch_indices(0) == single.epoch_indices(0)  # one shared permutation


def test_small_dataset_still_yields_full_batches():
    it = InfiniteBatches(KeyDataset(3), 4, seed=0, rank=1, world_size=2)  # 3 < 4 * 2
    assert it.batches_per_epoch >= 1
    for idx, _ in take(it, 5):
        assert len(idx) == 4 and set(idx) <= {0, 1, 2}


def test_uneven_shards_are_padded_to_equal_length():
    shards = [InfiniteBatches(KeyDataset(9), 2, seed=0, rank=r, world_size=4).shard(0) for r in range(4)]
    assert len({len(s) for s in shards}) == 1
    assert {i for s in shards for i, _ in s} == set(range(9))


def test_workers_give_the_same_stream_and_close_stops_them():
    plain = take(InfiniteBatches(KeyDataset(6), 2, seed=5), 5)
    with InfiniteBatches(KeyDataset(6), 2, seed=5, num_workers=1) as it:
        first = take(it, 2)
        workers = it._iter._workers
        it.close()
        assert not any(w.is_alive() for w in workers)
        assert first + take(it, 3) == plain


def test_stream_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(InfiniteBatches(KeyDataset(6), 2, seed=5), 4)
    assert torch.equal(torch.rand(3), expected)


def test_labeled_and_unlabeled_streams_are_decorrelated():
    class Other(KeyDataset):
        pass

    a = take(InfiniteBatches(KeyDataset(6), 2, seed=0), 2)
    b = take(InfiniteBatches(Other(6), 2, seed=0), 2)
    assert [x[1] for x in a] != [x[1] for x in b]


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(-5, 2**70) < 2**63


def test_real_dataset_stream_is_reproducible(splits):
    cfg, sp = splits
    ds = UnlabeledDataset(sp.unlabeled, cfg, sp.num_classes, sp.in_channels)
    a = next(InfiniteBatches(ds, 2, seed=0, start_batch=3))
    b = list(itertools.islice(InfiniteBatches(ds, 2, seed=0), 4))[-1]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_labeled_strong_view_keeps_the_weak_crop(splits):
    """``with_strong`` adds a jittered view of the same crop; the weak view and label do not move."""
    cfg, sp = splits
    strong = StrongAugConfig(color_jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    cfg = DataConfig(**{**vars(cfg), "strong": strong})
    plain = LabeledDataset(sp.labeled, cfg, sp.num_classes, sp.in_channels)[(1, 7)]
    both = LabeledDataset(sp.labeled, cfg, sp.num_classes, sp.in_channels, with_strong=True)[(1, 7)]
    assert set(both) == {"image", "label", "image_s"}
    assert torch.equal(both["image"], plain["image"]) and torch.equal(both["label"], plain["label"])
    assert both["image_s"].shape == both["image"].shape
    assert not torch.equal(both["image_s"], both["image"])
    pad = both["label"] == 255  # padding is 0 before normalisation in both views: geometry shared
    assert torch.equal(both["image_s"][:, pad], both["image"][:, pad])
    batch = make_batch({k: v[None] for k, v in both.items()})
    assert batch.x_ls is not None and torch.equal(batch.x_ls[0], both["image_s"])


def test_windowed_crops_keep_the_stream_exact_for_any_worker_count():
    """``data.resize_crop_only``: resuming at a batch and loading in a worker process give the same
    batches as the plain stream, and labels / ignore maps equal the full-resize path's."""
    cfg = small_cfg(resize_crop_only=True)
    sp = make_splits(build_synthetic(cfg), cfg, seed=0)
    windowed = LabeledDataset(sp.labeled, cfg, sp.num_classes, sp.in_channels)
    full = LabeledDataset(sp.labeled, small_cfg(), sp.num_classes, sp.in_channels)
    plain = list(itertools.islice(InfiniteBatches(windowed, 2, seed=3), 4))
    resumed = next(InfiniteBatches(windowed, 2, seed=3, start_batch=3))
    with InfiniteBatches(windowed, 2, seed=3, num_workers=1) as it:
        loaded = list(itertools.islice(it, 4))
    reference = list(itertools.islice(InfiniteBatches(full, 2, seed=3), 4))
    assert all(torch.equal(resumed[k], plain[3][k]) for k in resumed)
    for a, b, ref in zip(plain, loaded, reference):
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(a["label"], ref["label"])
        torch.testing.assert_close(a["image"], ref["image"], rtol=0, atol=1e-5)
