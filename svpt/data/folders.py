"""Images on disk: VTAB-1k list directories and image folders."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .source import UNION, DataSource, Resize, dir_name, split_files, task_of
from .tasks import VTAB_TASKS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


# ---------------------------------------------------------------- reading one image
def load_image(path: str, resize: Resize) -> torch.Tensor:
    """``path`` as a uint8 tensor [3, H, W], brought to its stored size as ``resize`` says
    (bicubic)."""
    from PIL import Image

    size = resize.size
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4, 1/8 scale when that is still >= size
            im = im.convert("RGB")
            if resize.mode == "shorter":
                scale = size / min(im.size)
                im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
            else:
                im = im.resize((size, size), Image.BICUBIC)
            if resize.crop is not None:
                left, top = (im.width - resize.crop) // 2, (im.height - resize.crop) // 2
                im = im.crop((left, top, left + resize.crop, top + resize.crop))
            array = np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageListDataset(Dataset):
    """(path, label) pairs read with :func:`load_image`."""

    def __init__(self, samples: Sequence[tuple[str, int]], resize: Resize):
        self.samples, self.resize = list(samples), resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return load_image(path, self.resize), label


def check_files_exist(samples: Sequence[tuple[str, int]], where: str) -> None:
    missing = [path for path, _ in samples if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} of {len(samples)} images listed in {where} do not exist, "
                        f"e.g. {', '.join(missing[:3])}")


# ---------------------------------------------------------------- VTAB-1k lists
def is_vtab_dir(root: str) -> bool:
    return bool(split_files(root, VTAB_SPLITS, ".txt"))


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
    """A VTAB-1k task: ``train800.txt`` and ``val200.txt`` (a tuning run), ``train800val200.txt``
    and ``test.txt`` (the final run). The number of classes is the task's (by directory
    name, e.g. ``cifar``: 100) or, for another name, the largest training label + 1."""

    kind = "VTAB-1k list"
    tune_splits = ("train800", "val200")
    final_splits = ("train800val200", "test")
    test_split = "test"

    def __init__(self, root: str):
        self.root = root
        self.task = task_of(VTAB_TASKS, root)
        self._lists = split_files(root, VTAB_SPLITS, ".txt")
        self._samples: dict[str, list[tuple[str, int]]] = {}
        self._classes_from = self._class_count_lists()
        count = self.task.num_classes if self.task else 1 + max(
            label for name in self._classes_from for _, label in read_list(self._lists[name], root))
        self.classes = [str(i) for i in range(count)]  # VTAB labels are 0..C-1

    def _class_count_lists(self) -> list[str]:
        if self.task:
            return []
        # Never the test list: a tuning run must not read it, and both runs need the same head.
        found = ["train800val200"] if "train800val200" in self._lists else \
            [name for name in ("train800", "val200") if name in self._lists]
        if not found:
            raise DataError(f"{self.root}: {dir_name(self.root)!r} is not a VTAB-1k task "
                            "name, so its number of classes comes from the training lists, and it has none "
                            f"(train800val200.txt, or train800.txt / val200.txt); present: "
                            f"{', '.join(os.path.basename(p) for p in self._lists.values())}")
        return found

    @property
    def base_splits(self):
        return list(self._lists)

    def parts(self, split: str) -> frozenset[str]:
        return frozenset(("train800", "val200")) if split == "train800val200" else frozenset((split,))

    def check_split(self, split: str, option: str = "split") -> str:
        if split in VTAB_SPLITS and split not in self._lists:
            raise DataError(f"{option} {split!r}: {os.path.join(self.root, split + '.txt')} does not exist; "
                            f"splits present in {self.root}: {', '.join(self.splits)}")
        if split not in VTAB_SPLITS:
            raise DataError(f"{option} {split!r} is not a VTAB-1k split; accepted: {', '.join(VTAB_SPLITS)} "
                            f"(present in {self.root}: {', '.join(self.splits)})")
        return split

    def _read(self, name: str) -> list[tuple[str, int]]:
        if name not in self._samples:
            samples = read_list(self._lists[name], self.root)
            wrong = next(((path, label) for path, label in samples if label >= len(self.classes)), None)
            if wrong:
                origin = (f"the task {self.task.name} has {len(self.classes)} classes" if self.task else
                          f"the training lists ({', '.join(n + '.txt' for n in self._classes_from)}) have labels "
                          f"0..{len(self.classes) - 1}")
                raise DataError(f"{self._lists[name]}: label {wrong[1]} of {wrong[0]} is out of range: {origin}")
            self._samples[name] = samples
        return self._samples[name]

    def validate(self, split: str) -> None:
        check_files_exist(self._read(self.check_split(split)), self._lists[split])

    def _dataset(self, split: str, resize: Resize) -> Dataset:
        self.validate(split)
        return ImageListDataset(self._read(split), resize)

    def describe(self) -> str:
        what = (f"task {self.task.name}" if self.task else
                f"{dir_name(self.root)!r} (not a VTAB-1k task name: classes from "
                f"the largest label in {', '.join(n + '.txt' for n in self._classes_from)})")
        return f"VTAB-1k list data at {self.root}: {what}, {len(self.classes)} classes, splits {', '.join(self.splits)}"


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
    out, the same files every run) or ``<root>/<split>/<class>/*`` (every sub-folder a split;
    ``val``/``validation`` and ``test`` play those roles in the protocols)."""

    kind = "image-folder"

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
        val = next((s for s in ("val", "validation") if s in self.base_splits), None)
        self.test_split = "test" if "test" in self.base_splits else None
        self.tune_splits = ("train", val) if val else None
        self.final_splits = (f"train{UNION}{val}" if val else "train", "test") if self.test_split else None

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
    def base_splits(self):
        return list(self._split_dirs) if self.has_split_folders else ["train", "val"]

    def eval_resize(self, size: int) -> Resize:
        return Resize("shorter", size, crop=size)

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
        if not pairs:
            raise DataError(f"split {split!r} of {self.root} is empty")
        index = {name: i for i, name in enumerate(self.classes)}
        return [(path, index[name]) for path, name in pairs]

    def validate(self, split: str) -> None:
        for part in self.check_split(split).split(UNION):
            self._labelled(part)

    def _dataset(self, split: str, resize: Resize) -> Dataset:
        return ImageListDataset(self._labelled(split), resize)
