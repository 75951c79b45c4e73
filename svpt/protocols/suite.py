"""Running a suite: find its tasks, check them, tune, train the final runs, write the table.

Layout of the suite directory (each run directory is an ordinary ``svpt train`` run)::

    suite.json                       the settings every run shares (checked on re-runs)
    <task>/tune/lr<lr>_wd<wd>/       one tune run per grid point (with --grid)
    <task>/selection.json            the grid's results and the chosen point
    <task>/<final|max-test>/seed<s>/ one reported run per seed
    <task>/error.txt                 why the task failed, until it succeeds
    results.md, results.csv, results.png

A run with ``result.json`` is done and not repeated; one with ``resume.pt`` is continued
from its last epoch; so running the same command again continues where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..checkpoint import atomic_write
from ..data import FGVC_TASKS, VTAB_TASKS, DataError, FgvcSource, Task, VtabSource, find_task, open_data
from ..data.fgvc import is_fgvc_dir
from ..data.folders import is_vtab_dir
from ..data.tasks import FGVC_GROUPS, VTAB_GROUPS
from ..training import ConfigError, TrainConfig, train
from ..training.config import RESUME_MAY_CHANGE
from ..training.loop import RESULT_FILE, BackboneCache
from ..training.protocol import make_plan
from ..training.state import RESUME_FILE
from .tables import Summary, TaskRow, write_tables

VPT_GRID_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)  # x batch / 256, SGD
VPT_GRID_WDS = (0.01, 0.001, 0.0001, 0.0)
SUITE_FILE, SELECTION_FILE, ERROR_FILE = "suite.json", "selection.json", "error.txt"
SELECTION_RULE = ("the highest validation accuracy after the last epoch; ties: the smaller lr, then the "
                  "larger weight decay (as VPT's tune_vtab.py)")


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    tasks: tuple[Task, ...]
    groups: tuple[str, ...]
    is_layout: Callable[[str], bool]
    source_type: type
    layout: str

    @property
    def default_augment(self) -> str:
        return self.source_type.default_augment


SUITES = {
    "vtab": Suite("vtab", "VTAB-1k", VTAB_TASKS, VTAB_GROUPS, is_vtab_dir, VtabSource,
                  "a VTAB-1k list directory (train800.txt, val200.txt, train800val200.txt, test.txt)"),
    "fgvc": Suite("fgvc", "FGVC", FGVC_TASKS, FGVC_GROUPS, is_fgvc_dir, FgvcSource,
                  "an FGVC directory with VPT's splits (train.json, val.json, test.json)"),
}


@dataclass
class SuiteConfig:
    suite: str
    root: str
    base: TrainConfig                  # every setting the runs share; data, protocol, seed, output are per run
    output: str | None = None          # None: runs/<suite>-<model>-<method>-M<prompts>
    tasks: list[str] | None = None     # None: every task found under root
    protocol: str = "final"            # of the reported runs: final or max-test
    grid: str = "none"                 # none or vpt
    grid_lrs: list[float] | None = None
    grid_wds: list[float] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])

    def check(self) -> "SuiteConfig":
        if self.suite not in SUITES:
            raise ConfigError(f"suite {self.suite!r} is not accepted; accepted: {', '.join(SUITES)}")
        if self.protocol not in ("final", "max-test"):
            raise ConfigError(f"--protocol {self.protocol!r} is not accepted for a suite's reported runs; "
                              "accepted: final, max-test (tune runs are what --grid runs)")
        if self.grid not in ("none", "vpt"):
            raise ConfigError(f"--grid {self.grid!r} is not accepted; accepted: none, vpt")
        if self.grid == "vpt" and (self.grid_lrs or self.grid_wds):
            raise ConfigError("--grid vpt and --grid-lrs/--grid-wds exclude each other; give one grid")
        if self.grid == "vpt" and self.base.optimizer != "sgd":
            raise ConfigError("--grid vpt is VPT's SGD grid (lr up to 50 x batch/256); add --optimizer sgd, "
                              "or give your own --grid-lrs / --grid-wds")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds {self.seeds}: give one or more distinct seeds")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("svpt vtab/fgvc runs in one process; to use several GPUs, run one command per GPU "
                              "with --tasks and --device cuda:N on the same --output")
        self.base.check()
        return self

    @property
    def spec(self) -> Suite:
        return SUITES[self.suite]

    def grid_points(self) -> list[tuple[float, float]]:
        """(lr, weight decay) of the tune runs; empty without a grid."""
        if self.grid == "vpt":
            scale = self.base.batch_size / 256  # VPT scales its grid's lr by batch / 256
            return [(lr * scale, wd) for lr in VPT_GRID_LRS for wd in VPT_GRID_WDS]
        if self.grid_lrs or self.grid_wds:
            return [(lr, wd) for lr in self.grid_lrs or [self.base.lr]
                    for wd in self.grid_wds or [self.base.weight_decay]]
        return []

    def output_dir(self) -> str:
        model = self.base.model or "quickstart"
        return self.output or os.path.join("runs", f"{self.suite}-{model}-{self.base.method}-M{self.base.num_prompts}")

    def shared_settings(self) -> dict:
        """What must be the same for every run in the suite directory (suite.json)."""
        # Per run, or free to differ (device: one process per GPU may share a suite directory).
        ignored = {*RESUME_MAY_CHANGE, "data", "protocol", "train_split", "eval_split", "seed", "output", "device"}
        if self.grid_points():
            ignored |= {"lr", "weight_decay"}
        train_settings = {k: v for k, v in self.base.to_json().items() if k not in ignored}
        return json.loads(json.dumps({"suite": self.suite, "grid": self.grid_points(), "train": train_settings}))


@dataclass
class SuiteOutcome:
    output: str
    rows: list[TaskRow]
    failed: dict[str, str]  # task -> error


# ---------------------------------------------------------------- tasks
def discover(suite: Suite, root: str) -> tuple[dict[str, str], list[str]]:
    """{task name: directory} of the suite's tasks under ``root``, and the other entries."""
    if not os.path.isdir(root):
        raise DataError(f"{root!r} is not a directory; give the directory holding one directory per "
                        f"{suite.title} task")
    found: dict[str, str] = {}
    ignored = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        task = find_task(suite.tasks, entry.name)
        if task is None:
            ignored.append(entry.name)
        elif task.name in found:
            raise DataError(f"{root} holds two directories for the task {task.name}: "
                            f"{os.path.basename(found[task.name])} and {entry.name}")
        else:
            found[task.name] = entry.path
    if not found:
        raise DataError(f"{root} holds no {suite.title} task directory; expected directories named "
                        f"{', '.join(t.name for t in suite.tasks)}")
    return found, ignored


