"""The tasks of the two benchmark suites users publish: VTAB-1k (the directory names of
NOAH's JPEG list export) and FGVC (the five datasets of VPT's JSON splits)."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str                      # the directory name of the usual export
    group: str                     # the table column group its accuracy is averaged in
    num_classes: int
    aliases: tuple[str, ...] = ()  # other directory names seen in the wild


VTAB_GROUPS = ("Natural", "Specialized", "Structured")
VTAB_TASKS = (
    Task("cifar", "Natural", 100, ("cifar100", "cifar-100")),
    Task("caltech101", "Natural", 102),
    Task("dtd", "Natural", 47),
    Task("oxford_flowers102", "Natural", 102, ("flowers102",)),
    Task("oxford_iiit_pet", "Natural", 37, ("pets",)),
    Task("svhn", "Natural", 10),
    Task("sun397", "Natural", 397),
    Task("patch_camelyon", "Specialized", 2, ("camelyon", "pcam")),
    Task("eurosat", "Specialized", 10),
    Task("resisc45", "Specialized", 45),
    Task("diabetic_retinopathy", "Specialized", 5, ("retinopathy",)),
    Task("clevr_count", "Structured", 8),
    Task("clevr_dist", "Structured", 6, ("clevr_distance",)),
    Task("dmlab", "Structured", 6),
    Task("kitti", "Structured", 4, ("kitti_dist",)),
    Task("dsprites_loc", "Structured", 16),
    Task("dsprites_ori", "Structured", 16),
    Task("smallnorb_azi", "Structured", 18),
    Task("smallnorb_ele", "Structured", 9),
)

FGVC_GROUPS = ("FGVC",)
FGVC_TASKS = (  # directory names of VPT's data catalogue and of the datasets' own archives
    Task("cub", "FGVC", 200, ("cub_200_2011", "cub200", "cub2011")),
    Task("nabirds", "FGVC", 555),
    Task("oxford_flowers", "FGVC", 102, ("oxfordflowers", "flowers")),
    Task("stanford_dogs", "FGVC", 120, ("stanforddogs", "dogs")),
    Task("stanford_cars", "FGVC", 196, ("stanfordcars", "cars")),
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_task(tasks: tuple[Task, ...], directory_name: str) -> Task | None:
    """The task a directory is named after (case, '-' and '_' ignored), or None."""
    key = _key(directory_name)
    return next((t for t in tasks if key in {_key(n) for n in (t.name, *t.aliases)}), None)
