"""Wall time of VTAB-1k-shaped work end to end (issue 15): one 100-epoch final run, and
``svpt vtab`` over 19 such tasks.

    python benchmarks/vtab_timing.py single OUT_DIR            # one task, twice (cold, then warm caches)
    python benchmarks/vtab_timing.py suite OUT_DIR --part 1/2  # svpt vtab, tasks 1-10 of 19
    python benchmarks/vtab_timing.py suite OUT_DIR --part 2/2  # tasks 11-19, the table, the total

Data: generated here (no download), once, under WORK (default runs/vtab_timing, kept between
invocations on the same machine): 11,000 224 x 224 JPEGs (1,000 training, 10,000 test) in the
VTAB-1k list layout (train800.txt, val200.txt, train800val200.txt, test.txt of "path label"
lines); the 19 task directories share the images through a symlink and have their own lists
(labels in range of each task's class count). Model: ViT-B/16 (random init; no download),
SVPT M = 50, batch 64, 100 epochs, SGD, bf16 autocast, backend auto, final protocol (train
train800val200, test evaluated once after the last epoch). Every time is the wall time of a
``python -m svpt ...`` process, start-up included. The suite is split in parts because one
device command may run 10 minutes at most; part 2 adds part 1's recorded wall time (same
WORK) for the 19-task total. Writes OUT_DIR/vtab_timing_<mode>.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from loader_vs_step import step_rate  # noqa: E402
from svpt.data import VTAB_TASKS  # noqa: E402

TRAIN, TEST, SIZE, CLASSES = 1000, 10_000, 224, 4
RUN = ["--model", "vit_base_patch16_224", "--method", "svpt", "--num-prompts", "50", "--batch-size", "64",
       "--epochs", "100", "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "0.0001", "--warmup-epochs", "10",
       "--backend", "auto"]


# ---------------------------------------------------------------- data
def _write(job):
    path, label, seed = job
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    angle = label * np.pi / CLASSES + rng.uniform(-0.1, 0.1)
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * rng.uniform(0.1, 0.3) + rng.uniform(0, 6.3))
    colour = rng.uniform(0.3, 1.0, 3)
    img = (0.5 + 0.4 * stripes[..., None] * colour + rng.normal(0, 0.05, (SIZE, SIZE, 3))).clip(0, 1)
    Image.fromarray((img * 255).astype(np.uint8)).save(path, quality=90)


def make_data(work: Path) -> tuple[Path, float]:
    """The 19 task directories under work/vtab (images generated once); seconds spent."""
    images, root, done = work / "images", work / "vtab", work / "vtab" / ".complete"
    if done.exists():
        return root, 0.0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    labels = {"train": rng.integers(0, CLASSES, TRAIN), "test": rng.integers(0, CLASSES, TEST)}
    jobs = []
    for split, split_labels in labels.items():
        (images / split).mkdir(parents=True, exist_ok=True)
        jobs += [(str(images / split / f"{i:05d}.jpg"), int(c), (split == "test") * 10**6 + i)
                 for i, c in enumerate(split_labels)]
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_write, jobs, chunksize=64)
    for task in VTAB_TASKS:
        d = root / task.name
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "images").exists():
            (d / "images").symlink_to(images.resolve(), target_is_directory=True)

        def lines(split, idx):
            return "".join(f"images/{split}/{i:05d}.jpg {labels[split][i] % task.num_classes}\n" for i in idx)
        (d / "train800.txt").write_text(lines("train", range(800)))
        (d / "val200.txt").write_text(lines("train", range(800, TRAIN)))
        (d / "train800val200.txt").write_text(lines("train", range(TRAIN)))
        (d / "test.txt").write_text(lines("test", range(TEST)))
    done.touch()
    return root, time.perf_counter() - start


# ---------------------------------------------------------------- runs
def _environment(work: Path) -> dict:
    """The svpt processes' environment: where Python may not write bytecode next to the
    installed packages (PYTHONDONTWRITEBYTECODE, as on the device machine), it keeps it under
    WORK, so that only the first process compiles torch's and timm's sources, as after a pip install."""
    env = dict(os.environ)
    if env.get("PYTHONDONTWRITEBYTECODE"):
        env.setdefault("PYTHONPYCACHEPREFIX", str(work / "pycache"))
    return env


def timed(cmd: list[str], log: Path, timeout: float, work: Path) -> tuple[float, int, str]:
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, timeout=timeout,
                                env=_environment(work)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return time.perf_counter() - start, rc, log.read_text()


def single_run_facts(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = json.loads((run_dir / "result.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())["resolved"]
    decode = [float(m) for line in config["batches"] for m in re.findall(r"decoded once in ([\d.]+) s", line)]
    steady = rows[1:] or rows  # after the first epoch (Triton compiles and tunes in it)
    return {"epochs": len(rows), "first_epoch_s": rows[0]["train_s"],
            "median_epoch_s": statistics.median(r["train_s"] for r in steady),
            "sum_epoch_train_s": sum(r["train_s"] for r in rows),
            "median_img_per_s": statistics.median(r["img_per_s"] for r in steady),
            "final_eval_s": result["eval_s"], "decode_s": sum(decode),
            "test_accuracy": result["accuracy"], "metric": result["metric"], "backend_line": config["batches"],
            "training_steps": config.get("training_steps")}


def run_single(work: Path, out: Path, budget: float, attempts: int, bare_step: bool) -> dict:
    root, data_s = make_data(work)
    report = {"data_generation_s": data_s, "runs": []}
    for attempt in ("first process", "second process")[:attempts]:
        run_dir = work / f"single_{len(report['runs'])}"
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        cmd = [sys.executable, "-m", "svpt", "train", "--data", str(root / "cifar"), *RUN, "--output", str(run_dir),
               "--progress", "none"]
        wall, rc, text = timed(cmd, out / f"single_{len(report['runs'])}.log", budget, work)
        entry = {"attempt": attempt, "wall_s": wall, "rc": rc, "command": " ".join(cmd[1:])}
        if rc == 0:
            entry.update(single_run_facts(run_dir))
            entry["outside_epochs_and_eval_s"] = wall - entry["sum_epoch_train_s"] - entry["final_eval_s"]
        else:
            entry["log_tail"] = text[-3000:]
        report["runs"].append(entry)
        if rc != 0:
            break
    if bare_step:
        report["bare_step_img_per_s_batch64"] = step_rate(batch=64, iters=30)[0]  # the fused step alone, no data
    return report


def run_suite(work: Path, out: Path, part: str, budget: float) -> dict:
    root, data_s = make_data(work)
    index, parts = (int(x) for x in part.split("/"))
    names = [t.name for t in VTAB_TASKS]
    size = -(-len(names) // parts)
    tasks = names[(index - 1) * size:index * size]
    cmd = [sys.executable, "-m", "svpt", "vtab", str(root), *RUN, "--output", str(work / "suite"), "--tasks", *tasks]
    wall, rc, text = timed(cmd, out / f"suite_part{index}.log", budget, work)
    per_run = [float(s) for s in re.findall(r"final seed 0: .*\(([\d.]+) s\)", text)]
    state_file = work / "suite_parts.json"
    parts_done = json.loads(state_file.read_text()) if state_file.exists() else {}
    parts_done[str(index)] = {"tasks": tasks, "wall_s": wall, "rc": rc, "runs_s": per_run}
    state_file.write_text(json.dumps(parts_done, indent=2))
    report = {"data_generation_s": data_s, "part": part, "tasks": tasks, "wall_s": wall, "rc": rc,
              "per_task_run_s": per_run, "command": " ".join(cmd[1:]), "parts_recorded": parts_done}
    if len(parts_done) == parts:
        report["total_19_tasks_wall_s"] = sum(p["wall_s"] for p in parts_done.values())
        report["results_md"] = (work / "suite" / "results.md").read_text()
    if rc != 0:
        report["log_tail"] = text[-3000:]
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["single", "suite"])
    p.add_argument("out", type=Path)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "vtab_timing")
    p.add_argument("--part", default="1/2", help="suite: which part of the 19 tasks, e.g. 1/2")
    p.add_argument("--budget-s", type=float, default=560, help="stop a svpt process after this long")
    p.add_argument("--attempts", type=int, choices=(1, 2), default=2, help="single: processes to time")
    p.add_argument("--no-bare-step", dest="bare_step", action="store_false",
                   help="single: skip timing the bare fused step (benchmarks/cuda_graph_step.py times it)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    report = run_single(args.work, args.out, args.budget_s, args.attempts, args.bare_step) \
        if args.mode == "single" else \
        run_suite(args.work, args.out, args.part, args.budget_s)
    report = {**meta, **report}
    name = f"vtab_timing_{args.mode}" + (f"_part{args.part.split('/')[0]}" if args.mode == "suite" else "")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(f"# {meta['device']}, {meta['cpus']} CPUs, torch {meta['torch']}; data generated in "
          f"{report['data_generation_s']:.1f} s (0: already there)")
    if args.mode == "single":
        for r in report["runs"]:
            print(f"{r['attempt']:15s} wall {r['wall_s']:6.1f} s  rc {r['rc']}", end="")
            if r["rc"] == 0:
                print(f"  | epochs: first {r['first_epoch_s']:.2f} s, median {r['median_epoch_s']:.3f} s "
                      f"({r['median_img_per_s']:.0f} img/s), sum {r['sum_epoch_train_s']:.1f} s | decode "
                      f"{r['decode_s']:.1f} s | final test eval {r['final_eval_s']:.1f} s | test acc "
                      f"{r['test_accuracy']:.4f} | everything else (imports, model, data, exit) {r['outside_epochs_and_eval_s']:.1f} s")
            else:
                print("\n" + r["log_tail"])
        if "bare_step_img_per_s_batch64" in report:
            rate = report["bare_step_img_per_s_batch64"]
            print(f"bare fused step, batch 64: {rate:.0f} img/s (100 epochs x 1000 images at that rate: {1e5 / rate:.1f} s)")
        print("target: <= 45 s wall for the single 100-epoch task, start-up included")
    else:
        print(f"part {report['part']}: {len(report['tasks'])} tasks, wall {report['wall_s']:.1f} s, rc {report['rc']}, "
              f"runs {', '.join(f'{s:.1f}' for s in report['per_task_run_s'])} s")
        if "total_19_tasks_wall_s" in report:
            print(f"19 tasks, all parts: {report['total_19_tasks_wall_s']:.1f} s "
                  f"({report['total_19_tasks_wall_s'] / 60:.1f} min; target <= 15 min)")
            print(report["results_md"])
        else:
            print(f"parts recorded so far: {', '.join(sorted(report['parts_recorded']))}")
        if report["rc"] != 0:
            print(report["log_tail"])


if __name__ == "__main__":
    main()
