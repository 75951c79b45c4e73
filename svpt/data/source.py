"""``open_data``: tell the data layouts apart and give the splits of one."""
from __future__ import annotations

import abc
import os
from typing import NamedTuple, Sequence

from torch.utils.data import ConcatDataset, Dataset

from .augment import AUGMENTATIONS, margin_size
from .errors import DataError
from .tasks import Task, find_task

BUILTIN_NAME = "builtin"
UNION = "+"  # "train+val": the images of both splits


class Resize(NamedTuple):
    """How an image is brought to its stored size: ``"squash"`` scales both sides to ``size``;
    ``"shorter"`` scales the shorter side to ``size``, keeping the aspect; ``crop`` then
    takes the centre ``crop`` x ``crop`` square (None: no crop)."""
    mode: str
    size: int
    crop: int | None = None


def split_files(root: str, names: Sequence[str], suffix: str) -> dict[str, str]:
    """{split: path} of the files ``<root>/<split><suffix>`` that exist (a task's split lists)."""
    paths = {name: os.path.join(root, name + suffix) for name in names}
    return {name: path for name, path in paths.items() if os.path.isfile(path)}


def dir_name(root: str) -> str:
    return os.path.basename(os.path.normpath(root))


def task_of(tasks: tuple[Task, ...], root: str) -> Task | None:
    """The benchmark task a directory is named after, or None."""
    return find_task(tasks, dir_name(root))


class DataSource(abc.ABC):
    """One dataset on disk (or generated): its splits, classes, the splits each protocol
    uses and how to read a split."""

    kind: str = ""
    root: str | None = None
    classes: list[str] = []
    native_size: int | None = None  # images have one size (built-in data); else None
    default_augment: str = "none"
    tune_splits: tuple[str, str] | None = None   # (train, val) of a hyper-parameter search
    final_splits: tuple[str, str] | None = None  # (train, test) of the reported run
    test_split: str | None = None                # the split whose labels only final runs read

    @property
    @abc.abstractmethod
    def base_splits(self) -> Sequence[str]:
        """The splits stored as such (unions of them are splits too)."""

    @abc.abstractmethod
    def _dataset(self, split: str, resize: Resize) -> Dataset:
        """The images of a (checked) base ``split``, stored as ``resize`` says."""

    @property
    def splits(self) -> list[str]:
        unions = [s for pair in (self.tune_splits or (), self.final_splits or ()) for s in pair if UNION in s]
        return list(self.base_splits) + [s for s in unions if s not in self.base_splits]

    def parts(self, split: str) -> frozenset[str]:
        """The stored splits whose images make up ``split``."""
        return frozenset(split.split(UNION))

    def check_split(self, split: str, option: str = "split") -> str:
        if not all(part in self.base_splits for part in split.split(UNION)):
            where = f" in {self.root}" if self.root else ""
            raise DataError(f"{option} {split!r} is not a split of this {self.kind} data{where}; "
                            f"accepted: {', '.join(self.splits)} (or a union such as a{UNION}b)")
        return split

    def eval_resize(self, size: int) -> Resize:
        """How evaluation images (and training images without augmentation) are stored."""
        return Resize("squash", size)

    def dataset(self, split: str, size: int, augment: str = "none") -> Dataset:
        """The images of ``split`` at ``size`` x ``size``; with a training ``augment``, stored
        at ``margin_size(size)`` on the shorter side, for :class:`svpt.data.augment.Augmenter`."""
        if augment not in AUGMENTATIONS:
            raise DataError(f"augmentation {augment!r} is not accepted; accepted: {', '.join(AUGMENTATIONS)}")
        resize = self.eval_resize(size) if augment == "none" else Resize("shorter", margin_size(size))
        parts = [self._dataset(part, resize) for part in self.check_split(split).split(UNION)]
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def validate(self, split: str) -> None:
        """Everything about ``split`` that can be checked without decoding images (its lists,
        labels and files); a :class:`DataError` naming the file otherwise."""
        self.check_split(split)

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return f"{self.kind} data{where}: {len(self.classes)} classes, splits {', '.join(self.splits)}"


def open_data(spec: str | os.PathLike | None, val_fraction: float = 0.1) -> DataSource:
    """The data source named by ``spec``: ``None``/``"builtin"``, a VTAB-1k list directory,
    an FGVC directory with VPT's JSON splits or an image folder. ``val_fraction``: share of
    each class held out as ``val`` in an image folder without split sub-folders."""
    from .builtin import BuiltinSource
    from .fgvc import FgvcSource, is_fgvc_dir
    from .folders import ImageFolderSource, VtabSource, is_vtab_dir

    if spec is None or os.fspath(spec) == BUILTIN_NAME:
        return BuiltinSource()
    root = os.fspath(spec)
    if not os.path.exists(root):
        raise DataError(f"data path {root!r} does not exist; give an image folder, a VTAB-1k list "
                        f"directory, an FGVC directory (train.json, val.json, test.json) or {BUILTIN_NAME!r}")
    if not os.path.isdir(root):
        raise DataError(f"data path {root!r} is a file; give a directory (an image folder with one "
                        f"sub-folder per class, a VTAB-1k list directory or an FGVC directory) or {BUILTIN_NAME!r}")
    if is_vtab_dir(root):
        return VtabSource(root)
    if is_fgvc_dir(root):
        return FgvcSource(root)
    return ImageFolderSource(root, val_fraction=val_fraction)
