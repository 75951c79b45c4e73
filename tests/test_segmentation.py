"""svpt.segmentation: data layout and its errors, mmseg's pipeline pieces, SETR-PUP, sliding
windows, metrics, checkpoints, training on the built-in task, exact resume, evaluation.

Every run uses the built-in generated task (128-pixel shapes) with timm's test_vit, a few
iterations of small batches on the eager backend: seconds on a CPU.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import svpt
import svpt.segmentation as seg
from svpt.data.errors import DataError
from svpt.segmentation.run import BEST, LAST
from svpt.segmentation.transforms import pad, photometric_distortion, random_crop, rescale_size
from svpt.training.config import ConfigError

FAST = dict(backend="eager", batch_size=2, iterations=4, eval_every=4, checkpoint_every=2, log_every=1,
            limit_train=8, limit_eval=2, num_prompts=2, threads=1)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    with open(os.path.join(run_dir, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def timeless(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


# ---------------------------------------------------------------- ADE20K layout
def write_ade(root, split="training", count=3, size=(40, 32), shift=1, name_fn=lambda i: f"img_{i}"):
    """An ADE20K-layout split from the built-in images, labels shifted up by ``shift`` (ADE's 0 = other)."""
    images = os.path.join(root, "images", split)
    labels = os.path.join(root, "annotations", split)
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    shapes = seg.GeneratedShapes("validation", size=max(size))
    for i in range(count):
        sample = shapes[i]
        label = sample.label[: size[1], : size[0]].astype(np.int32) + shift
        label[:2, :2] = 0  # "other"
        label[-1, -1] = 255
        Image.fromarray(sample.image[: size[1], : size[0]]).save(os.path.join(images, name_fn(i) + ".jpg"))
        Image.fromarray(label.astype(np.uint8)).save(os.path.join(labels, name_fn(i) + ".png"))
    return root


def test_ade20k_folder_reduces_zero_label(tmp_path):
    root = write_ade(tmp_path)
    ds = seg.ADE20KFolder(root, "training", num_classes=4)
    raw = np.asarray(Image.open(os.path.join(root, "annotations", "training", "img_0.png")))
    sample = ds[0]
    assert len(ds) == 3 and sample.image.shape == (32, 40, 3) and sample.label.shape == (32, 40)
    assert sample.name == "img_0" and ds.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert (sample.label[raw == 0] == 255).all() and (sample.label[raw == 255] == 255).all()
    keep = (raw != 0) & (raw != 255)
    np.testing.assert_array_equal(sample.label[keep], raw[keep] - 1)
    assert seg.ADE20KFolder(root, "training").classes[:3] == ["wall", "building", "sky"]  # ADE20K's 150
    plain = seg.ADE20KFolder(write_ade(tmp_path / "plain", shift=0), "training", 4, reduce_zero_label=False)[0]
    np.testing.assert_array_equal(plain.label[2:, 2:-1], seg.GeneratedShapes("validation", 40)[0].label[2:32, 2:-1])


def test_ade20k_layout_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"no folder images[/\\]training; expected images/\{training,validation\}"):
        seg.ADE20KFolder(tmp_path, "training")
    with pytest.raises(DataError, match="is not a directory"):
        seg.ADE20KFolder(tmp_path / "missing", "training")
    with pytest.raises(DataError, match="split 'train' is not an ADE20K split; accepted: training, validation"):
        seg.ADE20KFolder(tmp_path, "train")

    root = write_ade(tmp_path / "a")
    os.remove(os.path.join(root, "annotations", "training", "img_1.png"))
    with pytest.raises(DataError, match=r"img_1\.jpg.*needs annotations/training/NAME\.png"):
        seg.ADE20KFolder(root, "training")

    root = write_ade(tmp_path / "b")
    small = os.path.join(root, "annotations", "training", "img_2.png")
    Image.fromarray(np.ones((16, 20), np.uint8)).save(small)
    with pytest.raises(DataError, match=r"img_2\.png is 20x16 but its image .*img_2\.jpg is 40x32"):
        seg.ADE20KFolder(root, "training", num_classes=4)[2]

    bad = np.full((32, 40), 2, np.uint8)
    bad[0, 0] = 7
    Image.fromarray(bad).save(os.path.join(root, "annotations", "training", "img_0.png"))
    with pytest.raises(DataError, match=r"img_0\.png holds label values \[7\] outside the 4 classes; accepted: 0 "
                                        r"\(other, ignored\), 1\.\.4 \(the classes\) and 255"):
        seg.ADE20KFolder(root, "training", num_classes=4)[0]
    with pytest.raises(DataError, match=r"accepted: 0\.\.3 \(the classes\) and 255"):
        seg.ADE20KFolder(root, "training", num_classes=4, reduce_zero_label=False)[0]

    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(os.path.join(root, "annotations", "training", "img_1.png"))
    with pytest.raises(DataError, match=r"img_1\.png is a RGB image; annotations must be single-channel"):
        seg.ADE20KFolder(root, "training", num_classes=4)[1]
    with open(os.path.join(root, "images", "training", "img_1.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read .*img_1\.jpg"):
        seg.ADE20KFolder(root, "training", num_classes=4)[1]


# ---------------------------------------------------------------- pipeline pieces
def test_rescale_size_is_mmcvs_keep_ratio_rule():
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(2000, 250, (2048, 512)) == (2048, 256)  # the long side binds
    assert rescale_size(300, 400, (1024, 256)) == (256, 341)  # portrait: the width is the short side
    assert rescale_size(683, 512, (1024, 256)) == (342, 256)  # 341.5 rounds half up


def test_random_crop_rejects_crops_one_class_fills():
    label = np.zeros((64, 64), np.uint8)
    label[:, 48:] = 1  # only crops reaching the right quarter hold two classes
    image = np.zeros((64, 64, 3), np.uint8)
    lefts = []
    for seed in range(40):
        _, crop = random_crop(image, label, 16, 0.75, np.random.default_rng(seed))
        values, counts = np.unique(crop, return_counts=True)
        lefts.append(len(values) > 1 and counts.max() / counts.sum() < 0.75)
    assert np.mean(lefts) > 0.5  # one in four uniform crops qualifies; ten draws make it most
    assert random_crop(image, label, 100, 0.75, np.random.default_rng(0))[1].shape == (64, 64)  # smaller image


def test_training_pipeline_keeps_image_and_label_together():
    sample = seg.GeneratedShapes("training", size=64)[3]
    pipeline = seg.TrainPipeline(crop=48, scale=(256, 64), photometric=False)
    for seed in range(6):
        image, label = pipeline(sample.image, sample.label, np.random.default_rng(seed))
        again = pipeline(sample.image, sample.label, np.random.default_rng(seed))
        assert torch.equal(image, again[0]) and torch.equal(label, again[1])  # the generator decides all
        assert image.shape == (3, 48, 48) and label.shape == (48, 48) and label.dtype == torch.int64
        background = label == 0
        # Background pixels are grey (channels close), shapes saturated: the label follows the pixels.
        spread = image.std(0)
        assert spread[background].mean() < spread[(label > 0) & (label < 255)].mean()
    padded_image, padded_label = pad(torch.ones(3, 2, 3), torch.zeros(2, 3, dtype=torch.int64), 4)
    assert (padded_image[:, 2:] == 0).all() and (padded_label[:, 3:] == 255).all() and (padded_label[:2, :3] == 0).all()


def test_photometric_distortion_changes_colours_not_shape():
    image = seg.GeneratedShapes("training", size=32)[0].image
    changed = [photometric_distortion(image, np.random.default_rng(s)) for s in range(8)]
    assert all(c.shape == image.shape and c.dtype == np.uint8 for c in changed)
    assert sum(not np.array_equal(c, image) for c in changed) >= 6


# ---------------------------------------------------------------- inference and metrics
def test_windows_are_mmsegs_slide_grid():
    assert seg.windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert seg.windows(300, 200, 512, 341) == [(0, 300, 0, 200)]
    grid = seg.windows(1100, 900, 512, 341)
    covered = np.zeros((1100, 900), int)
    for t, b, l, r in grid:
        assert b - t == 512 and r - l == 512
        covered[t:b, l:r] += 1
    assert covered.min() >= 1 and len(grid) == 3 * 3  # (1100 - 512 + 340) // 341 + 1 = 3 rows, 3 columns


class PixelwiseModel:
    """Logits = the first channels of the (padded) crop: slide inference must give the image's own."""
    num_classes = 2

    def __init__(self):
        self.shapes = []

    def predict(self, crops):
        self.shapes.append(tuple(crops.shape))
        return crops[:, :2] * 1.0


def test_slide_logits_average_the_windows_and_drop_the_padding():
    image = torch.randn(1, 3, 40, 70)
    model = PixelwiseModel()
    out = seg.slide_logits(model, image, crop=32, stride=20, window_batch=3)
    torch.testing.assert_close(out, image[:, :2])
    assert all(s[1:] == (3, 32, 32) for s in model.shapes) and sum(s[0] for s in model.shapes) == 2 * 3
    small = seg.slide_logits(model, image[:, :, :10, :12], crop=32, stride=20)
    torch.testing.assert_close(small, image[:, :2, :10, :12])


def test_confusion_matrix_metrics_by_hand():
    matrix = seg.ConfusionMatrix(3)
    label = torch.tensor([[0, 0, 1, 1], [1, 255, 255, 0]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]])
    matrix.update(prediction, label)
    m = matrix.metrics(["a", "b", "c"])
    # class a: TP 2, FN 1 (pred b), FP 1 -> IoU 2/4, Acc 2/3; b: TP 2, FN 1, FP 1 -> 2/4, 2/3;
    # c: never labelled, never predicted on labelled pixels -> undefined, left out of the means.
    assert m["per_class"]["a"] == {"IoU": 0.5, "Acc": pytest.approx(2 / 3)}
    assert m["per_class"]["c"] == {"IoU": None, "Acc": None}
    assert m["mIoU"] == 0.5 and m["mAcc"] == pytest.approx(2 / 3) and m["aAcc"] == pytest.approx(4 / 6)
    assert m["labelled_pixels"] == 6
    matrix.update(torch.tensor([2]), torch.tensor([0]))  # c predicted where a is: c's IoU is 0, counted
    assert matrix.metrics()["per_class"]["2"]["IoU"] == 0.0


