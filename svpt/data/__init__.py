"""Datasets for ``svpt train`` and ``svpt eval``.

``open_data(spec)`` returns a :class:`DataSource` for one of three layouts:

* ``None`` or ``"builtin"``: generated 32-pixel images of a learnable task (the orientation
  of noisy stripes, 4 classes), so that training runs anywhere without downloads;
* a VTAB-1k list directory: ``<root>/{train800,val200,train800val200,test}.txt`` with
  "relative/path label" lines (the JPEG export used by NOAH, CVPT and most later work);
* an image folder: ``<root>/<class>/<image>`` (a ``val`` split is held out of each class)
  or ``<root>/<split>/<class>/<image>`` when ``<root>/train`` holds class folders.

Every dataset yields ``(uint8 tensor [3, S, S], label)``; normalisation happens on the
training device (four times fewer bytes to copy than float32, no per-image float work on
the loader's CPU).
"""
from .builtin import BuiltinSource, GeneratedStripes
from .errors import DataError
from .folders import IMAGE_EXTENSIONS, VTAB_SPLITS, ImageFolderSource, ImageListDataset, VtabSource, load_image
from .source import DataSource, open_data

__all__ = [
    "BuiltinSource", "DataError", "DataSource", "GeneratedStripes", "IMAGE_EXTENSIONS", "ImageFolderSource",
    "ImageListDataset", "VTAB_SPLITS", "VtabSource", "load_image", "open_data",
]
