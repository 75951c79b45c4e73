"""Datasets for ``svpt train``, ``svpt eval``, ``svpt vtab`` and ``svpt fgvc``.

``open_data(spec)`` returns a :class:`DataSource` for one of four layouts:

* ``None`` or ``"builtin"``: generated 32-pixel images of a learnable task (the orientation
  of noisy stripes, 4 classes), so that training runs anywhere without downloads;
* a VTAB-1k list directory: ``<root>/{train800,val200,train800val200,test}.txt`` with
  "relative/path label" lines (the JPEG export used by NOAH, CVPT and most later work);
* an FGVC directory: ``<root>/{train,val,test}.json`` mapping image paths to labels (the
  VPT repository's splits of CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs and Cars);
* an image folder: ``<root>/<class>/<image>`` (a ``val`` split is held out of each class)
  or ``<root>/<split>/<class>/<image>`` when ``<root>/train`` holds class folders.

Each source names the splits of the two protocols (``tune_splits``: train and val of a
hyper-parameter search; ``final_splits``: train and test of the reported run). Every
dataset yields ``(uint8 tensor [3, H, W], label)``; augmentation (:mod:`.augment`) and
normalisation happen on the training device or in the loader's workers.
"""
from .augment import AUGMENTATIONS, Augmenter
from .builtin import BuiltinSource, GeneratedStripes
from .errors import DataError
from .fgvc import FgvcSource
from .folders import IMAGE_EXTENSIONS, VTAB_SPLITS, ImageFolderSource, ImageListDataset, VtabSource, load_image
from .source import DataSource, Resize, open_data
from .tasks import FGVC_TASKS, VTAB_TASKS, Task, find_task

__all__ = [
    "AUGMENTATIONS", "Augmenter", "BuiltinSource", "DataError", "DataSource", "FGVC_TASKS", "FgvcSource",
    "GeneratedStripes", "IMAGE_EXTENSIONS", "ImageFolderSource", "ImageListDataset", "Resize", "Task",
    "VTAB_SPLITS", "VTAB_TASKS", "VtabSource", "find_task", "load_image", "open_data",
]
