"""Torch datasets for the three kinds of sample, the endless seeded batch stream, and Batch assembly.

Training datasets are indexed by ``(index, sample_seed)``: the seed drives every augmentation draw
(:mod:`semiseg.data.transforms`), so a sample is a pure function of (record, config, seed).
:class:`InfiniteBatches` derives the seeds from (run seed, epoch, position, rank), which makes the
batch stream reproducible, exactly resumable (``start_batch``) and independent of ``num_workers``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from ..config import DataConfig
from ..errors import SemisegError
from ..types import IGNORE_INDEX, Batch
from .base import Record
from .io import normalization, normalize, read_record
from .transforms import cutmix_box, strong_view, weak_view

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..distributed import DistInfo
    from .base import DataSplits

_MASK64 = (1 << 64) - 1
# Domain tags keep the permutation seeds and the per-sample seeds in separate streams.
_PERM_TAG, _SAMPLE_TAG, _VIEW_TAG = 0x5045524D, 0x53414D50, 0x56494557


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (NumPy SeedSequence hashing; any sign, any size)."""
    words = np.random.SeedSequence([int(p) & _MASK64 for p in parts]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


class _RecordDataset(Dataset):
    """Shared plumbing: records, config, normalisation constants."""

    def __init__(
        self, records: Sequence[Record], cfg: DataConfig, num_classes: int, in_channels: int
    ) -> None:
        self.records = list(records)
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.mean, self.std = normalization(cfg, in_channels)

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        return read_record(self.records[index], self.cfg, self.num_classes, self.in_channels)

    def _weak(self, index: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        image, mask = self._read(index)
        c = self.cfg
        return weak_view(image, mask, c.crop_size, c.scale_range, c.hflip, gen, c.resize_crop_only)


class LabeledDataset(_RecordDataset):
    """Labeled weak view (UniMatch's): ``ds[(index, seed)] -> {"image": C×S×S, "label": S×S long}``.

    Padding of the crop is labeled 255 (ignored by the loss). With ``with_strong`` the sample also
    carries ``"image_s"``, a strong view of the same crop (photometric only, so ``label`` still
    fits it), for methods that paste from a strongly augmented labeled view (``mix: supmix`` with
    ``mixer.source: strong``). Its draws come from their own generator, so the weak view is the
    same with or without it.
    """

    def __init__(
        self,
        records: Sequence[Record],
        cfg: DataConfig,
        num_classes: int,
        in_channels: int,
        with_strong: bool = False,
    ) -> None:
        super().__init__(records, cfg, num_classes, in_channels)
        self.with_strong = with_strong

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = key
        img, label, _ = self._weak(index, _generator(derive_seed(_VIEW_TAG, seed, 0)))
        sample = {"image": normalize(img, self.mean, self.std), "label": label}
        if self.with_strong:
            strong = strong_view(img, self.cfg.strong, _generator(derive_seed(_VIEW_TAG, seed, 1)))
            sample["image_s"] = normalize(strong, self.mean, self.std)
        return sample


class UnlabeledDataset(_RecordDataset):
    """Unlabeled views (UniMatch's): the weak crop plus two independent strong views of it.

    ``ds[(index, seed)] -> {"x_w", "x_s1", "x_s2"}`` (normalised C×S×S), ``"ignore"`` (S×S uint8, 255
    on padding, else 0) and ``"box1"``, ``"box2"`` (S×S uint8 {0, 1} CutMix boxes, one per strong
    view). Weak view, each strong view and each box draw from their own generator derived from
    ``seed``, so changing the strong recipe does not move the crop. Masks are never read.
    """

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Tensor]:
        index, seed = key
        gens = [_generator(derive_seed(_VIEW_TAG, seed, part)) for part in range(5)]
        img, _, ignore = self._weak(index, gens[0])
        strong = self.cfg.strong
        size = img.shape[-2:]
        x_s1 = strong_view(img, strong, gens[1])
        box1 = cutmix_box(size[0], size[1], strong, gens[2])
        x_s2 = strong_view(img, strong, gens[3])
        box2 = cutmix_box(size[0], size[1], strong, gens[4])
        norm = lambda t: normalize(t, self.mean, self.std)
        return {
            "x_w": norm(img),
            "x_s1": norm(x_s1),
            "x_s2": norm(x_s2),
            "ignore": ignore,
            "box1": box1,
            "box2": box2,
        }

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image, _ = read_record(self.records[index].unlabeled(), self.cfg, self.num_classes, self.in_channels)
        return image, None


class EvalDataset(_RecordDataset):
    """Full-size evaluation samples: ``ds[i] -> {"image": C×H×W, "label": H×W long, "name": str}``.

    Images are only resized by ``data.resize`` / ``data.long_side`` (as when training) and
    normalised; a record without a mask gets an all-255 (ignored) label.
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, mask = self._read(index)
        img = torch.from_numpy(np.array(image, dtype=np.float32, copy=True)).permute(2, 0, 1)
        if mask is None:
            label = torch.full(img.shape[-2:], IGNORE_INDEX, dtype=torch.long)
        else:
            label = torch.from_numpy(np.array(mask, dtype=np.int64, copy=True))
        return {
            "image": normalize(img, self.mean, self.std),
            "label": label,
            "name": self.records[index].name,
        }


# --------------------------------------------------------------------------------------------
# Endless, seeded, shardable batch stream
# --------------------------------------------------------------------------------------------


class InfiniteBatches:
    """Endless iterator of collated batches of a training dataset, resumable exactly from any step.

    Epoch ``e`` concatenates ``k = ⌈batch_size·world_size / n⌉`` permutations of the ``n`` samples
    (``k = 1`` unless the dataset is smaller than one global batch), each ``randperm(n)`` seeded from
    ``(seed, e, j)``, so every epoch yields at least one full batch per rank. The epoch's index list
    is padded by wrapping to a multiple of ``world_size`` and rank ``r`` takes every
    ``world_size``-th entry from ``r`` (DistributedSampler style: disjoint shards of one permutation,
    equal lengths); each rank then cuts fixed-size batches and drops the last partial one. Item
    ``i`` of a shard gets ``sample_seed = derive_seed(seed, salt, e, i, r)`` where the salt is the
    dataset class name, so a labeled and an unlabeled stream built with the same seed are not
    correlated.

    ``start_batch`` skips exactly that many batches without loading anything (exact resume).
    One :class:`~torch.utils.data.DataLoader` over an endless batch sampler is created lazily, so
    worker processes (``num_workers > 0``) start once rather than once per (possibly one-batch)
    epoch. Batches are identical for any ``num_workers``, and the global torch RNG is never touched.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        start_batch: int = 0,
        pin_memory: bool = False,
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError("InfiniteBatches: the dataset is empty")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"InfiniteBatches: bad batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        if start_batch < 0:
            raise ValueError(f"InfiniteBatches: start_batch must be >= 0, got {start_batch}")
        self.dataset = dataset
        self.n = n
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.start_batch = start_batch
        self.salt = zlib.crc32(type(dataset).__name__.encode())
        self.repeats = max(1, math.ceil(batch_size * world_size / n))
        self.shard_len = math.ceil(n * self.repeats / world_size)
        self.batches_per_epoch = self.shard_len // batch_size
        self.next_batch = start_batch  # index of the batch the next ``next()`` returns
        self._iter: Iterator | None = None

    def epoch_indices(self, epoch: int) -> list[int]:
        """The global (all ranks) index list of ``epoch``, before sharding."""
        perms = [
            torch.randperm(self.n, generator=_generator(derive_seed(_PERM_TAG, self.seed, epoch, j)))
            for j in range(self.repeats)
        ]
        return torch.cat(perms).tolist()

    def shard(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's ``(index, sample_seed)`` list for ``epoch`` (before cutting into batches)."""
        indices = self.epoch_indices(epoch)
        total = self.shard_len * self.world_size
        indices = (indices * math.ceil(total / len(indices)))[:total]  # wrap-pad to equal shards
        mine = indices[self.rank : total : self.world_size]
        return [
            (idx, derive_seed(_SAMPLE_TAG, self.seed, self.salt, epoch, pos, self.rank))
            for pos, idx in enumerate(mine)
        ]

    def batch_keys(self, start: int = 0) -> Iterator[list[tuple[int, int]]]:
        """Endless ``(index, sample_seed)`` batches from global batch number ``start`` on."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            items = self.shard(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield items[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> InfiniteBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._iter is None:
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.batch_keys(self.start_batch),
                num_workers=self.num_workers,
                collate_fn=default_collate,
                pin_memory=self.pin_memory,
                # Its own generator: creating the loader must not consume the global torch RNG
                # (model init / dropout streams stay exact on resume).
                generator=_generator(derive_seed(_PERM_TAG, self.seed, self.salt, self.rank)),
            )
            self._iter = iter(loader)
        batch = next(self._iter)
        self.next_batch += 1
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes (if any); a later ``next()`` restarts where it stopped."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        self.start_batch = self.next_batch

    def __enter__(self) -> InfiniteBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def training_streams(
    splits: DataSplits,
    cfg: RunConfig,
    labeled_strong: bool,
    uses_unlabeled: bool,
    dist: DistInfo,
    start_batch: int = 0,
) -> tuple[InfiniteBatches, InfiniteBatches | None]:
    """A run's batch streams from batch ``start_batch``: labeled crops (with a strong view of them
    when ``labeled_strong``) seeded by ``cfg.seed``, and, when ``uses_unlabeled``, unlabeled views
    seeded by ``cfg.seed + 1``; each rank reads its own shard."""
    d, classes, channels = cfg.data, splits.num_classes, splits.in_channels
    labeled = InfiniteBatches(
        LabeledDataset(splits.labeled, d, classes, channels, with_strong=labeled_strong),
        batch_size=d.batch_size,
        seed=cfg.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=d.num_workers,
        start_batch=start_batch,
    )
    if not uses_unlabeled:
        return labeled, None
    if not splits.unlabeled:
        raise SemisegError(
            f"method.name={cfg.method.name}: needs unlabeled images but the unlabeled split is empty"
        )
    unlabeled = InfiniteBatches(
        UnlabeledDataset(splits.unlabeled, d, classes, channels),
        batch_size=d.unlabeled_batch_size,
        seed=cfg.seed + 1,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=d.num_workers,
        start_batch=start_batch,
    )
    return labeled, unlabeled


def make_batch(labeled: dict[str, Tensor], unlabeled: dict[str, Tensor] | None = None) -> Batch:
    """Assemble a :class:`~semiseg.methods.base.Batch` from collated labeled / unlabeled dicts."""
    x_ls = labeled.get("image_s")
    if unlabeled is None:
        return Batch(x_l=labeled["image"], y_l=labeled["label"], x_ls=x_ls)
    return Batch(
        x_l=labeled["image"],
        y_l=labeled["label"],
        x_ls=x_ls,
        x_w=unlabeled["x_w"],
        x_s1=unlabeled["x_s1"],
        x_s2=unlabeled["x_s2"],
        ignore=unlabeled["ignore"],
        box1=unlabeled["box1"],
        box2=unlabeled["box2"],
    )
