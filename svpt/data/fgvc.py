"""FGVC tasks in the VPT repository's split format: ``train.json``, ``val.json`` and
``test.json`` in the task directory, each a JSON object mapping an image path to its label.

Image paths are relative to the task's image directory, which VPT's loaders place at
``<root>/images`` (CUB, NABirds), ``<root>/Images`` (Stanford Dogs) or ``<root>`` (Oxford
Flowers, Stanford Cars): the first of these holding the first image of ``train.json`` is
used. Classes are the distinct labels of ``train.json`` and ``val.json`` (the final run's
training data), in sorted order; a test label outside them is an error.
"""
from __future__ import annotations

import json
import os

from torch.utils.data import Dataset

from .augment import margin_size
from .errors import DataError
from .folders import ImageListDataset, check_files_exist
from .source import UNION, DataSource, Resize, dir_name, split_files, task_of
from .tasks import FGVC_TASKS

FGVC_SPLITS = ("train", "val", "test")
_IMAGE_DIRS = ("", "images", "Images")


def is_fgvc_dir(root: str) -> bool:
    return bool(split_files(root, FGVC_SPLITS, ".json"))


def _read_json_split(path: str) -> dict[str, int | str]:
    try:
        with open(path, encoding="utf-8") as f:
            split = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not readable JSON: {exc}") from None
    bad = not isinstance(split, dict) or not split or any(
        not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, str)) for k, v in split.items())
    if bad:
        raise DataError(f"{path} is not an FGVC split: expected a non-empty JSON object mapping image paths "
                        "to labels (integers or strings)")
    return split


class FgvcSource(DataSource):
    kind = "FGVC (JSON splits)"
    default_augment = "crop-flip"
    tune_splits = ("train", "val")
    final_splits = (f"train{UNION}val", "test")
    test_split = "test"

    def __init__(self, root: str):
        self.root = root
        self.task = task_of(FGVC_TASKS, root)
        self._files = split_files(root, FGVC_SPLITS, ".json")
        missing = [f"{name}.json" for name in ("train", "val") if name not in self._files]
        if missing:
            raise DataError(f"{root} is an FGVC directory without {' and '.join(missing)}; both protocols need "
                            "train.json and val.json (tuning: train -> val; final: train+val -> test)")
        self._splits = {name: _read_json_split(self._files[name]) for name in ("train", "val")}
        labels = set(self._splits["train"].values()) | set(self._splits["val"].values())
        if len({type(v) for v in labels}) > 1:
            raise DataError(f"{self._files['train']} and {self._files['val']} mix integer and string labels")
        self.classes = [str(v) for v in sorted(labels)]
        self._index = {v: i for i, v in enumerate(sorted(labels))}
        self.image_dir = self._find_image_dir()

    def _find_image_dir(self) -> str:
        first = next(iter(self._splits["train"]))
        candidates = [os.path.join(self.root, d) for d in _IMAGE_DIRS]
        found = next((d for d in candidates if os.path.isfile(os.path.join(d, first))), None)
        if found is None:
            raise DataError(f"{self._files['train']} names {first!r}, which is under none of "
                            f"{', '.join(candidates)}")
        return found

    @property
    def base_splits(self):
        return list(self._files)

    def _samples(self, split: str) -> list[tuple[str, int]]:
        if split not in self._splits:
            self._splits[split] = _read_json_split(self._files[split])
        unknown = next(((k, v) for k, v in self._splits[split].items() if v not in self._index), None)
        if unknown:
            raise DataError(f"{self._files[split]}: label {unknown[1]!r} of {unknown[0]} is out of range: not one of "
                            f"the {len(self.classes)} classes of train.json and val.json")
        return [(os.path.join(self.image_dir, k), self._index[v]) for k, v in self._splits[split].items()]

    def eval_resize(self, size: int) -> Resize:
        return Resize("shorter", margin_size(size), crop=size)  # VPT: Resize(256), CenterCrop(224)

    def validate(self, split: str) -> None:
        for part in self.check_split(split).split(UNION):
            check_files_exist(self._samples(part), self._files[part])

    def _dataset(self, split: str, resize: Resize) -> Dataset:
        samples = self._samples(split)
        check_files_exist(samples, self._files[split])
        return ImageListDataset(samples, resize)

    def describe(self) -> str:
        what = f"task {self.task.name}" if self.task else f"{dir_name(self.root)!r}"
        return (f"FGVC data at {self.root} ({what}, images under {self.image_dir}): {len(self.classes)} classes, "
                f"splits {', '.join(self.splits)}")
