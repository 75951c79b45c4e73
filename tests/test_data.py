"""svpt.data on tiny generated trees: image folders (flat and with split folders), VTAB-1k
lists, the built-in task, and the errors a user gets for bad paths, images and splits."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from svpt.data import DataError, GeneratedStripes, open_data


def write_image(path, seed: int, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_folder(root, classes=("cat", "dog", "owl"), per_class=5, ext=".png"):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(os.path.join(root, name, f"{i}{ext}"), seed=10 * c + i)
    return root


def make_vtab(root, splits=("train800", "val200", "train800val200", "test"), per_split=6, classes=3):
    for s, split in enumerate(splits):
        lines = []
        for i in range(per_split):
            rel = f"images/{split}/{i:03d}.jpg"
            write_image(os.path.join(root, rel), seed=100 * s + i)
            lines.append(f"{rel} {i % classes}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------- image folders
def test_flat_image_folder_holds_out_val(tmp_path):
    src = open_data(make_folder(str(tmp_path / "flat"), per_class=10))
    assert src.kind == "image-folder" and src.classes == ["cat", "dog", "owl"]
    assert src.splits == ["train", "val"] and (src.default_train_split, src.default_eval_split) == ("train", "val")
    train, val = src.dataset("train", 16), src.dataset("val", 16)
    assert (len(train), len(val)) == (27, 3)  # 10% of each class
    train_files = {p for p, _ in train.samples}
    assert not train_files & {p for p, _ in val.samples}
    image, label = val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label in (0, 1, 2)
    assert sorted(label for _, label in val.samples) == [0, 1, 2]
    again = open_data(str(tmp_path / "flat")).dataset("val", 16)
    assert again.samples == val.samples  # the held-out files are the same every run


def test_image_folder_with_split_folders(tmp_path):
    root = tmp_path / "split"
    make_folder(str(root / "train"))
    make_folder(str(root / "val"), classes=("dog", "owl"), per_class=2)
    src = open_data(str(root))
    assert src.splits == ["train", "val"] and src.classes == ["cat", "dog", "owl"]
    val = src.dataset("val", 8)
    assert sorted(label for _, label in val.samples) == [1, 1, 2, 2]  # labels follow train's class list


def test_image_folder_eval_class_unknown_to_train(tmp_path):
    root = tmp_path / "split"
    make_folder(str(root / "train"), classes=("cat",))
    make_folder(str(root / "val"), classes=("cat", "emu"), per_class=1)
    with pytest.raises(DataError, match="class folders that train does not have: emu"):
        open_data(str(root)).dataset("val", 8)


def test_crop_keeps_the_centre(tmp_path):
    path = str(tmp_path / "c" / "a" / "wide.png")
    os.makedirs(os.path.dirname(path))
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, 10:20] = 255  # a white centre square between black sides
    Image.fromarray(array).save(path)
    from svpt.data import load_image
    assert load_image(path, 10, "crop").float().mean() > 250
    assert load_image(path, 10, "squash").float().mean() < 150


# ---------------------------------------------------------------- VTAB-1k lists
def test_vtab_lists(tmp_path):
    src = open_data(make_vtab(str(tmp_path / "vtab")))
    assert src.kind == "VTAB-1k list" and src.classes == ["0", "1", "2"]
    assert src.splits == ["train800", "val200", "train800val200", "test"]
    assert (src.default_train_split, src.default_eval_split) == ("train800val200", "test")
    ds = src.dataset("val200", 20)
    image, label = ds[4]
    assert image.shape == (3, 20, 20) and label == 1
    assert ds.samples[4][0] == os.path.join(str(tmp_path / "vtab"), "images/val200/004.jpg")


def test_vtab_wrong_split_name_lists_accepted(tmp_path):
    src = open_data(make_vtab(str(tmp_path / "vtab"), splits=("train800", "test")))
    with pytest.raises(DataError, match=r"'train900' is not a VTAB-1k split; accepted: train800, val200, "
                                        r"train800val200, test \(present in .*: train800, test\)"):
        src.dataset("train900", 8)
    with pytest.raises(DataError, match=r"val200.txt does not exist; splits present in .*: train800, test"):
        src.dataset("val200", 8)


def test_vtab_missing_image_and_bad_line(tmp_path):
    root = make_vtab(str(tmp_path / "vtab"), splits=("train800", "test"))
    os.remove(os.path.join(root, "images/test/002.jpg"))
    with pytest.raises(DataError, match=r"1 of 6 images listed in .*test.txt do not exist, e.g. .*002.jpg"):
        open_data(root).dataset("test", 8)
    with open(os.path.join(root, "train800.txt"), "a") as f:
        f.write("images/x.jpg cat\n")
    with pytest.raises(DataError, match=r"train800.txt:7: 'images/x.jpg cat' is not a 'relative/path label' line"):
        open_data(root)


# ---------------------------------------------------------------- errors
def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(DataError, match=r"data path '.*nope' does not exist; give an image folder, a VTAB-1k"):
        open_data(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="is a file; give a directory"):
        open_data(str(tmp_path / "f.txt"))


def test_unreadable_image_names_the_file(tmp_path):
    root = make_folder(str(tmp_path / "bad"), classes=("a", "b"), per_class=2)
    for name in ("0.png", "1.png"):  # one lands in train, one in val
        with open(os.path.join(root, "a", name), "wb") as f:
            f.write(b"this is not a png")
    ds = open_data(root).dataset("train", 8)
    index = [i for i, (p, label) in enumerate(ds.samples) if label == 0]
    with pytest.raises(DataError, match=r"cannot read image .*a/[01].png: cannot identify image file"):
        ds[index[0]]


def test_empty_class_and_stray_images(tmp_path):
    root = make_folder(str(tmp_path / "e"), classes=("a",), per_class=2)
    os.makedirs(os.path.join(root, "empty"))
    with pytest.raises(DataError, match="class folder.* empty in .* hold no images"):
        open_data(root)
    os.rmdir(os.path.join(root, "empty"))
    write_image(os.path.join(root, "stray.png"), 0)
    with pytest.raises(DataError, match="holds images directly"):
        open_data(root)


def test_wrong_split_name_image_folder_and_builtin(tmp_path):
    with pytest.raises(DataError, match=r"split 'valid' is not a split .*; accepted: train, val"):
        open_data(make_folder(str(tmp_path / "f"))).dataset("valid", 8)
    with pytest.raises(DataError, match=r"accepted: train, test"):
        open_data(None).dataset("val", 8)


# ---------------------------------------------------------------- built-in task
def test_builtin_is_deterministic_and_balanced():
    src = open_data("builtin")
    assert src.splits == ["train", "test"] and src.native_size == 32 and len(src.classes) == 4
    ds = src.dataset("test", 32)
    a, b = ds[7], GeneratedStripes(512, 1)[7]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[0].dtype == torch.uint8
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert labels.bincount(minlength=4).min() > 90  # roughly 128 each
    assert not torch.equal(src.dataset("train", 32)[7][0], a[0])  # train and test images differ
