"""Where a run's batches come from.

Data that fits is decoded once, before the first epoch, and kept on the training device
(uint8): each step gathers its batch there (and augments it there, image by image), so
there is no loader, no decoding and no host-to-device copy after start-up. Data that does
not fit goes through a DataLoader as before. Both paths draw the same batches (the same
``DistributedSampler`` permutation) and the same augmentation (the same generator per
image and epoch), so a run's numbers do not depend on which path it took.
"""
from __future__ import annotations

import math
import os
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from ..data import Augmenter
from .distributed import Dist, ShardSampler

RESIDENT_SHARE = 0.4  # of the free device memory (CUDA) or available RAM (CPU) that data may take
DEVICE_DATA = ("auto", "always", "never")
Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images [B, 3, S, S], int64 labels [B]


# ---------------------------------------------------------------- memory
def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device) -> int:
    """Bytes of decoded images a run may keep on ``device``."""
    if device.type == "cuda":
        return int(RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0])
    return int(RESIDENT_SHARE * _available_ram())


def default_workers(ctx: Dist) -> int:
    if ctx.device.type != "cuda":
        return 0  # on a CPU the loader would compete with the training for the same cores
    # ViT-B/16 SVPT steps at ~2900 img/s on an H200; decoding 500x375 JPEGs gives ~280 img/s per
    # worker (benchmarks/results/loader_throughput_h200.txt): keep up with ~11+ workers.
    return max(1, min(16, (os.cpu_count() or 2) // ctx.world - 1))


def make_loader(ds: Dataset, batch: int, sampler, workers: int, ctx: Dist, seed: int,
                persistent: bool = True) -> DataLoader:
    extra = dict(persistent_workers=persistent, prefetch_factor=4) if workers > 0 else {}
    # Its own generator: creating an epoch's iterator must not draw from the global RNG
    # (prompt dropout's), or a resumed run would see other random numbers.
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", drop_last=False,
                      generator=torch.Generator().manual_seed(seed), **extra)


# ---------------------------------------------------------------- device-resident images
def _as_list(items):
    return items


class ResidentImages:
    """A dataset decoded once and kept on the training device: one uint8 tensor [N, 3, H, W]
    when all images have one size, else one tensor per image (augmented training data,
    stored with its aspect)."""

    def __init__(self, images: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, decode_s: float):
        self.images, self.labels, self.decode_s = images, labels, decode_s

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        images = [self.images] if isinstance(self.images, torch.Tensor) else self.images
        return sum(t.numel() for t in images)

    def take(self, indices: list[int], where: torch.Tensor, epoch: int, augmenter: Augmenter) -> Batch:
        """The images ``indices`` (``where``: the same, int64 on the device), augmented."""
        if augmenter.active or isinstance(self.images, list):
            images = torch.stack([augmenter(self.images[i], epoch, i) for i in indices])
        else:
            images = self.images[where]
        return images, self.labels[where]

    def slice(self, start: int, stop: int) -> Batch:
        images = self.images[start:stop]
        return images if isinstance(images, torch.Tensor) else torch.stack(images), self.labels[start:stop]

    @classmethod
    def decode(cls, ds: Dataset, device: torch.device, workers: int, budget: int | None) -> "ResidentImages | None":
        """``ds`` decoded onto ``device``, or None when it would take more than ``budget``
        bytes (None: no limit); decoding stops as soon as that is known."""
        start = time.perf_counter()
        if budget is not None and ds[0][0].numel() * len(ds) > budget:
            return None
        # Its own generator: the global RNG (prompt dropout's) must not see whether data was decoded here.
        loader = DataLoader(ds, batch_size=64, num_workers=workers, collate_fn=_as_list, generator=torch.Generator())
        images, labels, total = [], [], 0
        for batch in loader:
            for image, label in batch:
                total += image.numel()
                if budget is not None and total > budget:
                    return None
                images.append(image.clone())  # own memory: a worker's shared tensor keeps a file descriptor open
                labels.append(label)
        if all(im.shape == images[0].shape for im in images):
            store: torch.Tensor | list[torch.Tensor] = torch.stack(images).to(device)
        else:
            store = [im.to(device) for im in images]
        return cls(store, torch.tensor(labels, dtype=torch.int64, device=device), time.perf_counter() - start)


# ---------------------------------------------------------------- training batches
class _EpochTagged(Sampler):
    """Yields (index, epoch): the augmentation of a loader worker needs both."""

    def __init__(self, inner: DistributedSampler):
        self.inner, self.epoch = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((i, epoch) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class _Augmented(Dataset):
    def __init__(self, ds: Dataset, augmenter: Augmenter):
        self.ds, self.augmenter = ds, augmenter

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        image, label = self.ds[index]
        return self.augmenter(image, epoch, index), label


class TrainBatches:
    """One epoch's batches of this process: ``epoch(e)`` iterates them."""

    def __init__(self, ds: Dataset, sampler: DistributedSampler, batch: int, augmenter: Augmenter,
                 resident: ResidentImages | None, workers: int, ctx: Dist, seed: int):
        self.sampler, self.batch, self.augmenter, self.resident = sampler, batch, augmenter, resident
        self.loader = None
        if resident is None:
            if augmenter.active:
                ds, sampler = _Augmented(ds, augmenter), _EpochTagged(sampler)
            self.loader_sampler = sampler
            self.loader = make_loader(ds, batch, sampler, workers, ctx, seed)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.loader is not None:
            self.loader_sampler.set_epoch(epoch)
            return iter(self.loader)
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        # One copy of the epoch's order to the device; a copy per step would stall the stream.
        where = torch.tensor(order, dtype=torch.int64).to(self.resident.labels.device, non_blocking=True)
        return (self.resident.take(order[i:i + self.batch], where[i:i + self.batch], epoch, self.augmenter)
                for i in range(0, len(order), self.batch))


class EvalBatches:
    """This process's shard of an evaluation split, in batches; iterable any number of times."""

    def __init__(self, ds: Dataset, batch: int, resident: ResidentImages | None, workers: int, ctx: Dist,
                 persistent: bool):
        self.batch, self.resident, self.workers = batch, resident, workers
        self.loader = None if resident is not None else make_loader(
            ds, batch, ShardSampler(len(ds), ctx.rank, ctx.world), workers, ctx, 0, persistent)
        self.started: Iterator[Batch] | None = None

    def start(self) -> None:
        """Let the loader's workers decode ahead, while the training runs: the next iteration
        takes their batches. They decode at most the loader's prefetch (workers x 4 batches)
        ahead, as during any evaluation."""
        if self.loader is not None and self.workers > 0 and self.started is None:
            self.started = iter(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.started is not None:
            started, self.started = self.started, None
            return started
        if self.loader is not None:
            return iter(self.loader)
        n = len(self.resident)
        return (self.resident.slice(i, min(i + self.batch, n)) for i in range(0, n, self.batch))


def shard(ds: Dataset, ctx: Dist) -> Dataset:
    """This process's evaluation images (ShardSampler's indices)."""
    return ds if ctx.world == 1 else Subset(ds, list(range(ctx.rank, len(ds), ctx.world)))


def describe(name: str, ds: Dataset, resident: ResidentImages | None, workers: int, ctx: Dist) -> str:
    if resident is not None:
        return (f"{name}: {len(ds)} images decoded once in {resident.decode_s:.1f} s, kept on {ctx.device} "
                f"({resident.nbytes / 2**20:.0f} MiB uint8)")
    return f"{name}: {len(ds)} images through a DataLoader with {workers} workers"