def _selected(cfg: SuiteConfig, found: dict[str, str]) -> list[str]:
    if not cfg.tasks:
        return [t.name for t in cfg.spec.tasks if t.name in found]
    names = []
    for given in cfg.tasks:
        task = find_task(cfg.spec.tasks, given)
        if task is None:
            raise ConfigError(f"--tasks {given!r} is not a {cfg.spec.title} task; accepted: "
                              f"{', '.join(t.name for t in cfg.spec.tasks)}")
        if task.name not in found:
            raise ConfigError(f"--tasks {given!r}: no directory for {task.name} under {cfg.root}")
        names.append(task.name)
    return list(dict.fromkeys(names))


def check_task(cfg: SuiteConfig, task_dir: str) -> None:
    """Lists, labels and files of every split the task's runs will read, before any training."""
    if not cfg.spec.is_layout(task_dir):
        raise DataError(f"{task_dir} is not {cfg.spec.layout}")
    source = open_data(task_dir)
    plans = [make_plan(source, cfg.protocol)] + ([make_plan(source, "tune")] if cfg.grid_points() else [])
    for plan in plans:
        for split in (plan.train_split, plan.eval_split):
            source.validate(split)


def _check_suite_file(cfg: SuiteConfig, out: str) -> None:
    path, ours = os.path.join(out, SUITE_FILE), cfg.shared_settings()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != ours:
            diff = [f"{k}: {saved['train'].get(k)!r} -> {v!r}" for k, v in ours["train"].items()
                    if saved["train"].get(k) != v]
            if saved["grid"] != ours["grid"]:
                diff.append("the lr / weight-decay grid")
            raise ConfigError(f"{out} holds a suite run with other settings ({'; '.join(diff) or 'suite'}); "
                              "its results would not form one table: give another --output")
        return
    os.makedirs(out, exist_ok=True)
    atomic_write(path, json.dumps(ours, indent=2).encode())


