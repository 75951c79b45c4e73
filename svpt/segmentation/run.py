"""``svpt.segmentation.train`` / ``evaluate``: prompts and a decoder on a frozen ViT, ADE20K-style.

A run directory holds ``config.json`` (settings and what they resolved to), ``metrics.jsonl``
(one line per evaluation: mIoU, mAcc, aAcc, training loss), ``steps.jsonl`` (loss and learning
rates every ``log_every`` iterations), ``segmentation_last.safetensors`` /
``segmentation_best.safetensors`` (prompts, heads and decoder) and ``resume.pt`` (everything a
resumed run needs to continue exactly: trainables, optimizer, iteration, RNG states), all
written atomically. The data stream is a function of the seed and the sample's position, so
a resumed run sees the batches and augmentations an uninterrupted run would.

Under ``torch.distributed`` (initialised by the caller, e.g. ``torchrun``), each process takes
its share of every global batch, the model runs in DDP (decoder BatchNorm synchronised on
CUDA), evaluation is sharded and its confusion matrices summed; rank 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .. import backends
from ..checkpoint import atomic_write
from ..prompting import prompt, summary
from ..training import backbone as timm_backbone
from ..training.config import ConfigError, TrainConfig
from ..training.config import read_run_config as read_config_json
from ..training.records import read_jsonl
from ..training.state import RESUME_FILE, load_resume, rng_state, save_resume, set_rng_state
from ..training.steps import autocast
from .data import BUILTIN_SIZE, open_split
from .decoders import DECODERS
from .inference import MULTI_SCALE_RATIOS, ConfusionMatrix, TestPipeline
from .model import SegmentationModel, load_checkpoint, save_checkpoint
from .transforms import TrainPipeline

log = logging.getLogger("svpt.segmentation")

LAST, BEST = "segmentation_last.safetensors", "segmentation_best.safetensors"
METRICS, STEPS, CONFIG = "metrics.jsonl", "steps.jsonl", "config.json"
TASK = "segmentation"
QUICKSTART_MODEL = "test_vit"  # timm's 6-block, width-64 ViT/16: 8 x 8 tokens on 128-pixel crops

# Settings left as None take these defaults: mmseg's SETR-PUP ADE20K recipe (CVPT's: SGD, lr
# 1e-3, heads x10, poly to 1e-4, 160k iterations of 16 crops of 512) for a data directory; a
# seconds-long version of it for the built-in task.
ADE20K_DEFAULTS = dict(crop_size=512, train_scale=(2048, 512), stride=341, decoder_channels=256, iterations=160_000,
                       batch_size=16, lr=1e-3, min_lr=1e-4, eval_every=16_000, checkpoint_every=2_000, log_every=50)
BUILTIN_DEFAULTS = dict(crop_size=BUILTIN_SIZE, train_scale=(4 * BUILTIN_SIZE, BUILTIN_SIZE), stride=85,
                        decoder_channels=32, iterations=120, batch_size=8, lr=0.01, min_lr=1e-4, eval_every=120,
                        checkpoint_every=40, log_every=10)
# Settings that may differ when a run is resumed: they do not change what is computed.
RESUME_MAY_CHANGE = ("workers", "threads", "stop_after_iteration", "output")


@dataclass
class SegmentationConfig:
    # model
    model: str | None = None          # timm name; None: the quick-start model (timm's test_vit, random init)
    model_kwargs: dict = field(default_factory=dict)
    weights: str | None = None        # backbone weights file (svpt.training.backbone.load_weights formats)
    method: str = "svpt"
    num_prompts: int = 10
    options: dict = field(default_factory=dict)
    backend: str = "auto"
    grad_checkpointing: bool = False
    # decoder
    decoder: str = "setr-pup"         # or "linear"
    decoder_channels: int | None = None
    out_indices: list | None = None   # None: (9, 14, 19, 23) for 24 blocks, the same fractions otherwise
    aux_weight: float = 0.4           # 0: no auxiliary heads
    # data
    data: str | None = None           # None: the built-in generated task; else an ADE20K-layout directory
    num_classes: int | None = None    # None: 150 for a directory
    reduce_zero_label: bool = True
    crop_size: int | None = None
    train_scale: list | None = None   # (long, short) bound of mmseg's RandomResize before ratio_range
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    limit_train: int | None = None
    limit_eval: int | None = None
    # optimisation
    iterations: int | None = None
    batch_size: int | None = None     # global: split evenly over the processes
    optimizer: str = "sgd"
    lr: float | None = None           # the prompts'; the heads' is lr * head_lr_mult
    head_lr_mult: float = 10.0
    min_lr: float | None = None
    poly_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 0.0
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    seed: int = 0
    # evaluation
    eval_every: int | None = None
    stride: int | None = None         # sliding-window stride (crop_size windows)
    test_scale: list | None = None    # None: train_scale
    multi_scale: bool = False         # ratios MULTI_SCALE_RATIOS of test_scale, probabilities averaged
    flip: bool = False
    # run
    output: str | None = None
    checkpoint_every: int | None = None
    log_every: int | None = None
    workers: int | None = None
    threads: int | None = None        # CPU intra-op threads; None: 1 for the quick-start model, else torch's
    device: str | None = None
    stop_after_iteration: int | None = None

    def check(self) -> "SegmentationConfig":
        from ..methods import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not accepted; accepted: {', '.join(METHODS)}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder {self.decoder!r} is not accepted; accepted: {', '.join(DECODERS)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer {self.optimizer!r} is not accepted; accepted: sgd, adamw")
        for name in ("num_prompts", "decoder_channels", "num_classes", "crop_size", "iterations", "batch_size",
                     "eval_every", "stride", "checkpoint_every", "log_every", "limit_train", "limit_eval",
                     "threads", "stop_after_iteration"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} is not accepted; it must be an integer >= 1")
        for name in ("lr", "min_lr", "head_lr_mult", "poly_power"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value!r} is not accepted; it must be > 0")
        for name in ("aux_weight", "weight_decay", "momentum", "flip_prob", "cat_max_ratio"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not accepted; it must be >= 0")
        for name in ("train_scale", "test_scale", "ratio_range"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not all(v > 0 for v in value)):
                raise ConfigError(f"{name}={value!r} is not accepted; give two positive numbers")
        return self

    def resolved(self) -> dict[str, Any]:
        """Every setting with the data's defaults filled in where it is None."""
        defaults = BUILTIN_DEFAULTS if self.data is None else ADE20K_DEFAULTS
        values = {k: (defaults[k] if v is None and k in defaults else v) for k, v in self.to_json().items()}
        values["test_scale"] = values["test_scale"] or values["train_scale"]
        values["model"] = self.model or QUICKSTART_MODEL
        if values["stride"] > values["crop_size"]:
            raise ConfigError(f"stride={values['stride']} is larger than crop_size={values['crop_size']}: "
                              "the sliding windows would leave pixels out")
        return values

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples as lists, as read back

    # The classification config's reader: it rejects unknown settings for any dataclass.
    from_json = classmethod(TrainConfig.from_json.__func__)


