"""``svpt vtab ROOT`` / ``svpt fgvc ROOT`` on tiny generated suites: grid, selection, seeds,
the table and its means, failures that do not stop the others, and resuming."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics

import pytest

from svpt.cli import _tasks_available, main
from svpt.protocols.tables import TaskRow, summaries

from test_data import make_fgvc, make_vtab
from test_train import TINY, svpt as run_cli

# The suite commands have no --progress (their runs log to train.log).
SUITE = [a for a in TINY if a not in ("--progress", "lines")] + [
    "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0"]


def read_result(path):
    with open(path) as f:
        return json.load(f)


def csv_rows(out):
    with open(os.path.join(out, "results.csv")) as f:
        return {r["name"]: r for r in csv.DictReader(f)}


# ---------------------------------------------------------------- the means, as the papers compute them
def test_group_means_and_the_overall_mean():
    def row(name, group, accs, status="done"):
        return TaskRow(name, group, status, accs, list(range(len(accs))), len(accs), 0.1, 0.0, "given")

    rows = [row("a", "Natural", [0.9, 0.7]), row("b", "Natural", [0.5]),
            row("c", "Specialized", [0.6]), row("d", "Structured", [0.2]), row("e", "Structured", [0.4])]
    assert rows[0].std == pytest.approx(statistics.stdev([0.9, 0.7])) and rows[1].std is None
    got = {s.label: s.value for s in summaries(rows, ("Natural", "Specialized", "Structured"))}
    assert got["Natural"] == pytest.approx(0.65) and got["Specialized"] == pytest.approx(0.6)
    assert got["Overall"] == pytest.approx((0.65 + 0.6 + 0.3) / 3)  # the mean of the group means
    assert got["Mean of 5 tasks"] == pytest.approx((0.8 + 0.5 + 0.6 + 0.2 + 0.4) / 5)
    rows[2].status = "partial"
    got = {s.label: s.value for s in summaries(rows, ("Natural", "Specialized", "Structured"))}
    assert got["Specialized"] is None and got["Overall"] is None and got["Natural"] == pytest.approx(0.65)


# ---------------------------------------------------------------- a suite end to end
def test_vtab_suite_grid_seeds_table_failures_and_resume(tmp_path, capsys):
    root = tmp_path / "vtab-1k"
    for name in ("cifar", "eurosat", "dtd"):
        make_vtab(str(root / name), per_split=4)
    (root / "notes").mkdir()
    with open(root / "dtd" / "test.txt", "a") as f:
        f.write("images/test/000.jpg 47\n")  # dtd has 47 classes: fails its check, the others still run
    out = str(tmp_path / "suite")
    args = ["vtab", str(root), *SUITE, "--output", out, "--grid-lrs", "0.01", "0.2", "--seeds", "0", "1"]
    code, text, err = run_cli(capsys, *args)
    assert code == 1, err
    assert "3 tasks found (cifar, dtd, eurosat); ignored: notes; running 3" in text
    assert "dtd: not run" in text and "label 47 of" in text and "[2/2] eurosat" in text

    selection = read_result(os.path.join(out, "cifar", "selection.json"))
    tuned = selection["runs"]
    assert [(r["lr"], r["weight_decay"]) for r in tuned] == [(0.01, 1e-4), (0.2, 1e-4)]
    best = max(tuned, key=lambda r: (r["accuracy"], -r["lr"]))
    assert (selection["lr"], selection["weight_decay"]) == (best["lr"], 1e-4)
    assert all(read_result(os.path.join(r["run_dir"], "result.json"))["protocol"] == "tune" for r in tuned)
    finals = [read_result(os.path.join(out, "cifar", "final", f"seed{s}", "result.json")) for s in (0, 1)]
    assert [f["protocol"] for f in finals] == ["final", "final"]
    with open(os.path.join(out, "cifar", "final", "seed0", "config.json")) as f:
        assert json.load(f)["settings"]["lr"] == selection["lr"]

    rows = csv_rows(out)
    accs = [100 * f["accuracy"] for f in finals]
    assert float(rows["cifar"]["accuracy_mean_pct"]) == pytest.approx(statistics.mean(accs), abs=1e-3)
    assert float(rows["cifar"]["accuracy_std_pct"]) == pytest.approx(statistics.stdev(accs), abs=1e-3)
    assert rows["cifar"]["status"] == "done" and rows["cifar"]["seeds_done"] == "2"
    assert rows["dtd"]["status"] == "failed" and rows["kitti"]["status"] == "not found under ROOT"
    assert rows["Natural"]["status"] == "incomplete" and rows["Overall"]["accuracy_mean_pct"] == ""
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "Protocol **final** (VPT)" in md and "| Natural | cifar |" in md and "2/2" in md
    assert "- dtd: DataError:" in md and "| Natural | — | incomplete: 1 of 7 tasks |" in md
    with open(os.path.join(out, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # Again: every finished run is read back, none retrained.
    code, text, _ = run_cli(capsys, *args)
    assert code == 1 and "tune lr" not in text and "final seed" not in text
    # Fixed, dtd runs alone; a run cut short after its checkpoint is continued, not redone.
    with open(root / "dtd" / "test.txt") as f:
        lines = f.readlines()[:-1]
    with open(root / "dtd" / "test.txt", "w") as f:
        f.writelines(lines)
    os.remove(os.path.join(out, "cifar", "final", "seed1", "result.json"))
    code, text, err = run_cli(capsys, *args[:2], "--tasks", "dtd", "cifar", *args[2:])
    assert code == 0, err
    assert "final seed 1: " in text and "resumed" in text and not os.path.exists(os.path.join(out, "dtd", "error.txt"))
    rows = csv_rows(out)
    assert rows["dtd"]["status"] == "done" and rows["Natural"]["status"] == "incomplete"
    assert float(rows["cifar"]["accuracy_mean_pct"]) == pytest.approx(statistics.mean(accs), abs=1e-3)

    code, _, err = run_cli(capsys, *args, "--num-prompts", "4")
    assert code == 2 and "holds a suite run with other settings (num_prompts: 8 -> 4)" in err


def test_fgvc_suite_mean_and_max_test_label(tmp_path, capsys):
    root = tmp_path / "fgvc"
    make_fgvc(str(root / "CUB_200_2011"))
    out = str(tmp_path / "suite")
    code, text, err = run_cli(capsys, "fgvc", str(root), *SUITE, "--output", out, "--protocol", "max-test")
    assert code == 0, err
    run = read_result(os.path.join(out, "cub", "max-test", "seed0", "result.json"))
    assert run["protocol"] == "max-test" and "selected on the test set" in run["metric"]
    rows = csv_rows(out)
    assert float(rows["cub"]["accuracy_mean_pct"]) == pytest.approx(100 * run["accuracy"], abs=1e-3)
    assert rows["FGVC"]["status"] == "incomplete" and rows["nabirds"]["status"] == "not found under ROOT"
    with open(os.path.join(out, "results.md")) as f:
        assert "Protocol **max-test** (opt-in)" in f.read()


def test_suite_usage_errors(tmp_path, capsys):
    root = tmp_path / "vtab"
    make_vtab(str(root / "svhn"), per_split=2)
    code, _, err = run_cli(capsys, "vtab", str(root), "--output", str(tmp_path / "o"), "--grid")  # = --grid vpt
    assert code == 2 and "--grid vpt is VPT's SGD grid" in err and "--optimizer sgd" in err
    code, _, err = run_cli(capsys, "vtab", str(root), "--tasks", "mnist", "--output", str(tmp_path / "o"))
    assert code == 2 and "--tasks 'mnist' is not a VTAB-1k task; accepted: cifar, caltech101" in err
    code, _, err = run_cli(capsys, "vtab", str(tmp_path), "--output", str(tmp_path / "o"))
    assert code == 2 and "holds no VTAB-1k task directory; expected directories named cifar" in err


def test_train_task_option_offers_segmentation_only_when_it_exists(capsys):
    has_segmentation = importlib.util.find_spec("svpt.segmentation") is not None
    assert _tasks_available() == ["classification"] + (["segmentation"] if has_segmentation else [])
    if not has_segmentation:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--task", "segmentation"])
        assert exit_info.value.code == 2 and "invalid choice: 'segmentation'" in capsys.readouterr().err


def test_suite_stops_when_a_failure_leaves_the_device_unusable(tmp_path, capsys, monkeypatch):
    """A CUDA error that breaks the process's device (seen: an interrupted graph capture leaves
    CUDA's generator unusable) would fail every later task with the same confusing error: the
    suite says so once and stops; the same command in a new process continues."""
    from svpt.protocols import suite
    root = tmp_path / "vtab-1k"
    for name in ("cifar", "dtd", "eurosat"):
        make_vtab(str(root / name), per_split=4)
    real_run_task = suite._run_task

    def run_task(cfg, task, *rest):
        if task == "cifar":
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        return real_run_task(cfg, task, *rest)

    monkeypatch.setattr(suite, "_run_task", run_task)
    monkeypatch.setattr(suite, "_device_broken", lambda device: "RuntimeError: Offset increment outside graph capture")
    out = str(tmp_path / "suite")
    args = ["vtab", str(root), *SUITE, "--output", out]
    code, text, _ = run_cli(capsys, *args)
    assert code == 1 and "[1/3] cifar" in text and "[2/3]" not in text
    assert "dtd: not run" in text and "eurosat: not run" in text
    assert ("not run: the training device was left unusable by cifar's failure (RuntimeError: Offset increment "
            "outside graph capture); run the same command again in a new process") in text
    rows = csv_rows(out)
    assert [rows[t]["status"] for t in ("cifar", "dtd", "eurosat")] == ["failed"] * 3

    monkeypatch.setattr(suite, "_run_task", real_run_task)  # a new process: the device works again
    monkeypatch.setattr(suite, "_device_broken", lambda device: None)
    code, text, err = run_cli(capsys, *args)
    assert code == 0, err
    rows = csv_rows(out)
    assert [rows[t]["status"] for t in ("cifar", "dtd", "eurosat")] == ["done"] * 3

