"""Segmentation data: ADE20K-layout directories and the built-in generated task.

Every dataset yields :class:`LabelledImage`: an RGB uint8 array [H, W, 3] and a label map
uint8 [H, W] of class indices ``0..C-1`` with :data:`IGNORE_INDEX` (255) for pixels that
count nowhere. An ADE20K-layout directory is
``<root>/images/{training,validation}/*.jpg`` with ``<root>/annotations/{training,validation}/*.png``
of the same names; its label 0 ("other") is ignored and the others shifted down by one
(mmseg's ``reduce_zero_label``), so ADE20K's 1..150 become classes 0..149.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.errors import DataError

IGNORE_INDEX = 255
SPLITS = ("training", "validation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg")
ANNOTATION_EXTENSION = ".png"

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag")


class LabelledImage(NamedTuple):
    image: np.ndarray  # [H, W, 3] uint8, RGB
    label: np.ndarray  # [H, W] uint8: class indices, IGNORE_INDEX
    name: str


# ---------------------------------------------------------------- ADE20K layout
def _listing(directory: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """stem -> file name of the files in ``directory`` with one of ``extensions``."""
    return {os.path.splitext(f)[0]: f for f in sorted(os.listdir(directory))
            if f.lower().endswith(extensions) and not f.startswith(".")}


class ADE20KFolder(Dataset):
    """One split of an ADE20K-layout directory. Folder layout and image/annotation pairing are
    checked here; each pair's sizes and label values when it is read (a :class:`DataError`
    naming the file)."""

    def __init__(self, root: str | os.PathLike, split: str, num_classes: int = len(ADE20K_CLASSES),
                 reduce_zero_label: bool = True) -> None:
        root = os.fspath(root)
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not an ADE20K split; accepted: {', '.join(SPLITS)}")
        layout = (f"images/{{{','.join(SPLITS)}}}/*.jpg and annotations/{{{','.join(SPLITS)}}}/*.png "
                  "(ADE20K's ADEChallengeData2016 layout)")
        if not os.path.isdir(root):
            raise DataError(f"segmentation data {root!r} is not a directory; expected a directory holding {layout}")
        self.image_dir = os.path.join(root, "images", split)
        self.label_dir = os.path.join(root, "annotations", split)
        for folder in (self.image_dir, self.label_dir):
            if not os.path.isdir(folder):
                raise DataError(f"{root} has no folder {os.path.relpath(folder, root)}; expected {layout}")
        images = _listing(self.image_dir, IMAGE_EXTENSIONS)
        labels = _listing(self.label_dir, (ANNOTATION_EXTENSION,))
        if not images:
            raise DataError(f"{self.image_dir} holds no .jpg images; expected {layout}")
        unpaired = [os.path.join(self.image_dir, images[s]) for s in images if s not in labels]
        unpaired += [os.path.join(self.label_dir, labels[s]) for s in labels if s not in images]
        if unpaired:
            raise DataError(f"{len(unpaired)} files have no partner: {unpaired[0]}"
                            f"{f' (and {len(unpaired) - 1} more)' if len(unpaired) > 1 else ''}; every "
                            f"images/{split}/NAME.jpg needs annotations/{split}/NAME.png and vice versa")
        self.names = sorted(images)
        self._images, self._labels = images, labels
        self.root, self.split = root, split
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        self.classes = (list(ADE20K_CLASSES) if num_classes == len(ADE20K_CLASSES)
                        else [f"class_{i}" for i in range(num_classes)])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> LabelledImage:
        name = self.names[index]
        image_path = os.path.join(self.image_dir, self._images[name])
        label_path = os.path.join(self.label_dir, self._labels[name])
        image = _read(image_path, "RGB")
        label = _read(label_path, None)
        if label.shape != image.shape[:2]:
            raise DataError(f"{label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                            f"{image.shape[1]}x{image.shape[0]}; an annotation must have its image's size")
        return LabelledImage(image, self._check_labels(label, label_path), name)

    def _check_labels(self, label: np.ndarray, path: str) -> np.ndarray:
        present = np.unique(label)
        first = 1 if self.reduce_zero_label else 0
        bad = [int(v) for v in present if v != IGNORE_INDEX and not first <= v < first + self.num_classes]
        if self.reduce_zero_label:
            bad = [v for v in bad if v != 0]
            accepted = f"0 (other, ignored), 1..{self.num_classes} (the classes) and {IGNORE_INDEX} (ignored)"
        else:
            accepted = f"0..{self.num_classes - 1} (the classes) and {IGNORE_INDEX} (ignored)"
        if bad:
            raise DataError(f"{path} holds label values {bad[:8]} outside the {self.num_classes} classes; "
                            f"accepted: {accepted}")
        if not self.reduce_zero_label:
            return label
        reduced = label.astype(np.int16) - 1  # 0 -> -1 -> ignored; 255 -> 254 -> ignored
        reduced[(reduced < 0) | (reduced == IGNORE_INDEX - 1)] = IGNORE_INDEX
        return reduced.astype(np.uint8)

    def describe(self) -> str:
        return f"ADE20K-layout data at {self.root} ({self.split}: {len(self)} images, {self.num_classes} classes)"


def _read(path: str, mode: str | None) -> np.ndarray:
    """An image as RGB [H, W, 3] (``mode="RGB"``) or a single-channel label PNG as [H, W]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if mode is None and im.mode not in ("L", "P", "I;16", "I"):
                raise DataError(f"{path} is a {im.mode} image; annotations must be single-channel PNGs of "
                                "class indices (mode L or P)")
            array = np.asarray(im.convert(mode) if mode else im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot read {path}: {exc}") from None
    if mode is None and (array.min() < 0 or array.max() > IGNORE_INDEX):
        raise DataError(f"{path} holds label values up to {int(array.max())}; label values must be 0..{IGNORE_INDEX}")
    return array.astype(np.uint8)


# ---------------------------------------------------------------- the built-in task
BUILTIN_CLASSES = ("background", "disc", "square", "triangle")
BUILTIN_SIZE = 128
_BUILTIN_SPLITS = {"training": (512, 0), "validation": (64, 1)}  # name: (images, seed)


class GeneratedShapes(Dataset):
    """Discs, squares and triangles on striped grey backgrounds; the label is the shape's class
    (0 background). Each shape is striped in a hue of its class (red, green or blue, +-40
    degrees) with random stripes, brightness and pixel noise, so colour and outline both tell
    the classes apart. Each image comes from its own seed (split and index): a split is the
    same in every process and run."""

    classes = list(BUILTIN_CLASSES)
    num_classes = len(BUILTIN_CLASSES)

    def __init__(self, split: str, size: int = BUILTIN_SIZE, num_images: int | None = None) -> None:
        if split not in _BUILTIN_SPLITS:
            raise DataError(f"split {split!r} is not a split of the built-in data; accepted: {', '.join(_BUILTIN_SPLITS)}")
        count, self.seed = _BUILTIN_SPLITS[split]
        self.split, self.size, self.num_images = split, size, count if num_images is None else num_images
        coords = torch.arange(size, dtype=torch.float32) + 0.5
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.num_images

    def _texture(self, g: torch.Generator, kind: int) -> torch.Tensor:
        """Stripes between two colours: greys for the background (kind 0), else two shades of
        the class's hue."""
        u = torch.rand(7, generator=g)
        angle, freq, phase = math.pi * float(u[0]), 0.15 + 0.5 * float(u[1]), 2 * math.pi * float(u[2])
        stripes = 0.5 + 0.5 * torch.sin(freq * (self._xx * math.cos(angle) + self._yy * math.sin(angle)) + phase)
        if kind == 0:
            low, high = 0.2 + 0.3 * u[3] + 0.05 * u[4:7], 0.5 + 0.4 * u[3] + 0.05 * u[4:7]
        else:
            hue = (kind - 1) / 3 + (float(u[3]) - 0.5) * 2 / 9  # +-40 degrees around red, green, blue
            channel = torch.tensor([0.0, 1 / 3, 2 / 3])
            distance = ((channel - hue + 0.5) % 1.0 - 0.5).abs()  # how far each primary is from the hue
            colour = (1 - 3 * distance).clamp(min=0.0)
            low, high = (0.3 + 0.2 * u[4]) * colour, (0.7 + 0.3 * u[5]) * colour
        return low.view(3, 1, 1) + (high - low).view(3, 1, 1) * stripes

    def _shape_mask(self, kind: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(4, generator=g)
        radius = self.size * (0.12 + 0.12 * float(u[0]))
        cy, cx = (radius + (self.size - 2 * radius) * u[1:3]).tolist()
        dy, dx = self._yy - cy, self._xx - cx
        if kind == 1:  # disc
            return dy ** 2 + dx ** 2 <= radius ** 2
        turn = 2 * math.pi * float(u[3])
        ry = dy * math.cos(turn) - dx * math.sin(turn)
        rx = dy * math.sin(turn) + dx * math.cos(turn)
        if kind == 2:  # square, rotated
            return (ry.abs() <= radius * 0.8) & (rx.abs() <= radius * 0.8)
        # triangle, rotated: inside all three edges of an equilateral triangle
        edges = [ry * math.cos(a) + rx * math.sin(a) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        return torch.stack(edges).amax(0) <= radius * 0.5

    def __getitem__(self, index: int) -> LabelledImage:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = self._texture(g, 0)
        label = torch.zeros(self.size, self.size, dtype=torch.uint8)
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            kind = int(torch.randint(1, len(BUILTIN_CLASSES), (), generator=g))
            mask = self._shape_mask(kind, g)
            image = torch.where(mask, self._texture(g, kind), image)
            label[mask] = kind
        image = image + 0.05 * torch.randn(image.shape, generator=g)
        pixels = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return LabelledImage(pixels, label.numpy(), f"{self.split}_{index:05d}")

    def describe(self) -> str:
        return (f"built-in segmentation data: {', '.join(BUILTIN_CLASSES)} ({self.num_classes} classes), "
                f"{self.size} px, {self.split} {len(self)} images")


def open_split(data: str | os.PathLike | None, split: str, num_classes: int | None = None,
               reduce_zero_label: bool = True, size: int = BUILTIN_SIZE) -> Dataset:
    """``split`` of the built-in task (``data=None``) or of an ADE20K-layout directory."""
    if data is None:
        if num_classes not in (None, len(BUILTIN_CLASSES)):
            raise DataError(f"the built-in data has {len(BUILTIN_CLASSES)} classes, not num_classes={num_classes}")
        return GeneratedShapes(split, size)
    return ADE20KFolder(data, split, len(ADE20K_CLASSES) if num_classes is None else num_classes, reduce_zero_label)