# ---------------------------------------------------------------- runs
def _run(run_cfg: TrainConfig, cache: BackboneCache, say, label: str) -> dict:
    """One run, skipped when done, continued when it has a checkpoint; its output goes to
    train.log in its directory."""
    run_dir = run_cfg.output
    done = os.path.join(run_dir, RESULT_FILE)
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    resume = os.path.isfile(os.path.join(run_dir, RESUME_FILE))
    os.makedirs(run_dir, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        result = train(run_cfg, resume=resume, cache=cache)
    say(f"  {label}: {100 * result['accuracy']:.2f}%, {result['metric']} "
        f"({time.perf_counter() - start:.1f} s{', resumed' if resume else ''})")
    return result


def _tune(cfg: SuiteConfig, task: str, task_dir: str, out: str, cache: BackboneCache, say) -> tuple[float, float]:
    runs = []
    for lr, wd in cfg.grid_points():
        run_cfg = dataclasses.replace(cfg.base, data=task_dir, protocol="tune", lr=lr, weight_decay=wd,
                                      seed=cfg.seeds[0], progress="none",
                                      output=os.path.join(out, task, "tune", f"lr{lr!r}_wd{wd!r}"))
        result = _run(run_cfg, cache, say, f"tune lr {lr:g} wd {wd:g}")
        runs.append({"lr": lr, "weight_decay": wd, "accuracy": result["accuracy"], "metric": result["metric"],
                     "run_dir": run_cfg.output})
    best = max(runs, key=lambda r: (r["accuracy"], -r["lr"], r["weight_decay"]))
    selection = {"rule": SELECTION_RULE, "lr": best["lr"], "weight_decay": best["weight_decay"],
                 "accuracy": best["accuracy"], "runs": runs}
    atomic_write(os.path.join(out, task, SELECTION_FILE), json.dumps(selection, indent=2).encode())
    say(f"  selected lr {best['lr']:g}, weight decay {best['weight_decay']:g} "
        f"({100 * best['accuracy']:.2f}% {best['metric']})")
    return best["lr"], best["weight_decay"]


def final_run_dir(out: str, task: str, protocol: str, seed: int) -> str:
    return os.path.join(out, task, protocol, f"seed{seed}")


def _run_task(cfg: SuiteConfig, task: str, task_dir: str, out: str, cache: BackboneCache, say) -> None:
    lr, wd = _tune(cfg, task, task_dir, out, cache, say) if cfg.grid_points() else (cfg.base.lr, cfg.base.weight_decay)
    for seed in cfg.seeds:
        run_cfg = dataclasses.replace(cfg.base, data=task_dir, protocol=cfg.protocol, lr=lr, weight_decay=wd,
                                      seed=seed, progress="none", output=final_run_dir(out, task, cfg.protocol, seed))
        _run(run_cfg, cache, say, f"{cfg.protocol} seed {seed}")


def _fail(out: str, task: str, exc: Exception, say) -> str:
    message = f"{type(exc).__name__}: {exc}"
    os.makedirs(os.path.join(out, task), exist_ok=True)
    atomic_write(os.path.join(out, task, ERROR_FILE), (message + "\n").encode())
    say(f"  FAILED: {message}")
    return message


def run_suite(cfg: SuiteConfig, say=print) -> SuiteOutcome:
    """Every selected task of the suite under ``cfg.root``: checked first, then tuned and
    trained one after the other. A task that fails is reported and the others go on.
    Writes the tables after every task. Returns them and the failures."""
    cfg.check()
    found, ignored = discover(cfg.spec, cfg.root)
    selected = _selected(cfg, found)
    out = cfg.output_dir()
    _check_suite_file(cfg, out)
    say(f"{cfg.spec.title} under {cfg.root}: {len(found)} tasks found ({', '.join(found)})"
        + (f"; ignored: {', '.join(ignored)}" if ignored else "") + f"; running {len(selected)}; suite directory {out}")
    say(f"each task: {_plan_words(cfg)}")
    failed: dict[str, str] = {}
    checked = []
    for task in selected:  # every task's data is checked before the first one trains
        try:
            check_task(cfg, found[task])
            checked.append(task)
        except (ValueError, OSError) as exc:  # DataError, ConfigError, an unreadable list
            say(f"{task}: not run")
            failed[task] = _fail(out, task, exc, say)
    cache = BackboneCache()
    for number, task in enumerate(checked, 1):
        say(f"[{number}/{len(checked)}] {task}")
        try:
            _run_task(cfg, task, found[task], out, cache, say)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out, task, ERROR_FILE))
        except Exception as exc:  # noqa: BLE001 - a failing task (bad image, OOM, ...) is reported, the rest go on
            failed[task] = _fail(out, task, exc, say)
            broken = _device_broken(cfg.base.device)
            if broken:  # every later task would fail the same way
                for rest in checked[number:]:
                    say(f"{rest}: not run")
                    failed[rest] = _fail(out, rest, RuntimeError(
                        f"not run: the training device was left unusable by {task}'s failure ({broken}); run the "
                        "same command again in a new process to continue (finished runs are kept)"), say)
                break
        write_results(cfg, out, found, failed)  # after every task: a stopped suite still has its table
    rows, _ = write_results(cfg, out, found, failed)
    say(f"results: {os.path.join(out, 'results.md')}, {os.path.join(out, 'results.csv')}, "
        f"{os.path.join(out, 'results.png')}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return SuiteOutcome(out, rows, failed)


# ---------------------------------------------------------------- the table
def _hyperparameters(cfg: SuiteConfig, out: str, task: str) -> tuple[float | None, float | None, str]:
    points = cfg.grid_points()
    if not points:
        return cfg.base.lr, cfg.base.weight_decay, "given"
    path = os.path.join(out, task, SELECTION_FILE)
    if not os.path.isfile(path):
        return None, None, "grid not finished" if os.path.isdir(os.path.join(out, task, "tune")) else "—"
    with open(path, encoding="utf-8") as f:
        selection = json.load(f)
    return selection["lr"], selection["weight_decay"], f"val grid ({len(points)} runs)"


def _row(cfg: SuiteConfig, out: str, task: Task, found: dict[str, str], failed: dict[str, str]) -> TaskRow:
    accuracies, seeds, metric = [], [], ""
    for seed in cfg.seeds:
        path = os.path.join(final_run_dir(out, task.name, cfg.protocol, seed), RESULT_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
            accuracies.append(result["accuracy"])
            seeds.append(seed)
            metric = result["metric"]
    error = failed.get(task.name, "")
    error_file = os.path.join(out, task.name, ERROR_FILE)
    if not error and os.path.isfile(error_file):
        with open(error_file, encoding="utf-8") as f:
            error = f"(an earlier invocation) {f.read().strip()}"
    if task.name not in found:
        status = "not found under ROOT"
    elif error:
        status = "failed"
    else:
        status = "done" if len(seeds) == len(cfg.seeds) else "partial" if seeds else "not run"
    lr, wd, how = _hyperparameters(cfg, out, task.name)
    return TaskRow(task.name, task.group, status, accuracies, seeds, len(cfg.seeds), lr, wd, how, metric, error)


def _header(cfg: SuiteConfig) -> list[str]:
    b = cfg.base
    weights = f", weights {b.weights}" if b.weights else ", random-init backbone (no --weights)"
    if cfg.protocol == "final":
        protocol = (f"Protocol **final** (VPT): every reported run trains on train800val200 (FGVC: train+val) for "
                    f"{b.epochs} epochs and evaluates test once, after the last epoch; nothing is selected on test.")
    else:
        protocol = (f"Protocol **max-test** (opt-in): each number is the MAXIMUM test accuracy over {b.epochs} "
                    "epochs, i.e. model selection on the test set, as NOAH-lineage tables report; it is not "
                    "comparable with numbers from VPT's protocol.")
    points = cfg.grid_points()
    hyper = (f"Hyper-parameters per task: {len(points)} tune runs (train800 -> val200; FGVC: train -> val), "
             f"selected by {SELECTION_RULE}." if points else
             f"Hyper-parameters: lr {b.lr:g}, weight decay {b.weight_decay:g} for every task (given, not tuned).")
    return [f"# {cfg.spec.title}: {b.method} (M = {b.num_prompts}) on {b.model or 'the quick-start ViT'}{weights}",
            "", protocol, hyper,
            f"Seeds {', '.join(map(str, cfg.seeds))}: accuracy is the mean ± sample standard deviation (n - 1) over "
            "the finished seeds (column seeds).",
            f"Optimiser {b.optimizer}, batch {b.batch_size}, {b.epochs} epochs ({b.warmup_epochs:g} warm-up), "
            f"augmentation {b.augment or cfg.spec.default_augment}, image size {b.img_size or 'the model default'}."]


def write_results(cfg: SuiteConfig, out: str, found: dict[str, str],
                  failed: dict[str, str]) -> tuple[list[TaskRow], list[Summary]]:
    rows = [_row(cfg, out, task, found, failed) for task in cfg.spec.tasks]
    label = "max over epochs (selected on test)" if cfg.protocol == "max-test" else "final protocol"
    title = f"{cfg.spec.title}, {cfg.base.method} M={cfg.base.num_prompts}, {label}"
    return rows, write_tables(rows, cfg.spec.groups, out, _header(cfg), cfg.protocol, title)


def _plan_words(cfg: SuiteConfig) -> str:
    points = cfg.grid_points()
    tune = (f"{len(points)} tune runs (lr x weight decay; train800/train -> val200/val, seed {cfg.seeds[0]}), "
            f"selected by {SELECTION_RULE}; then " if points else
            f"lr {cfg.base.lr:g}, weight decay {cfg.base.weight_decay:g} as given; ")
    reported = ("final runs: train800val200/train+val -> test once, after the last epoch" if cfg.protocol == "final"
                else "max-test runs: train800val200/train+val, the MAXIMUM test accuracy over epochs "
                     "(selection on the test set, not VPT's protocol)")
    return f"{tune}{reported}, seeds {', '.join(map(str, cfg.seeds))}, {cfg.base.epochs} epochs"


def _device_broken(device: str | None) -> str | None:
    """After a task's failure: frees its cached GPU memory and says why the training device can
    run nothing more in this process, or None. Some CUDA errors leave the context or its random
    number generator unusable (e.g. an interrupted graph capture: "Offset increment outside graph
    capture"), and every later task would then fail with the same confusing error."""
    import torch
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    try:
        torch.cuda.empty_cache()
        torch.randn(1, device=device or "cuda")
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the device is unusable
        return f"{type(exc).__name__}: {exc}".strip()
    return None