# ---------------------------------------------------------------- processes
@dataclass
class _Process:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _gather(obj: Any, proc: _Process) -> list[Any]:
    if proc.world == 1:
        return [obj]
    out: list[Any] = [None] * proc.world
    dist.all_gather_object(out, obj)
    return out


def _process(device: str | None) -> _Process:
    active = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if active else (0, 1)
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda": this process's GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return _Process(rank, world, device)


def _autocast(proc: _Process, amp: bool):
    """A factory of the run's autocast context (training.steps.autocast: bf16 on CUDA)."""
    return partial(autocast, proc.device, amp)


# ---------------------------------------------------------------- model
def build_model(cfg: SegmentationConfig, values: dict, num_classes: int, device: torch.device) -> SegmentationModel:
    """The timm backbone (random init, or ``weights``) at ``crop_size``, prompted on ``backend``,
    with the decoder. Draws the prompts' and decoder's initial values from the global RNG."""
    try:
        backends.set_backend(cfg.backend)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"backend {cfg.backend!r}: {exc}") from None
    name, _, net = timm_backbone.create_backbone(values["model"], cfg.model_kwargs, values["crop_size"])
    if cfg.weights:
        timm_backbone.load_weights(net, cfg.weights, name)
    try:
        prompt(net, cfg.method, cfg.num_prompts, num_classes=0, **cfg.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"svpt.prompt: {exc}") from None
    log.info(summary(net))
    net.set_grad_checkpointing(cfg.grad_checkpointing)
    try:
        model = SegmentationModel(net, num_classes, cfg.decoder, cfg.out_indices, values["decoder_channels"],
                                  cfg.aux_weight)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return model.to(device)


