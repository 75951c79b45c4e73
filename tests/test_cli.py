"""The ``svpt`` command itself: usage errors as one line and exit code 2, every option's help
with its default, the progress line, and semantic segmentation through ``svpt train --task
segmentation`` / ``svpt eval`` end to end on the built-in task (tiny settings: seconds)."""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import stat
from types import SimpleNamespace

import pytest
import torch

from svpt.cli import build_parser, main
from svpt.segmentation import SegmentationConfig
from svpt.segmentation.run import BEST, LAST
from svpt.training import progress as progress_module
from svpt.training.progress import Progress
from svpt.training.records import RunRecords

SEGMENTATION_GROUP = "segmentation (these flags apply to --task segmentation only)"
# Tiny segmentation settings: test_vit (6 blocks, width 64) at 64-pixel crops, 4 iterations of 2.
TINY_SEGMENTATION = ["--task", "segmentation", "--backend", "eager", "--threads", "1", "--num-prompts", "2",
                     "--crop-size", "64", "--train-scale", "256", "64", "--stride", "48", "--decoder-channels", "8",
                     "--iterations", "4", "--batch-size", "2", "--eval-every", "4", "--checkpoint-every", "2",
                     "--log-every", "1", "--limit-train", "8", "--limit-eval", "2", "--no-photometric",
                     "--prompt-dropout", "0.1"]


@pytest.fixture(autouse=True)
def _threads_restored():
    threads = torch.get_num_threads()  # --threads 1 sets torch's process-wide count
    yield
    torch.set_num_threads(threads)


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, command, *args, ran: bool = False) -> str:
    """stderr of a command that must fail with one line and exit code 2; unless it ``ran``
    (did some work first), it printed nothing else."""
    code, out, err = run(capsys, command, *args)
    assert code == 2 and (ran or out == ""), (code, out, err)
    assert err.count("\n") == 1 and err.startswith(f"svpt {command}: error: "), err
    return err