# ---------------------------------------------------------------- model and checkpoints
def built(**settings):
    cfg = seg.SegmentationConfig(**{**FAST, **settings}).check()
    torch.manual_seed(0)
    return cfg, seg.build_model(cfg, cfg.resolved(), 4, torch.device("cpu"))


def test_setr_pup_structure_and_outputs():
    assert seg.default_out_indices(24) == (9, 14, 19, 23) and seg.default_out_indices(12) == (4, 7, 9, 11)
    _, model = built()
    assert model.out_indices == (1, 3, 4, 5)  # test_vit: 6 blocks
    assert len(model.decode_head.up_convs) == 4 and len(model.aux_heads) == 3  # patch 16 = 2^4 = 4^2
    assert all(len(head.up_convs) == 2 for head in model.aux_heads)
    images = torch.randn(2, 3, 128, 128)
    model.train()
    logits = model(images)
    assert [tuple(t.shape) for t in logits] == [(2, 4, 128, 128)] * 4
    model.eval()
    assert len(model(images)) == 1 and model.predict(images).shape == (2, 4, 128, 128)
    _, linear = built(decoder="linear")
    assert linear.out_indices == (5,) and len(linear.aux_heads) == 0
    assert linear.eval().predict(images).shape == (2, 4, 128, 128)
    _, plain = built(aux_weight=0.0)
    assert len(plain.aux_heads) == 0


