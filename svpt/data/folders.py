"""Images on disk: VTAB-1k list directories and image folders."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .source import DataSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


# ---------------------------------------------------------------- reading one image
def load_image(path: str, size: int, resize: str = "squash") -> torch.Tensor:
    """``path`` as a uint8 tensor [3, size, size]. ``resize="squash"`` scales both sides to
    ``size`` (the VTAB-1k convention); ``"crop"`` scales the shorter side to ``size`` and
    takes the centre square."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale when that is still >= size
            im = im.convert("RGB")
            if resize == "crop":
                scale = size / min(im.size)
                w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
                im = im.resize((w, h), Image.BICUBIC)
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            else:
                im = im.resize((size, size), Image.BICUBIC)
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageListDataset(Dataset):
    """(path, label) pairs read with :func:`load_image`."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, resize: str):
        self.samples, self.size, self.resize = list(samples), size, resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return load_image(path, self.size, self.resize), label


def _check_files_exist(samples, where: str) -> None:
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} of {len(samples)} images listed in {where} do not exist, "
                        f"e.g. {', '.join(missing[:3])}")


# ---------------------------------------------------------------- VTAB-1k lists
def is_vtab_dir(root: str) -> bool:
    return any(os.path.isfile(os.path.join(root, f"{name}.txt")) for name in VTAB_SPLITS)


def read_list(path: str, root: str) -> list[tuple[str, int]]:
    """The "relative/path label" lines of a VTAB-1k list file (paths relative to ``root``)."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)  # the path may contain spaces, the label does not
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}:{number}: {line!r} is not a 'relative/path label' line "
                                "(label: a non-negative integer)")
            samples.append((os.path.join(root, parts[0]), int(parts[1])))
    if not samples:
        raise DataError(f"{path} lists no images")
    return samples


class VtabSource(DataSource):
    kind = "VTAB-1k list"
    default_train_split = "train800val200"  # the papers' final protocol: train on 1000, report on test
    default_eval_split = "test"

    def __init__(self, root: str):
        self.root = root
        self._lists = {name: os.path.join(root, f"{name}.txt") for name in VTAB_SPLITS
                       if os.path.isfile(os.path.join(root, f"{name}.txt"))}
        self._samples: dict[str, list[tuple[str, int]]] = {}
        labels = {label for name in self._lists for _, label in self._read(name)}
        self.classes = [str(i) for i in range(max(labels) + 1)]  # VTAB labels are 0..C-1

    @property
    def splits(self):
        return list(self._lists)

    def check_split(self, split: str, option: str = "split") -> str:
        if split in VTAB_SPLITS and split not in self._lists:
            raise DataError(f"{option} {split!r}: {self._lists.get(split) or os.path.join(self.root, split + '.txt')} "
                            f"does not exist; splits present in {self.root}: {', '.join(self.splits)}")
        if split not in VTAB_SPLITS:
            raise DataError(f"{option} {split!r} is not a VTAB-1k split; accepted: {', '.join(VTAB_SPLITS)} "
                            f"(present in {self.root}: {', '.join(self.splits)})")
        return split

    def _read(self, name: str) -> list[tuple[str, int]]:
        if name not in self._samples:
            self._samples[name] = read_list(self._lists[name], self.root)
        return self._samples[name]

    def _dataset(self, split: str, size: int) -> Dataset:
        samples = self._read(split)
        _check_files_exist(samples, self._lists[split])
        return ImageListDataset(samples, size, resize="squash")


# ---------------------------------------------------------------- image folders
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(path: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return found


def _scan_classes(root: str) -> dict[str, list[str]]:
    """{class name: image paths} of a folder with one sub-folder per class."""
    stray = [f for f in sorted(os.listdir(root)) if _is_image(f)]
    if stray:
        raise DataError(f"{root} holds images directly ({', '.join(stray[:3])}); an image folder holds one "
                        "sub-folder per class")
    classes = {name: _images_under(os.path.join(root, name)) for name in _subdirs(root)}
    if not classes:
        raise DataError(f"{root} has no class sub-folders; an image folder is <root>/<class>/<image> or "
                        "<root>/<split>/<class>/<image> (with <root>/train)")
    empty = [name for name, paths in classes.items() if not paths]
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty[:5])} in {root} hold no images "
                        f"(accepted extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return classes


class ImageFolderSource(DataSource):
    """``<root>/<class>/*`` (``train`` and ``val`` splits: ``val_fraction`` of each class held
    out, the same files every run) or ``<root>/<split>/<class>/*`` (every sub-folder a split)."""

    kind = "image-folder"
    default_train_split = "train"

    def __init__(self, root: str, val_fraction: float = 0.1):
        self.root = root
        train_dir = os.path.join(root, "train")
        self.has_split_folders = os.path.isdir(train_dir) and any(
            _images_under(os.path.join(train_dir, d))[:1] for d in _subdirs(train_dir))
        if self.has_split_folders:
            self._split_dirs = {name: os.path.join(root, name) for name in _subdirs(root)}
            self.classes = list(_scan_classes(train_dir))
        else:
            if not 0 < val_fraction < 1:
                raise DataError(f"val_fraction={val_fraction} is not accepted; it must be in (0, 1)")
            scanned = _scan_classes(root)
            self._held_out = self._hold_out(scanned, val_fraction)
            self.classes = list(scanned)
        self.default_eval_split = next((s for s in ("val", "validation", "test") if s in self.splits), "")

    @staticmethod
    def _hold_out(classes: dict[str, list[str]], fraction: float) -> dict[str, list[tuple[str, str]]]:
        g = torch.Generator().manual_seed(0)  # fixed: the same files are held out in every run
        splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
        for name, paths in classes.items():
            order = torch.randperm(len(paths), generator=g).tolist()
            n_val = max(1, round(fraction * len(paths))) if len(paths) >= 2 else 0
            splits["val"] += [(paths[i], name) for i in sorted(order[:n_val])]
            splits["train"] += [(paths[i], name) for i in sorted(order[n_val:])]
        return splits

    @property
    def splits(self):
        return list(self._split_dirs) if self.has_split_folders else ["train", "val"]

    def _labelled(self, split: str) -> list[tuple[str, int]]:
        if self.has_split_folders:
            found = _scan_classes(self._split_dirs[split])
            unknown = sorted(set(found) - set(self.classes))
            if unknown:
                raise DataError(f"split {split!r} has class folders that train does not have: "
                                f"{', '.join(unknown[:5])}; classes (from {os.path.join(self.root, 'train')}): "
                                f"{', '.join(self.classes[:10])}{' ...' if len(self.classes) > 10 else ''}")
            pairs = [(path, name) for name, paths in found.items() for path in paths]
        else:
            pairs = self._held_out[split]
        index = {name: i for i, name in enumerate(self.classes)}
        return [(path, index[name]) for path, name in pairs]

    def _dataset(self, split: str, size: int) -> Dataset:
        samples = self._labelled(split)
        if not samples:
            raise DataError(f"split {split!r} of {self.root} is empty")
        return ImageListDataset(samples, size, resize="crop")
