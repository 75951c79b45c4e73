"""``open_data``: tell the data layouts apart and give the splits of one."""
from __future__ import annotations

import abc
import os
from typing import Sequence

from torch.utils.data import Dataset

from .errors import DataError

BUILTIN_NAME = "builtin"


class DataSource(abc.ABC):
    """One dataset on disk (or generated): its splits, classes and how to read a split."""

    kind: str = ""
    root: str | None = None
    classes: list[str] = []
    native_size: int | None = None  # images have one size (built-in data); else None
    default_train_split: str = ""
    default_eval_split: str = ""

    @property
    @abc.abstractmethod
    def splits(self) -> Sequence[str]:
        """The names of the splits this source has."""

    @abc.abstractmethod
    def _dataset(self, split: str, size: int) -> Dataset:
        """The images of a (checked) ``split`` at ``size`` x ``size``."""

    def check_split(self, split: str, option: str = "split") -> str:
        if split not in self.splits:
            where = f" in {self.root}" if self.root else ""
            raise DataError(f"{option} {split!r} is not a split of this {self.kind} data{where}; "
                            f"accepted: {', '.join(self.splits)}")
        return split

    def dataset(self, split: str, size: int) -> Dataset:
        """The images of ``split``, resized to ``size`` x ``size``."""
        return self._dataset(self.check_split(split), size)

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return f"{self.kind} data{where}: {len(self.classes)} classes, splits {', '.join(self.splits)}"


def open_data(spec: str | os.PathLike | None, val_fraction: float = 0.1) -> DataSource:
    """The data source named by ``spec``: ``None``/``"builtin"``, a VTAB-1k list directory or
    an image folder. ``val_fraction``: share of each class held out as ``val`` in an image
    folder without split sub-folders."""
    from .builtin import BuiltinSource
    from .folders import ImageFolderSource, VtabSource, is_vtab_dir

    if spec is None or os.fspath(spec) == BUILTIN_NAME:
        return BuiltinSource()
    root = os.fspath(spec)
    if not os.path.exists(root):
        raise DataError(f"data path {root!r} does not exist; give an image folder, a VTAB-1k list "
                        f"directory or {BUILTIN_NAME!r}")
    if not os.path.isdir(root):
        raise DataError(f"data path {root!r} is a file; give a directory (an image folder with one "
                        f"sub-folder per class, or a VTAB-1k list directory) or {BUILTIN_NAME!r}")
    if is_vtab_dir(root):
        return VtabSource(root)
    return ImageFolderSource(root, val_fraction=val_fraction)
