"""svpt.data on tiny generated trees: image folders (flat and with split folders), VTAB-1k
lists, the built-in task, and the errors a user gets for bad paths, images and splits."""
from __future__ import annotations

import json
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


def make_fgvc(root, sizes=(("train", 6), ("val", 3), ("test", 3)), classes=3, image_dir="images"):
    """VPT's FGVC layout: <root>/<split>.json mapping paths under <root>/<image_dir> to labels."""
    for s, (split, n) in enumerate(sizes):
        entries = {}
        for i in range(n):
            rel = f"{split}_{i:03d}.jpg"
            write_image(os.path.join(root, image_dir, rel), seed=300 + 50 * s + i, size=(14 + i % 3, 11))
            entries[rel] = 10 + i % classes  # VPT's labels need not start at 0
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(entries, f)
    return root


# ---------------------------------------------------------------- image folders
def test_flat_image_folder_holds_out_val(tmp_path):
    src = open_data(make_folder(str(tmp_path / "flat"), per_class=10))
    assert src.kind == "image-folder" and src.classes == ["cat", "dog", "owl"]
    assert src.splits == ["train", "val"] and src.tune_splits == ("train", "val") and src.final_splits is None
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
    from svpt.data import Resize, load_image
    assert load_image(path, Resize("shorter", 10, crop=10)).float().mean() > 250
    assert load_image(path, Resize("squash", 10)).float().mean() < 150
    assert load_image(path, Resize("shorter", 10)).shape == (3, 10, 30)  # the aspect kept


# ---------------------------------------------------------------- VTAB-1k lists
def test_vtab_lists(tmp_path):
    src = open_data(make_vtab(str(tmp_path / "vtab")))
    assert src.kind == "VTAB-1k list" and src.classes == ["0", "1", "2"]
    assert src.splits == ["train800", "val200", "train800val200", "test"]
    assert (src.tune_splits, src.final_splits) == (("train800", "val200"), ("train800val200", "test"))
    assert src.parts("train800val200") == {"train800", "val200"}
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
    with pytest.raises(DataError, match=r"accepted: train, val, test, train\+val"):
        open_data(None).dataset("valid", 8)


# ---------------------------------------------------------------- built-in task
def test_builtin_is_deterministic_and_balanced():
    src = open_data("builtin")
    assert src.splits == ["train", "val", "test", "train+val"] and src.native_size == 32 and len(src.classes) == 4
    sizes = {s: len(src.dataset(s, 32)) for s in src.splits}
    assert sizes == {"train": 1792, "val": 256, "test": 512, "train+val": 2048}
    assert torch.equal(src.dataset("train+val", 32)[1800][0], src.dataset("val", 32)[8][0])
    ds = src.dataset("test", 32)
    a, b = ds[7], GeneratedStripes(512, 1)[7]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[0].dtype == torch.uint8
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert labels.bincount(minlength=4).min() > 90  # roughly 128 each
    assert not torch.equal(src.dataset("train", 32)[7][0], a[0])  # train and test images differ


# ---------------------------------------------------------------- VTAB-1k labels
def test_vtab_label_out_of_range_names_the_file(tmp_path):
    root = make_vtab(str(tmp_path / "dtd"))  # a VTAB-1k task name: 47 classes
    src = open_data(root)
    assert src.task.name == "dtd" and len(src.classes) == 47
    with open(os.path.join(root, "test.txt"), "a") as f:
        f.write("images/test/000.jpg 47\n")
    with pytest.raises(DataError, match=r"test.txt: label 47 of .*000.jpg is out of range: the task dtd has 47 "
                                        r"classes"):
        open_data(root).validate("test")
    other = make_vtab(str(tmp_path / "mytask"))  # not a task name: classes from the training list
    with open(os.path.join(other, "test.txt"), "a") as f:
        f.write("images/test/000.jpg 3\n")
    with pytest.raises(DataError, match=r"label 3 .* out of range: the training lists \(train800val200.txt\) have "
                                        r"labels 0..2"):
        open_data(other).validate("test")


# ---------------------------------------------------------------- FGVC JSON splits
def test_fgvc_splits_classes_and_image_dir(tmp_path):
    root = make_fgvc(str(tmp_path / "CUB_200_2011"))
    src = open_data(root)
    assert src.kind == "FGVC (JSON splits)" and src.task.name == "cub" and src.classes == ["10", "11", "12"]
    assert src.image_dir == os.path.join(root, "images") and src.default_augment == "crop-flip"
    assert src.splits == ["train", "val", "test", "train+val"] and len(src.dataset("train+val", 16)) == 9
    assert (src.tune_splits, src.final_splits) == (("train", "val"), ("train+val", "test"))
    image, label = src.dataset("test", 16)[1]
    assert image.shape == (3, 16, 16) and label == 1  # label 11 is the second class
    stored = src.dataset("train", 16, augment="crop-flip")[0][0]
    assert stored.shape == (3, 18, 23)  # shorter side 16 * 8 // 7, the aspect of the 14 x 11 image kept


def test_fgvc_errors_name_the_file(tmp_path):
    root = make_fgvc(str(tmp_path / "dogs"))
    test_json = os.path.join(root, "test.json")
    with open(test_json) as f:
        entries = json.load(f)
    with open(test_json, "w") as f:
        json.dump({**entries, "gone.jpg": 10}, f)
    with pytest.raises(DataError, match=r"1 of 4 images listed in .*test.json do not exist, e.g. .*gone.jpg"):
        open_data(root).validate("test")
    with open(test_json, "w") as f:
        json.dump({"test_000.jpg": 99}, f)
    with pytest.raises(DataError, match=r"test.json: label 99 of test_000.jpg is out of range: not one of the 3 "
                                        r"classes of train.json and val.json"):
        open_data(root).validate("test")
    with open(test_json, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match=r"test.json is not readable JSON"):
        open_data(root).validate("test")
    os.remove(os.path.join(root, "val.json"))
    with pytest.raises(DataError, match=r"FGVC directory without val.json"):
        open_data(root)
    elsewhere = make_fgvc(str(tmp_path / "cars"), image_dir="photos")
    with pytest.raises(DataError, match=r"train.json names 'train_000.jpg', which is under none of"):
        open_data(elsewhere)


# ---------------------------------------------------------------- augmentation
def test_augmentations_are_crops_drawn_per_seed_epoch_and_image():
    from svpt.data import Augmenter

    image = torch.randint(0, 256, (3, 20, 28), dtype=torch.uint8)
    crops = [image[:, top:top + 16, left:left + 16] for top in range(5) for left in range(13)]
    crops += [c.flip(-1) for c in crops]
    for name in ("crop-flip", "resized-crop-flip"):
        augment = Augmenter(name, 16, seed=1)
        out = augment(image, 2, 5)
        assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
        assert torch.equal(out, Augmenter(name, 16, seed=1)(image, 2, 5))  # the same draw, wherever it runs
        assert not all(torch.equal(out, augment(image, epoch, 5)) for epoch in range(3, 8))
    flips = [Augmenter("crop-flip", 16, 0)(image, 0, i) for i in range(16)]
    assert all(any(torch.equal(f, c) for c in crops) for f in flips)  # each one a crop, flipped or not
    assert Augmenter("none", 16, 0)(image, 0, 0) is image
    with pytest.raises(ValueError, match="accepted: none, crop-flip, resized-crop-flip"):
        Augmenter("jitter", 16, 0)