def test_loss_is_mmsegs_mean_over_all_pixels_with_aux_weight():
    _, model = built()
    model.train()
    images, labels = torch.randn(2, 3, 128, 128), torch.randint(0, 4, (2, 128, 128))
    labels[:, :64] = 255
    logits = model(images)
    per_head = [torch.nn.functional.cross_entropy(t, labels, ignore_index=255, reduction="sum") / labels.numel()
                for t in logits]
    expected = per_head[0] + 0.4 * sum(per_head[1:])
    torch.testing.assert_close(model.loss(logits, labels), expected)


def test_checkpoint_holds_prompts_and_decoder_only(tmp_path):
    cfg, model = built(method="svpt")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "seg.safetensors"
    seg.save_checkpoint(model, path)
    meta, tensors = seg.read_checkpoint(path)
    prompt_keys = {"prompts", "da.weight", "da.bias", "ae.scale"}
    assert prompt_keys <= set(tensors) and not any(k.startswith(("blocks.", "patch_embed", "pos_embed")) for k in tensors)
    assert {k.split(".")[0] for k in tensors} == {"prompts", "da", "ae", "decode_head", "aux_heads"}
    assert any(k.endswith("running_mean") for k in tensors)  # BatchNorm statistics travel too
    _, fresh = built(method="svpt")
    images = torch.randn(1, 3, 128, 128)
    assert not torch.equal(fresh.eval().predict(images), model.eval().predict(images))
    seg.load_checkpoint(fresh, path)
    torch.testing.assert_close(fresh.eval().predict(images), model.predict(images), rtol=0, atol=0)
    _, other = built(method="svpt", decoder="linear")
    with pytest.raises(ConfigError, match="was saved from segmentation="):
        seg.load_checkpoint(other, path)
    svpt.save_prompts(fresh.backbone, tmp_path / "prompts.safetensors")  # a classification prompt file
    with pytest.raises(ConfigError, match="not an svpt segmentation checkpoint"):
        seg.load_checkpoint(fresh, tmp_path / "prompts.safetensors")
    assert seg.is_segmentation_checkpoint(path) and not seg.is_segmentation_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("settings, words", [
    (dict(decoder="fpn"), "decoder 'fpn' is not accepted; accepted: setr-pup, linear"),
    (dict(method="vpt"), "method 'vpt' is not accepted"),
    (dict(stride=200), "stride=200 is larger than crop_size=128"),
    (dict(iterations=0), "iterations=0 is not accepted"),
    (dict(batch_size=True), "batch_size=True is not accepted"),
    (dict(train_scale=[512]), "train_scale=[512] is not accepted"),
    (dict(optimizer="lamb"), "optimizer 'lamb' is not accepted"),
    (dict(out_indices=[3, 1]), "out_indices=[3, 1] is not accepted; give increasing block indices in 0..5"),
    (dict(backend="fast"), "backend 'fast'"),
    (dict(options={"ae_ratio": 2}), "ae_ratio=2 is not accepted"),
    (dict(num_classes=7), "the built-in data has 4 classes, not num_classes=7"),
])
def test_bad_settings_are_config_errors(tmp_path, settings, words):
    with pytest.raises((ConfigError, DataError)) as info:
        seg.train(output=str(tmp_path / "run"), **{**FAST, **settings})
    assert words in str(info.value)


