"""The built-in task: noisy stripes, labelled by their orientation (0, 45, 90, 135 degrees).

Each image is generated from its own seed (split seed and index), so a split is the same
set of images in every process, worker and run: per-epoch evaluation is on a fixed
held-out set and ``--resume`` replays exactly. Frequency, phase, colour, a small angle
jitter and pixel noise vary per image, so no single pixel or patch gives the class away.

Splits as VTAB-1k has them: ``train`` (1792) and ``val`` (256) for a tuning run,
``train+val`` (2048) and ``test`` (512) for the final run.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from .source import DataSource, Resize

NATIVE_SIZE = 32
CLASSES = ["0deg", "45deg", "90deg", "135deg"]
_SPLITS = {"train": (0, 1792, 0), "val": (1792, 256, 0), "test": (0, 512, 1)}  # name: (first index, images, seed)


class GeneratedStripes(Dataset):
    """Images ``start .. start + num_images - 1`` of the stream ``seed``, generated at
    ``size`` x ``size`` (the same pattern at any size), then centre-cropped to ``crop``."""

    def __init__(self, num_images: int, seed: int, size: int = NATIVE_SIZE, start: int = 0, crop: int | None = None):
        self.num_images, self.seed, self.size, self.start, self.crop = num_images, seed, size, start, crop
        coords = torch.arange(size, dtype=torch.float32) * (NATIVE_SIZE / size)
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.start + index)
        label = int(torch.randint(len(CLASSES), (), generator=g))
        u = torch.rand(6, generator=g)
        angle = label * math.pi / len(CLASSES) + 0.15 * (float(u[0]) - 0.5)
        freq, phase = 0.4 + 0.4 * float(u[1]), 2 * math.pi * float(u[2])
        colour = 0.3 + 0.7 * u[3:6].view(3, 1, 1)
        proj = self._xx * math.cos(angle) + self._yy * math.sin(angle)
        stripes = 0.5 + 0.5 * torch.sin(freq * proj + phase)
        image = colour * stripes + 0.1 * torch.randn(3, self.size, self.size, generator=g)
        image = image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        if self.crop is not None:
            top = (self.size - self.crop) // 2
            image = image[:, top:top + self.crop, top:top + self.crop].contiguous()
        return image, label


class BuiltinSource(DataSource):
    kind = "built-in"
    classes = CLASSES
    native_size = NATIVE_SIZE
    tune_splits = ("train", "val")
    final_splits = ("train+val", "test")
    test_split = "test"

    @property
    def base_splits(self):
        return list(_SPLITS)

    def _dataset(self, split: str, resize: Resize) -> Dataset:
        start, num_images, seed = _SPLITS[split]
        return GeneratedStripes(num_images, seed, resize.size, start, resize.crop)  # square: squash = shorter

    def describe(self) -> str:
        sizes = ", ".join(f"{name} {n}" for name, (_, n, _) in _SPLITS.items())
        return f"built-in data: stripe orientation, {len(CLASSES)} classes, {NATIVE_SIZE} px, {sizes} images"