def _optimizer(model: SegmentationModel, cfg: SegmentationConfig, values: dict) -> torch.optim.Optimizer:
    prompts = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": prompts, "lr": values["lr"]}, {"params": model.head_parameters(),
                                                        "lr": values["lr"] * cfg.head_lr_mult}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=values["lr"], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=values["lr"], weight_decay=cfg.weight_decay)


def poly_factor(iteration: int, initial: float, total: int, min_lr: float, power: float) -> float:
    """mmengine's PolyLR as a factor of ``initial``: ``((initial - min_lr) (1 - t / T) ** power + min_lr) / initial``."""
    return ((initial - min_lr) * (1 - iteration / total) ** power + min_lr) / initial


def _poly_schedule(optimizer: torch.optim.Optimizer, total: int, min_lr: float, power: float):
    """Each group from its own learning rate down to ``min_lr``, stepped every iteration."""
    factors = [partial(poly_factor, initial=g["lr"], total=total, min_lr=min_lr, power=power)
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


# ---------------------------------------------------------------- data
def _limited(ds: Dataset, limit: int | None) -> Dataset:
    return ds if limit is None or limit >= len(ds) else Subset(ds, range(limit))  # the first ``limit`` images


class TrainStream(Sampler):
    """This process's part of every global batch from ``start`` on, forever: global sample
    position p is image ``permutation(seed, epoch)[p % n]`` with epoch p // n; each item is
    (image index, position), the position seeding that sample's augmentation."""

    def __init__(self, size: int, batch: int, seed: int, start_batch: int, rank: int, world: int) -> None:
        self.size, self.batch, self.seed, self.start_batch = size, batch, seed, start_batch
        self.per_process, self.rank = batch // world, rank

    def __iter__(self):
        order, epoch = None, -1
        position = self.start_batch * self.batch
        while True:
            mine = range(position + self.rank * self.per_process, position + (self.rank + 1) * self.per_process)
            items = []
            for p in mine:
                if p // self.size != epoch:
                    epoch = p // self.size
                    order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
                items.append((int(order[p % self.size]), p))
            yield items
            position += self.batch


class Augmented(Dataset):
    """Training crops: ``pipeline`` on each image with a generator seeded by (seed, position)."""

    def __init__(self, images: Dataset, pipeline: TrainPipeline, seed: int) -> None:
        self.images, self.pipeline, self.seed = images, pipeline, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int]):
        index, position = item
        sample = self.images[index]
        return self.pipeline(sample.image, sample.label, np.random.default_rng([self.seed, position]))