# ---------------------------------------------------------------- runs
def test_built_in_task_learns_in_seconds(tmp_path):
    run = str(tmp_path / "run")
    result = seg.train(output=run, **{**FAST, "iterations": 40, "batch_size": 4, "eval_every": 40,
                                      "checkpoint_every": 40, "log_every": 10, "limit_train": None,
                                      "limit_eval": 16, "num_prompts": 5})
    rescored = seg.evaluate(run, limit_eval=16)  # the best checkpoint, the last here
    assert rescored["mIoU"] == pytest.approx(result["last"]["mIoU"])
    # All-background prediction scores about 0.22 here; the shapes must be found.
    assert result["last"]["mIoU"] > 0.4 and result["last"]["per_class"]["disc"]["IoU"] > 0.3
    files = set(os.listdir(run))
    assert {"config.json", "metrics.jsonl", "steps.jsonl", LAST, BEST, "resume.pt"} <= files
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["task"] == "segmentation" and config["resolved"]["crop_size"] == 128
    assert config["resolved"]["classes"] == list(seg.BUILTIN_CLASSES) and seg.is_segmentation_run(run)
    steps = rows(run, "steps.jsonl")
    assert [s["iteration"] for s in steps] == [10, 20, 30, 40]
    assert steps[0]["head_lr"] == pytest.approx(10 * steps[0]["lr"], rel=0.02)  # poly from 0.01 and 0.1 to 1e-4


