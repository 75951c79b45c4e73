"""Training augmentation, defined on uint8 tensors so that the DataLoader path (per image,
in the workers) and the device-resident path (per image, on the training device) run the
same code and draw the same random numbers.

An augmented training image is read once at ``margin_size(S)`` on its shorter side (its
aspect kept) and each epoch cut to S x S:

* ``crop-flip``: a random S x S crop and a horizontal flip with probability 1/2: VPT's
  FGVC training transform (``Resize(256)``, ``RandomCrop(224)``, ``RandomHorizontalFlip``);
* ``resized-crop-flip``: a random crop of 8%..100% of the area with aspect ratio 3/4..4/3
  (the usual ``RandomResizedCrop`` draw, 10 tries, then a centre crop), resized to S x S
  (bilinear, antialiased), and the same flip.

``none`` trains on the evaluation images as they are (VTAB-1k's convention).
The random numbers of image ``index`` in ``epoch`` come from a generator seeded with
(seed, epoch, index): a resumed run and every process layout see the same crops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop-flip", "resized-crop-flip")
_SCALE, _RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def margin_size(size: int) -> int:
    """The shorter side an image is read at before an S x S crop: 256 for 224, as VPT."""
    return size * 8 // 7


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % 2**63)


def _flip(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return image.flip(-1) if torch.rand((), generator=g) < 0.5 else image


def _random_crop(image: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    h, w = image.shape[-2:]
    top = int(torch.randint(h - size + 1, (), generator=g))
    left = int(torch.randint(w - size + 1, (), generator=g))
    return image[:, top:top + size, left:left + size]


def _resized_crop_box(h: int, w: int, g: torch.Generator) -> tuple[int, int, int, int]:
    area = h * w
    log_ratio = (math.log(_RATIO[0]), math.log(_RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=g).tolist()
        target = area * (_SCALE[0] + u[0] * (_SCALE[1] - _SCALE[0]))
        ratio = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    ratio = min(max(w / h, _RATIO[0]), _RATIO[1])  # no draw fitted: the centre crop of that ratio
    cw, ch = (w, round(w / ratio)) if w / h < ratio else (round(h * ratio), h)
    ch, cw = min(ch, h), min(cw, w)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _resized_crop(image: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    top, left, ch, cw = _resized_crop_box(*image.shape[-2:], g)
    crop = image[None, :, top:top + ch, left:left + cw].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)


class Augmenter:
    """``augment`` of a stored uint8 image [3, h, w] into [3, size, size]."""

    def __init__(self, augment: str, size: int, seed: int):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augmentation {augment!r} is not accepted; accepted: {', '.join(AUGMENTATIONS)}")
        self.augment, self.size, self.seed = augment, size, seed

    @property
    def active(self) -> bool:
        return self.augment != "none"

    def __call__(self, image: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        if not self.active:
            return image
        g = sample_generator(self.seed, epoch, index)
        crop = _random_crop if self.augment == "crop-flip" else _resized_crop
        return _flip(crop(image, self.size, g), g).contiguous()