def _workers(cfg: SegmentationConfig, proc: _Process) -> int:
    if cfg.workers is not None:
        return cfg.workers
    # On a CPU the loader would compete with the training for the same cores.
    return 0 if proc.device.type != "cuda" else max(1, min(8, (os.cpu_count() or 2) // proc.world - 1))


def _train_loader(ds: Dataset, values: dict, cfg: SegmentationConfig, start: int, proc: _Process):
    pipeline = TrainPipeline(crop=values["crop_size"], scale=tuple(values["train_scale"]),
                             ratio_range=tuple(cfg.ratio_range), cat_max_ratio=cfg.cat_max_ratio,
                             flip_prob=cfg.flip_prob, photometric=cfg.photometric)
    workers = _workers(cfg, proc)
    extra = dict(persistent_workers=True, prefetch_factor=2) if workers else {}
    # Its own generator: the loader must not draw from the global RNG (prompt dropout's).
    return DataLoader(Augmented(ds, pipeline, cfg.seed), num_workers=workers,
                      batch_sampler=TrainStream(len(ds), values["batch_size"], cfg.seed, start, proc.rank, proc.world),
                      pin_memory=proc.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed), **extra)


def _test_pipeline(values: dict) -> TestPipeline:
    return TestPipeline(crop=values["crop_size"], stride=values["stride"], scale=tuple(values["test_scale"]),
                        ratios=MULTI_SCALE_RATIOS if values["multi_scale"] else (1.0,), flip=values["flip"])


def _one_sample(sample):  # the loader yields single images (their sizes differ)
    return sample


@torch.no_grad()
def evaluate_model(model: SegmentationModel, ds: Dataset, pipeline: TestPipeline, proc: _Process, amp: bool,
                   workers: int = 0, classes: list[str] | None = None) -> dict:
    """mIoU, mAcc, aAcc (and per class) of ``model`` on ``ds``, sharded over the processes."""
    model.eval()
    start = time.perf_counter()
    matrix = ConfusionMatrix(model.num_classes, proc.device)
    shard = Subset(ds, range(proc.rank, len(ds), proc.world))
    loader = DataLoader(shard, batch_size=None, num_workers=workers, collate_fn=_one_sample)
    autocast = _autocast(proc, amp)
    for sample in loader:
        prediction = pipeline.predict(model, sample.image, proc.device, autocast)
        matrix.update(prediction, torch.from_numpy(sample.label))
    scored = proc.sum_(torch.tensor(len(shard), device=proc.device))
    proc.sum_(matrix.counts)
    result = matrix.metrics(classes)
    result.update(eval_images=int(scored), eval_s=time.perf_counter() - start)
    return result


# ---------------------------------------------------------------- the run
def _versions() -> dict:
    import platform

    import timm

    from .. import __version__
    return {"svpt": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def read_run_config(run_dir: str) -> dict:
    """The ``config.json`` of a segmentation run directory."""
    saved = read_config_json(run_dir)
    if saved.get("task") != TASK:
        raise ConfigError(f"{run_dir} is not a segmentation run (its {CONFIG} has task {saved.get('task')!r})")
    return saved


def is_segmentation_run(run_dir: str) -> bool:
    try:
        read_run_config(run_dir)
    except ConfigError:
        return False
    return True


def _check_resume(cfg: SegmentationConfig, run_dir: str) -> None:
    saved = read_run_config(run_dir)["settings"]
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in cfg.to_json().items()
               if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with other settings ({'; '.join(changed)}); a resumed run "
                          f"continues the original one; only {', '.join(RESUME_MAY_CHANGE)} may change")


def _keep_rows(path: str, last_iteration: int) -> None:
    """Drop the lines of iterations after the saved state (a run that died before saving it)."""
    rows = [r for r in read_jsonl(path) if r["iteration"] <= last_iteration]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _append(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def train(config: SegmentationConfig | None = None, resume: bool = False, **settings) -> dict:
    """Train prompts and a decoder as ``config`` (or keyword ``settings``) says; ``resume=True``
    continues the run in ``config.output``. Returns the run directory and the best and last
    evaluation."""
    cfg = (config if config is not None else SegmentationConfig(**settings)).check()
    run = _Run(cfg, resume)
    run.loop()
    return {"run_dir": run.dir, "best": run.best, "last": run.last}


class _Run:
    """One training run: its data, model, optimizer and records; ``loop`` trains to the end
    (or to ``stop_after_iteration``)."""

    def __init__(self, cfg: SegmentationConfig, resume: bool) -> None:
        self.cfg, self.values, self.proc = cfg, cfg.resolved(), _process(cfg.device)
        values, proc = self.values, self.proc
        if values["batch_size"] % proc.world:
            raise ConfigError(f"batch_size={values['batch_size']} is the global batch and must divide evenly over "
                              f"the {proc.world} processes")
        if proc.device.type == "cpu" and cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif proc.device.type == "cpu" and cfg.model is None and "OMP_NUM_THREADS" not in os.environ:
            # The quick-start model's matrices are too small to split over cores: more threads only
            # add synchronisation (measured: 10x the CPU time with 2 threads on 2 busy cores).
            torch.set_num_threads(1)
        self.dir = cfg.output or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-segmentation-{cfg.method}")
        if proc.main:
            if not resume and os.path.exists(os.path.join(self.dir, RESUME_FILE)):
                raise ConfigError(f"{self.dir} already holds a run; continue it with resume=True, or give another output")
            os.makedirs(self.dir, exist_ok=True)
        split = partial(open_split, cfg.data, num_classes=cfg.num_classes, reduce_zero_label=cfg.reduce_zero_label)
        self.train_ds = _limited(split("training"), cfg.limit_train)
        self.eval_ds = _limited(split("validation"), cfg.limit_eval)
        base = self.eval_ds.dataset if isinstance(self.eval_ds, Subset) else self.eval_ds
        self.classes = base.classes

        torch.manual_seed(cfg.seed)  # the same backbone (random init), prompts and decoder in every process
        self.model = build_model(cfg, values, base.num_classes, proc.device)
        self.optimizer = _optimizer(self.model, cfg, values)
        self.schedule = _poly_schedule(self.optimizer, values["iterations"], values["min_lr"], cfg.poly_power)
        torch.manual_seed((cfg.seed << 16) + proc.rank + 1)  # per-process stream for prompt dropout
        self.start, self.best, self.last = 0, {"mIoU": -1.0, "iteration": 0}, {}
        # The loss of the iterations since the last evaluation, summed on the device (no sync per step).
        self.since_sum, self.since_count = torch.zeros((), dtype=torch.float64, device=proc.device), 0
        if resume:
            self._restore()
        elif proc.main:
            self._write_config(base.num_classes)

    def _restore(self) -> None:
        _check_resume(self.cfg, self.dir)
        state = load_resume(os.path.join(self.dir, RESUME_FILE))
        self.model.load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if state["world_size"] == self.proc.world:
            set_rng_state(state["rng"][self.proc.rank], self.proc.device)
        self.start, self.best = state["step"], state["best"]
        self.last, (since_sum, self.since_count) = state["last"]["evaluation"], state["last"]["since_eval"]
        self.since_sum.fill_(since_sum)
        if self.proc.main:
            for name in (METRICS, STEPS):
                _keep_rows(os.path.join(self.dir, name), self.start)
        log.info("resuming %s after iteration %d", self.dir, self.start)

    def _write_config(self, num_classes: int) -> None:
        resolved = {**self.values, "classes": self.classes, "num_classes": num_classes,
                    "train_images": len(self.train_ds), "eval_images": len(self.eval_ds),
                    "out_indices": list(self.model.out_indices), "world_size": self.proc.world,
                    "device": str(self.proc.device), "versions": _versions()}
        text = json.dumps({"task": TASK, "settings": self.cfg.to_json(), "resolved": resolved}, indent=2)
        atomic_write(os.path.join(self.dir, CONFIG), text.encode())
        for name in (METRICS, STEPS):
            atomic_write(os.path.join(self.dir, name), b"")

    def _runner(self) -> torch.nn.Module:
        """The model as the steps call it: in DDP under torch.distributed (BatchNorm synchronised on CUDA)."""
        if self.proc.world == 1:
            return self.model
        device = self.proc.device
        if device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        return DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def loop(self) -> None:
        cfg, values, proc = self.cfg, self.values, self.proc
        runner, autocast, total = self._runner(), _autocast(proc, cfg.amp), values["iterations"]
        log.info("training %s on %s (%d train / %d eval images, %d classes) for %d iterations of %d crops of %d px; "
                 "backend %s; run directory %s", cfg.method, proc.device, len(self.train_ds), len(self.eval_ds),
                 self.model.num_classes, total, values["batch_size"], values["crop_size"], backends.get_backend(),
                 self.dir)
        batches = iter(_train_loader(self.train_ds, values, cfg, self.start, proc))
        tick = time.perf_counter()
        for iteration in range(self.start, total):
            runner.train()
            images, labels = (t.to(proc.device, non_blocking=True) for t in next(batches))
            with autocast():
                loss = runner(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            lrs = self.schedule.get_last_lr()  # this iteration's
            self.schedule.step()
            loss = proc.sum_(loss.detach().double()) / proc.world  # the global batch's mean loss
            self.since_sum += loss
            self.since_count += 1
            done = iteration + 1
            if done % values["log_every"] == 0 and proc.main:
                _append(os.path.join(self.dir, STEPS), {"iteration": done, "loss": loss.item(), "lr": lrs[0],
                                                        "head_lr": lrs[1]})
            evaluating = done % values["eval_every"] == 0 or done == total
            stopping = done == cfg.stop_after_iteration
            if evaluating:
                self._evaluate(done, lrs, time.perf_counter() - tick)
                tick = time.perf_counter()
            if evaluating or stopping or done % values["checkpoint_every"] == 0:
                self._save(done)
            if stopping and done < total:
                log.info("stopped after iteration %d (stop_after_iteration); continue with resume=True", done)
                break

    def _evaluate(self, done: int, lrs: list[float], train_s: float) -> None:
        result = evaluate_model(self.model, self.eval_ds, _test_pipeline(self.values), self.proc, self.cfg.amp,
                                _workers(self.cfg, self.proc), self.classes)
        row = {"iteration": done, "train_loss": self.since_sum.item() / self.since_count, "lr": lrs[0],
               "head_lr": lrs[1], **{k: result[k] for k in ("mIoU", "mAcc", "aAcc", "eval_images", "eval_s")},
               "train_s": train_s}
        self.since_sum.zero_()
        self.since_count = 0
        self.last = {**row, "per_class": result["per_class"]}
        if row["mIoU"] > self.best["mIoU"]:
            self.best = {"mIoU": row["mIoU"], "iteration": done}
        if self.proc.main:
            _append(os.path.join(self.dir, METRICS), row)
            if self.best["iteration"] == done:
                save_checkpoint(self.model, os.path.join(self.dir, BEST))
        log.info("iteration %d/%d: train loss %.4f | mIoU %.2f mAcc %.2f aAcc %.2f (%d images, %.1f s)", done,
                 self.values["iterations"], row["train_loss"], 100 * row["mIoU"], 100 * row["mAcc"],
                 100 * row["aAcc"], row["eval_images"], row["eval_s"])

    def _save(self, done: int) -> None:
        """The last checkpoint, then the resume state (the iteration counts as done once it is there)."""
        rng = _gather(rng_state(self.proc.device), self.proc)  # every process's stream, for an exact resume
        if self.proc.main:
            save_checkpoint(self.model, os.path.join(self.dir, LAST))
            # epoch and step both count iterations: a segmentation run has no epochs.
            save_resume(os.path.join(self.dir, RESUME_FILE), epoch=done, step=done,
                        trainable=self.model.trainable_state(), optimizer=self.optimizer, scheduler=self.schedule,
                        rng=rng, best=self.best, config=self.cfg.to_json(),
                        last={"evaluation": self.last, "since_eval": (self.since_sum.item(), self.since_count)})
        self.proc.barrier()  # nobody runs ahead into a state the files do not describe yet


def evaluate(run_dir: str | None = None, checkpoint: str | None = None, split: str = "validation",
             **overrides) -> dict:
    """Score a segmentation checkpoint (default: the run's best, else its last) on ``split``.
    The model, data and test settings are the run's (its ``config.json``, next to the checkpoint
    when ``run_dir`` is not given); ``overrides`` replace settings, e.g. ``data=``, ``weights=``,
    ``multi_scale=True``, ``flip=True``, ``limit_eval=``, ``device=``, ``backend=``, ``workers=``.
    Returns mIoU, mAcc, aAcc (fractions), per-class IoU and Acc, and what was scored."""
    if run_dir is None and checkpoint is None:
        raise ConfigError("evaluate needs a run directory or a checkpoint file")
    run_dir = run_dir or os.path.dirname(os.path.abspath(checkpoint))
    saved = read_run_config(run_dir)
    try:
        cfg = dataclasses.replace(SegmentationConfig.from_json(saved["settings"]), **overrides).check()
    except TypeError as exc:
        raise ConfigError(f"evaluate: {exc}") from None
    if checkpoint is None:
        best = os.path.join(run_dir, BEST)
        checkpoint = best if os.path.isfile(best) else os.path.join(run_dir, LAST)
    values = cfg.resolved()
    proc = _process(cfg.device)
    ds = _limited(open_split(cfg.data, split, cfg.num_classes, cfg.reduce_zero_label), cfg.limit_eval)
    base = ds.dataset if isinstance(ds, Subset) else ds
    # Without weights the backbone is timm's random init: drawn from the run's seed, as in training.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, values, base.num_classes, proc.device)
    load_checkpoint(model, checkpoint)
    result = evaluate_model(model, ds, _test_pipeline(values), proc, cfg.amp, _workers(cfg, proc), base.classes)
    result.update(checkpoint=checkpoint, split=split, multi_scale=cfg.multi_scale, flip=cfg.flip)
    log.info("%s on %s (%d images%s): mIoU %.2f mAcc %.2f aAcc %.2f", checkpoint, split, result["eval_images"],
             (", multi-scale" if cfg.multi_scale else "") + (", flip" if cfg.flip else ""), 100 * result["mIoU"],
             100 * result["mAcc"], 100 * result["aAcc"])
    return result