# ---------------------------------------------------------------- usage errors
@pytest.mark.parametrize("args, words", [
    (["train", "--device", "tpu"], "--device 'tpu' is not accepted; accepted: cpu, cuda, cuda:N"),
    (["train", "--device", "cuda"], "--device 'cuda': no CUDA GPU is usable here"),
    (["train", "--device", "cuda:abc"], "--device 'cuda:abc' is not accepted"),
    (["eval", "--prompts", "p.safetensors", "--device", "tpu"], "--device 'tpu' is not accepted"),
    (["vtab", "root", "--device", "cuda"], "no CUDA GPU is usable here"),
    (["fgvc", "root", "--device", "tpu"], "--device 'tpu' is not accepted"),
    (["train", "--model-kwargs", "foo"], "argument --model-kwargs: 'foo' is not KEY=VALUE"),
    (["train", "--model-kwargs", "img_size=384"], "'img_size=384': the input size is --img-size"),
    (["train", "--ae-layers", "x"], "argument --ae-layers: 'x': give 'all', 'none' or block indices"),
    (["train", "--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
    (["train", "--task", "segmentation", "--epochs", "2", "--img-size", "64"],
     "--epochs, --img-size do not apply to --task segmentation"),
    (["train", "--crop-size", "64"], "--crop-size does not apply to classification; add --task segmentation"),
    (["eval", "--prompts", "p.safetensors", "--flip"], "--flip does not apply to classification prompts"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, monkeypatch, args, words):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a machine without a GPU, wherever this runs
    assert words in one_line_error(capsys, *args)


def test_a_cuda_index_the_machine_lacks(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = one_line_error(capsys, "train", "--device", "cuda:2")
    assert "this machine has 2 CUDA GPU(s); accepted: cuda, cuda:0..cuda:1, cpu" in err


def test_eval_of_a_directory_that_is_no_segmentation_run(tmp_path, capsys):
    err = one_line_error(capsys, "eval", "--prompts", str(tmp_path))
    assert "is a directory but not a segmentation run; give a prompt checkpoint" in err


def test_a_model_that_is_not_a_vit(tmp_path, capsys):
    err = one_line_error(capsys, "train", "--model", "resnet18", "--img-size", "16", "--backend", "eager",
                         "--output", str(tmp_path / "run"), ran=True)
    assert "'resnet18'" in err and "svpt prompts timm VisionTransformer models" in err and "img_size" not in err


# ---------------------------------------------------------------- help
def test_every_option_shows_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [f"svpt {name} {max(a.option_strings, key=len)}" for name, sub in commands.items()
               for a in sub._actions if a.option_strings and a.dest != "help" and not a.required
               and "default" not in (a.help or "").lower()]
    assert missing == []


def test_train_help_lists_the_segmentation_group(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and SEGMENTATION_GROUP + ":" in out
    segmentation = out[out.index(SEGMENTATION_GROUP):]
    for flag in ("--crop-size", "--decoder {setr-pup,linear}", "--iterations", "--head-lr-mult", "--multi-scale",
                 "--stop-after-iteration", "--num-prompts 10", "--optimizer sgd"):
        assert flag in segmentation, flag


def test_segmentation_flags_are_its_config_fields():
    """One flag per SegmentationConfig field (the method options give ``options``)."""
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    group = next(g for g in train._action_groups if g.title == SEGMENTATION_GROUP)
    fields = {f.name for f in dataclasses.fields(SegmentationConfig)}
    assert {a.dest for a in group._group_actions} <= fields
    assert fields - {"options"} <= {a.dest for a in train._actions}


# ---------------------------------------------------------------- progress and run files
def test_progress_line_says_what_is_left_and_what_elapsed(monkeypatch):
    now = [0.0]  # the epoch starts at 0 s; step 1 of 2 ends at 10 s
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    stream = io.StringIO()
    progress = Progress("lines", epoch=1, epochs=2, steps=2, stream=stream)
    now[0] = 10.0
    progress.update(1, 32, lambda: 0.5)
    assert stream.getvalue() == ("epoch 1/2 step 1/2 loss 0.5000 3 img/s eta 0:10 left in epoch, about 0:30 left "
                                 "in run | epoch elapsed 0:10\n")


def test_progress_bar_fits_the_terminal(monkeypatch):
    monkeypatch.setattr(progress_module.shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    stream = io.StringIO()
    Progress("bar", epoch=1, epochs=1, steps=1, stream=stream).update(1, 8, lambda: 0.5)
    drawn = stream.getvalue()
    assert drawn.startswith("\r[") and drawn.endswith("\033[K\n") and len(drawn) == 40 + len("\033[K\n")


def test_run_files_have_the_umasks_mode(tmp_path):
    records = RunRecords(str(tmp_path), keep_epochs=0, eval_label="val")
    records.add_epoch({"epoch": 1, "train_loss": 1.0, "train_acc": 0.5}, [{"epoch_float": 1.0, "loss": 1.0}], last=True)
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in os.listdir(tmp_path)}
    assert len(modes) == 4 and set(modes.values()) == {0o666 & ~umask}, modes


# ---------------------------------------------------------------- segmentation end to end
def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_segmentation_train_resume_and_eval(tmp_path, capsys):
    out_dir, logger = str(tmp_path / "run"), logging.getLogger("svpt.segmentation")
    found = (list(logger.handlers), logger.level)
    code, out, err = run(capsys, "train", *TINY_SEGMENTATION, "--stop-after-iteration", "2", "--output", out_dir)
    assert code == 0, err
    assert f"stopped before the last iteration (4); continue with: svpt train --resume {out_dir}" in out
    with open(os.path.join(out_dir, "config.json")) as f:
        saved = json.load(f)["settings"]
    # Only the flags given reach the config; the others keep the segmentation defaults (not classification's).
    assert {k: saved[k] for k in ("crop_size", "train_scale", "photometric", "options", "num_prompts", "lr",
                                  "optimizer", "weight_decay", "stop_after_iteration")} == {
        "crop_size": 64, "train_scale": [256, 64], "photometric": False, "options": {"prompt_dropout": 0.1},
        "num_prompts": 2, "lr": None, "optimizer": "sgd", "weight_decay": 0.0, "stop_after_iteration": 2}

    assert "cannot resume" in one_line_error(capsys, "train", "--resume", out_dir, "--lr", "0.5", ran=True)
    assert "continues a segmentation run; --task classification does not match" in one_line_error(
        capsys, "train", "--resume", out_dir, "--task", "classification")
    code, out, err = run(capsys, "train", "--resume", out_dir)
    assert code == 0, err
    (row,) = metrics(out_dir)
    assert row["iteration"] == 4 and f"iteration 4/4: train loss {row['train_loss']:.4f}" in out  # the log, on stdout
    assert f"result: mIoU {100 * row['mIoU']:.2f} mAcc {100 * row['mAcc']:.2f} aAcc {100 * row['aAcc']:.2f}" in out
    assert (logger.handlers, logger.level) == found  # as the command found it

    code, out, err = run(capsys, "eval", "--prompts", out_dir, "--json")
    scored = json.loads(out.splitlines()[-1])
    assert code == 0 and scored["checkpoint"].endswith(BEST) and scored["mIoU"] == pytest.approx(row["mIoU"])
    assert f"mIoU {100 * row['mIoU']:.2f}" in out  # the library's line, logged by the command
    code, out, err = run(capsys, "eval", "--prompts", os.path.join(out_dir, LAST), "--flip", "--limit-eval", "1",
                         "--json")
    scored = json.loads(out.splitlines()[-1])
    assert code == 0 and scored["flip"] and scored["eval_images"] == 1 and scored["checkpoint"].endswith(LAST)
    err = one_line_error(capsys, "eval", "--prompts", out_dir, "--model", "test_vit")
    assert "--model does not apply to a segmentation checkpoint" in err
