"""The run protocols (tune / final / max-test) on tiny generated tasks in the VTAB-1k and FGVC
layouts: which splits each reads, what it reports and saves, how every output labels it,
device-resident data against the DataLoader, checkpoints that name their backbone, and the
errors for bad task directories."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import svpt
from svpt.checkpoint import read_prompt_metadata
from svpt.data import DataError, open_data
from svpt.training import make_plan

from test_data import make_fgvc, make_folder, make_vtab
from test_train import TIMING, TINY, TINY_KW, epochs, result, svpt as run_cli

QUICK = [*TINY, "--batch-size", "4", "--warmup-epochs", "0"]


def steps(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        return f.read()


def tensors(run_dir, name="prompts_last.safetensors"):
    return load_file(os.path.join(run_dir, name))


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- which splits a plan reads
def test_plans_of_each_layout(tmp_path):
    builtin = open_data("builtin")
    assert make_plan(builtin, None) == make_plan(builtin, "final")
    assert (make_plan(builtin, "final").train_split, make_plan(builtin, "final").eval_split) == ("train+val", "test")
    assert (make_plan(builtin, "tune").train_split, make_plan(builtin, "tune").eval_split) == ("train", "val")
    with pytest.raises(DataError, match=r"--eval-split 'val' overlaps the training split 'train\+val'"):
        make_plan(builtin, "final", eval_split="val")
    with pytest.raises(DataError, match=r"--train-split 'train\+test' contains the test split"):
        make_plan(builtin, "final", train_split="train+test", eval_split="val")
    flat = open_data(make_folder(str(tmp_path / "flat"), per_class=4))
    assert make_plan(flat, None).protocol == "tune"  # no test split
    with pytest.raises(DataError, match="--protocol final needs a test split"):
        make_plan(flat, "final")
    split = tmp_path / "split"
    for name, n in (("train", 3), ("val", 1), ("test", 1)):
        make_folder(str(split / name), per_class=n)
    plan = make_plan(open_data(str(split)), None)
    assert (plan.protocol, plan.train_split, plan.eval_split) == ("final", "train+val", "test")
    vtab = open_data(make_vtab(str(tmp_path / "vtab")))
    with pytest.raises(DataError, match="--protocol tune never reads the test split.*--protocol max-test"):
        make_plan(vtab, "tune", eval_split="test")


# ---------------------------------------------------------------- tune: never reads test
def test_tune_trains_train800_selects_on_val200_and_never_reads_test(tmp_path, capsys):
    root = make_vtab(str(tmp_path / "task"))
    with open(os.path.join(root, "test.txt"), "w") as f:
        f.write("not a list line\n")  # a tuning run that opened it would fail
    shutil.rmtree(os.path.join(root, "images", "test"))
    run = str(tmp_path / "run")
    code, out, err = run_cli(capsys, "train", *QUICK, "--data", root, "--protocol", "tune", "--epochs", "2",
                             "--output", run)
    assert code == 0, err
    got = result(run)
    assert (got["protocol"], got["train_split"], got["eval_split"]) == ("tune", "train800", "val200")
    assert got["metric"] == "val200 accuracy after the last epoch (2)"
    assert got["accuracy"] == epochs(run)[-1]["eval_acc"] and [r["eval_split"] for r in epochs(run)] == ["val200"] * 2
    assert "the test split was not read" in out and "protocol tune (VPT's hyper-parameter search)" in out
    assert os.path.isfile(os.path.join(run, "prompts_best_val.safetensors"))
    assert not os.path.exists(os.path.join(run, "prompts_best_test.safetensors"))


# ---------------------------------------------------------------- final: test once, nothing selected on it
def test_what_a_final_run_saves_does_not_depend_on_the_test_labels(tmp_path, capsys):
    a = make_vtab(str(tmp_path / "a"))
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    with open(os.path.join(b, "test.txt")) as f:
        lines = [line.rsplit(maxsplit=1) for line in f if line.strip()]
    with open(os.path.join(b, "test.txt"), "w") as f:
        f.write("".join(f"{path} {(int(label) + 1) % 3}\n" for path, label in lines))
    runs = {}
    for name, root in (("a", a), ("b", b)):
        runs[name] = str(tmp_path / f"run_{name}")
        code, out, err = run_cli(capsys, "train", *QUICK, "--data", root, "--epochs", "2", "--output", runs[name])
        assert code == 0, err
        assert "protocol final (VPT): train on train800val200, evaluate test once, after the last epoch" in out
    assert same_tensors(tensors(runs["a"]), tensors(runs["b"])) and steps(runs["a"]) == steps(runs["b"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(epochs(runs["a"])) == strip(epochs(runs["b"]))
    assert all("eval_acc" not in r for r in epochs(runs["a"]))
    losses = {result(r)["loss"] for r in runs.values()}
    assert len(losses) == 2  # only the reported evaluation reads the labels, once


# ---------------------------------------------------------------- max-test: opt-in, labelled
def test_max_over_epochs_is_an_opt_in_and_says_so_everywhere(tmp_path, capsys):
    root = make_vtab(str(tmp_path / "task"))
    run = str(tmp_path / "run")
    code, out, err = run_cli(capsys, "train", *QUICK, "--data", root, "--protocol", "max-test", "--epochs", "3",
                             "--lr", "0.3", "--output", run)
    assert code == 0, err
    rows, got = epochs(run), result(run)
    best = max(rows, key=lambda r: r["eval_acc"])
    assert got["accuracy"] == best["eval_acc"] and got["epoch"] == best["epoch"]
    assert got["metric"] == (f"max over epochs of test accuracy (epoch {best['epoch']} of 3; selected on the "
                             "test set)")
    assert got["last_epoch_accuracy"] == rows[-1]["eval_acc"]
    assert "result (protocol max-test): MAXIMUM test accuracy over epochs" in out and "not VPT's protocol" in out
    meta = read_prompt_metadata(os.path.join(run, "prompts_best_test.safetensors"))
    assert meta["run"]["protocol"] == "max-test" and meta["run"]["selection"].endswith("selected on the test set")
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["settings"]["protocol"] == "max-test" and config["resolved"]["protocol"] == "max-test"
    assert "model selection on the test set" in config["resolved"]["protocol_description"]


# ---------------------------------------------------------------- device-resident data == DataLoader
@pytest.mark.parametrize("layout, augment", [("vtab", "none"), ("fgvc", "crop-flip"), ("fgvc", "resized-crop-flip")])
def test_device_resident_data_trains_exactly_as_the_loader(tmp_path, capsys, layout, augment):
    root = make_vtab(str(tmp_path / "t")) if layout == "vtab" else make_fgvc(str(tmp_path / "t"))
    runs = {}
    for where in ("always", "never"):
        runs[where] = str(tmp_path / where)
        code, out, err = run_cli(capsys, "train", *QUICK, "--data", root, "--protocol", "max-test", "--epochs", "2",
                                 "--augment", augment, "--prompt-dropout", "0.1", "--device-data", where,
                                 "--output", runs[where])
        assert code == 0, err
        assert ("kept on cpu" if where == "always" else "through a DataLoader") in out
    assert steps(runs["always"]) == steps(runs["never"])
    assert same_tensors(tensors(runs["always"]), tensors(runs["never"]))
    assert result(runs["always"])["accuracy"] == result(runs["never"])["accuracy"]


# ---------------------------------------------------------------- checkpoints name their backbone
def _tiny_backbone(seed):
    torch.manual_seed(seed)  # svpt train's random init: timm's, drawn from the run's seed
    return timm.create_model("test_vit", pretrained=False, img_size=16, **TINY_KW)


def test_checkpoints_name_their_backbone_and_refuse_another(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert run_cli(capsys, "train", *QUICK, "--epochs", "1", "--limit-train", "16", "--output", run)[0] == 0
    path = os.path.join(run, "prompts_last.safetensors")
    meta = read_prompt_metadata(path)
    assert meta["backbone"] == "test_vit" and len(meta["backbone_fingerprint"]) == 64
    assert meta["run"] == {"protocol": "final", "train_split": "train+val", "eval_split": "test", "data": "builtin",
                           "epoch": 1, "epochs": 1, "selection": "last epoch"}
    assert meta["method"] == "svpt" and meta["options"]["ae_ratio"] == 0.25

    same = svpt.prompt(_tiny_backbone(0), "svpt", 8, num_classes=4)
    svpt.load_prompts(same, path)
    assert same_tensors({k: v for k, v in svpt.prompt_state_dict(same).items()}, tensors(run))
    other = svpt.prompt(_tiny_backbone(1), "svpt", 8, num_classes=4)
    with pytest.raises(ValueError, match=r"trained on backbone test_vit \(weights fingerprint [0-9a-f]{12}\); this "
                                         r"model is test_vit \(weights fingerprint [0-9a-f]{12}\) \(same architecture, "
                                         r"other weights\)"):
        svpt.load_prompts(other, path)

    weights = str(tmp_path / "other.safetensors")
    save_file({k: v.contiguous() for k, v in _tiny_backbone(1).state_dict().items()}, weights)
    code, _, err = run_cli(capsys, "eval", "--prompts", path, "--weights", weights)
    assert code == 2 and "holds prompts trained on backbone test_vit" in err and "other weights" in err
    code, _, err = run_cli(capsys, "eval", "--prompts", path, "--model", "vit_tiny_patch16_224")
    assert code == 2 and "trained on backbone test_vit; --model is vit_tiny_patch16_224" in err

    old = str(tmp_path / "old.safetensors")  # written before svpt recorded the backbone: still loads
    old_keys = ("format", "method", "num_prompts", "options")
    save_file(tensors(run), old, metadata={k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                           for k, v in meta.items() if k in old_keys})
    svpt.load_prompts(other, old)


# ---------------------------------------------------------------- bad task directories
def test_bad_task_directories_fail_before_training(tmp_path, capsys):
    cases = []
    no_val = make_vtab(str(tmp_path / "no_val"), splits=("train800", "train800val200", "test"))
    cases.append((no_val, ["--protocol", "tune"], r"'val200': .*val200.txt does not exist"))
    cifar = make_vtab(str(tmp_path / "cifar"))
    with open(os.path.join(cifar, "test.txt"), "a") as f:
        f.write("images/test/001.jpg 100\n")
    cases.append((cifar, [], r"test.txt: label 100 of .*001.jpg is out of range: the task cifar has 100 classes"))
    fgvc = make_fgvc(str(tmp_path / "nabirds"))
    with open(os.path.join(fgvc, "test.json"), "w") as f:
        json.dump({"nowhere/x.jpg": 10}, f)
    cases.append((fgvc, [], r"1 of 1 images listed in .*test.json do not exist, e.g. .*nowhere/x.jpg"))
    for root, extra, message in cases:
        run = str(tmp_path / f"run_{os.path.basename(root)}")
        code, out, err = run_cli(capsys, "train", *QUICK, "--data", root, *extra, "--output", run)
        assert code == 2, out
        assert re.search(message, err), err
        assert not os.path.exists(run)  # nothing written, let alone half written
