"""Sliding-window inference (mmseg's ``slide`` test mode), multi-scale + flip, and mIoU / mAcc / aAcc."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .model import SegmentationModel, resize
from .transforms import IMAGENET_MEAN, IMAGENET_STD, normalise, rescale

# mmseg's ADE20K test-time augmentation ratios of the test scale (VPT's multi-scale numbers).
MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's slide grid: (top, bottom, left, right) of crop-sized windows ``stride`` apart, the
    last row and column shifted back inside the image; one window per side shorter than ``crop``."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            bottom, right = min(r * stride + crop, height), min(c * stride + crop, width)
            out.append((max(bottom - crop, 0), bottom, max(right - crop, 0), right))
    return out


@torch.no_grad()
def slide_logits(model: SegmentationModel, image: torch.Tensor, crop: int, stride: int,
                 window_batch: int = 8) -> torch.Tensor:
    """Logits [1, C, H, W] of a normalised image [1, 3, H, W]: the mean over the windows that
    cover each pixel. Windows at the border smaller than ``crop`` are padded bottom/right with
    0 (the model always sees ``crop`` x ``crop``) and their padded logits dropped."""
    _, _, height, width = image.shape
    total = image.new_zeros(1, model.num_classes, height, width, dtype=torch.float32)
    count = image.new_zeros(1, 1, height, width, dtype=torch.float32)
    boxes = windows(height, width, crop, stride)
    for start in range(0, len(boxes), window_batch):
        chunk = boxes[start:start + window_batch]
        crops = torch.cat([F.pad(image[:, :, t:b, l:r], (0, crop - (r - l), 0, crop - (b - t))) for t, b, l, r in chunk])
        logits = model.predict(crops)
        for (t, b, l, r), out in zip(chunk, logits):
            total[:, :, t:b, l:r] += out[:, : b - t, : r - l]
            count[:, :, t:b, l:r] += 1
    return total / count


@dataclass(frozen=True)
class TestPipeline:
    crop: int = 512
    stride: int = 341
    scale: tuple[int, int] = (2048, 512)
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @torch.no_grad()
    def predict(self, model: SegmentationModel, image: np.ndarray, device: torch.device, autocast) -> torch.Tensor:
        """Class indices [H, W] of a uint8 image [H, W, 3]: for each ratio, the image resized
        keeping its aspect to ``ratio`` x ``scale``, slide inference (and its mirror image with
        ``flip``), softmax probabilities resized to the image's size and averaged."""
        height, width = image.shape[:2]
        total = None
        for ratio in self.ratios:
            resized, _ = rescale(image, None, (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
            x = normalise(resized, self.mean, self.std)[None].to(device)
            for mirrored in (False, True) if self.flip else (False,):
                with autocast():
                    logits = slide_logits(model, x.flip(-1) if mirrored else x, self.crop, self.stride)
                logits = logits.flip(-1) if mirrored else logits
                probs = resize(logits, (height, width)).softmax(1)
                total = probs if total is None else total + probs
        return total[0].argmax(0)


class ConfusionMatrix:
    """Pixel counts [label, prediction] over the labelled pixels (label != 255)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        label = label.to(self.counts.device, torch.int64)
        prediction = prediction.to(self.counts.device, torch.int64)
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        valid = label != IGNORE_INDEX
        pairs = label[valid] * self.num_classes + prediction[valid]
        self.counts += torch.bincount(pairs, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def metrics(self, classes: list[str] | None = None) -> dict:
        """mmseg's IoUMetric: per class IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN); mIoU and
        mAcc their means over the classes where they are defined (NaN-mean); aAcc = all TP / all
        labelled pixels. Fractions in [0, 1]."""
        counts = self.counts.double().cpu()
        hits, labelled, predicted = counts.diag(), counts.sum(1), counts.sum(0)
        iou = hits / (labelled + predicted - hits)  # 0 / 0 = NaN: a class neither present nor predicted
        acc = hits / labelled
        names = classes or [str(i) for i in range(self.num_classes)]
        return {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc),
                "aAcc": (hits.sum() / labelled.sum()).item() if labelled.sum() > 0 else math.nan,
                "labelled_pixels": int(labelled.sum()),
                "per_class": {n: {"IoU": _number(i), "Acc": _number(a)} for n, i, a in zip(names, iou, acc)}}


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return defined.mean().item() if len(defined) else math.nan


def _number(value: torch.Tensor) -> float | None:
    return None if value.isnan() else value.item()  # JSON has no NaN