def test_resume_continues_exactly(tmp_path):
    settings = {**FAST, "iterations": 7, "eval_every": 3, "checkpoint_every": 2, "options": {"prompt_dropout": 0.2}}
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    seg.train(output=straight, **settings)
    seg.train(output=stopped, stop_after_iteration=5, **settings)
    with open(os.path.join(stopped, "metrics.jsonl"), "a") as f:  # a line of a run killed after its state
        f.write(json.dumps({"iteration": 6, "mIoU": 0.9}) + "\n")
    seg.train(output=stopped, resume=True, **settings)
    a, b = seg.read_checkpoint(os.path.join(straight, LAST))[1], seg.read_checkpoint(os.path.join(stopped, LAST))[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert timeless(rows(straight)) == timeless(rows(stopped)) and [r["iteration"] for r in rows(stopped)] == [3, 6, 7]
    assert rows(straight, "steps.jsonl") == rows(stopped, "steps.jsonl")
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume=True"):
        seg.train(output=straight, **settings)
    with pytest.raises(ConfigError, match=r"cannot resume .* with other settings \(lr: None -> 0.5\)"):
        seg.train(output=straight, resume=True, **{**settings, "lr": 0.5})


def test_evaluate_options_and_ade20k_directory_run(tmp_path):
    data = write_ade(tmp_path / "ade", "training", count=4, size=(160, 136))
    write_ade(data, "validation", count=2, size=(150, 140))
    run = str(tmp_path / "run")
    result = seg.train(output=run, data=str(data), num_classes=4, crop_size=128, train_scale=[512, 128], stride=85,
                       decoder_channels=16, **{k: v for k, v in FAST.items() if k not in ("limit_eval",)})
    assert result["last"]["eval_images"] == 2
    single = seg.evaluate(run)
    assert single["mIoU"] == pytest.approx(result["last"]["mIoU"]) and single["checkpoint"].endswith(BEST)
    both = seg.evaluate(run, checkpoint=os.path.join(run, LAST), multi_scale=True, flip=True)
    assert both["multi_scale"] and both["flip"] and 0 <= both["mIoU"] <= 1
    assert set(both["per_class"]) == {"class_0", "class_1", "class_2", "class_3"}
    with pytest.raises(ConfigError, match="is not a segmentation run|is not an svpt run directory"):
        seg.evaluate(str(tmp_path))


def test_gradient_checkpointing_trains_the_same(tmp_path):
    plain = seg.train(output=str(tmp_path / "a"), **FAST)
    ckpt = seg.train(output=str(tmp_path / "b"), grad_checkpointing=True, **FAST)
    a = seg.read_checkpoint(os.path.join(plain["run_dir"], LAST))[1]
    b = seg.read_checkpoint(os.path.join(ckpt["run_dir"], LAST))[1]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- DDP (CPU, gloo)
def _ddp_worker(rank: int, port: int, output: str, settings: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        seg.train(output=output, **settings)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    """2 processes (gloo), each taking half of every global batch, train as 1 process does (the
    linear decoder: no BatchNorm, whose batch statistics are per process on a CPU), and the
    sharded evaluation sums to the whole split. Forked, so the workers need not import torch again."""
    import socket

    import torch.multiprocessing as mp

    settings = {**FAST, "decoder": "linear", "batch_size": 4, "iterations": 3, "limit_eval": 3}
    one = seg.train(output=str(tmp_path / "one"), **settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = str(tmp_path / "two")
    mp.start_processes(_ddp_worker, args=(port, two, settings), nprocs=2, start_method="fork")
    assert json.load(open(os.path.join(two, "config.json")))["resolved"]["world_size"] == 2
    for a, b in zip(rows(one["run_dir"], "steps.jsonl"), rows(two, "steps.jsonl"), strict=True):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    a, b = seg.read_checkpoint(os.path.join(one["run_dir"], LAST))[1], seg.read_checkpoint(os.path.join(two, LAST))[1]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    (row_one,), (row_two,) = rows(one["run_dir"]), rows(two)
    assert row_two["eval_images"] == 3 and abs(row_one["mIoU"] - row_two["mIoU"]) < 1e-3
