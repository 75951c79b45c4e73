"""mmseg's ADE20K pipelines, on numpy arrays with an explicit random generator.

Training (mmseg ``configs/_base_/datasets/ade20k.py``): ``RandomResize(scale, ratio_range,
keep_ratio=True)``, ``RandomCrop(crop, cat_max_ratio=0.75)``, ``RandomFlip(0.5)``,
``PhotoMetricDistortion()``, then the data preprocessor's normalisation (ImageNet mean/std
on 0..255) and padding to the crop size (image 0 after normalisation, label 255). Testing:
``Resize(scale, keep_ratio=True)`` and normalisation. Resizing is bilinear without
antialiasing for images (OpenCV's ``INTER_LINEAR``, what mmcv uses) and nearest for labels.
The hue and saturation steps work in PIL's HSV (hue on 0..255, mmseg's 180-step hue delta
scaled to it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class TrainPipeline:
    crop: int = 512
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """(normalised image [3, crop, crop] float32, label [crop, crop] int64)."""
        ratio = rng.uniform(*self.ratio_range)
        image, label = rescale(image, label, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, label = random_crop(image, label, self.crop, self.cat_max_ratio, rng)
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        return pad(normalise(image, self.mean, self.std), torch.from_numpy(label.astype(np.int64)), self.crop)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rule: the largest size whose long side fits max(scale) and short side
    min(scale); sides rounded half up."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] to (width, height), bilinear (half-pixel centres, no antialiasing)."""
    if (image.shape[1], image.shape[0]) == size:
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (label.shape[1], label.shape[0]) == size:
        return label
    x = torch.from_numpy(np.ascontiguousarray(label))[None, None].float()
    return F.interpolate(x, size=(size[1], size[0]), mode="nearest")[0, 0].to(torch.uint8).numpy()


def rescale(image: np.ndarray, label: np.ndarray | None, scale: tuple[int, int]):
    size = rescale_size(image.shape[1], image.shape[0], scale)
    return resize_image(image, size), None if label is None else resize_label(label, size)


def random_crop(image: np.ndarray, label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator):
    """mmseg's RandomCrop: up to 10 draws until no class covers ``cat_max_ratio`` or more of the
    crop's labelled pixels (and at least two classes are in it); the last draw otherwise."""
    def draw() -> tuple[int, int]:
        return (int(rng.integers(0, max(image.shape[0] - crop, 0) + 1)),
                int(rng.integers(0, max(image.shape[1] - crop, 0) + 1)))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            values, counts = np.unique(label[top:top + crop, left:left + crop], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return image[top:top + crop, left:left + crop], label[top:top + crop, left:left + crop]


def _convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: random brightness, contrast (before or after the colour
    steps), saturation and hue, each applied with probability 1/2."""
    from PIL import Image

    def contrast(img):
        return _convert(img, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else img

    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
        image = contrast(image)
    saturate, saturation = rng.integers(2), rng.uniform(*saturation_range)
    shift_hue, hue = rng.integers(2), int(rng.integers(-hue_delta, hue_delta))
    if saturate or shift_hue:
        hsv = np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("HSV")).copy()
        if saturate:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=saturation)
        if shift_hue:  # mmseg's hue is OpenCV's (180 steps a turn); PIL's has 256
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + round(hue * 256 / 180)) % 256
        image = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first:
        image = contrast(image)
    return image


def normalise(image: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W], ``(x - mean) / std`` per channel."""
    x = torch.from_numpy(image.copy()).permute(2, 0, 1).float()  # a copy: PIL arrays are read-only, flips negative
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def pad(image: torch.Tensor, label: torch.Tensor, size: int):
    """Pad bottom and right to ``size`` x ``size``: image with 0, label with the ignore index."""
    bottom, right = size - image.shape[1], size - image.shape[2]
    if bottom or right:
        image = F.pad(image, (0, right, 0, bottom), value=0.0)
        label = F.pad(label, (0, right, 0, bottom), value=IGNORE_INDEX)
    return image, label
