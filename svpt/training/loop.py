"""The training run: model, data, epochs with per-epoch evaluation, checkpoints, resume, DDP."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .. import backends
from ..checkpoint import load_prompt_state_dict, load_prompts, prompt_state_dict, save_prompts
from ..data import DataError, open_data
from ..fused import apply as apply_prompts
from . import backbone
from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, read_run_config
from .distributed import Dist, ShardSampler, setup, teardown
from .progress import Progress
from .records import RunRecords
from ..checkpoint import atomic_write
from .state import RESUME_FILE, load_resume, rng_state, save_resume, set_rng_state

LAST, BEST = "prompts_last.safetensors", "prompts_best.safetensors"


# ---------------------------------------------------------------- model
@dataclass
class Built:
    model: torch.nn.Module
    name: str
    model_kwargs: dict
    img_size: int


def build_model(model: str | None, model_kwargs: dict, weights: str | None, img_size: int | None,
                method: str, num_prompts: int, options: dict, backend: str, num_classes: int,
                ctx: Dist) -> Built:
    """The timm backbone (weights loaded), prompted, on this process's device. Printing of
    svpt.prompt's summary is left to the main process."""
    try:
        backends.set_backend(backend)  # an unusable backend is a usage error, said before any work
    except RuntimeError as exc:
        raise ConfigError(f"--backend {backend}: {exc}") from None
    name, kwargs, net = backbone.create_backbone(model, model_kwargs, img_size)
    if weights:
        backbone.load_weights(net, weights, name)
    elif ctx.main and model is not None:
        print(f"note: no --weights, so {name} keeps timm's random init (pretrained=False); "
              "give --weights PATH for a pretrained backbone")
    quiet = contextlib.nullcontext() if ctx.main else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        apply_prompts(net, method, num_prompts, num_classes=num_classes, backend=backend, **options)
    return Built(net.to(ctx.device), name, kwargs, img_size or backbone.default_img_size(net))


# ---------------------------------------------------------------- data
def _limited(ds: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # the same subset every run
    return Subset(ds, sorted(order[:limit].tolist()))


def _default_workers(ctx: Dist) -> int:
    if ctx.device.type != "cuda":
        return 0  # on a CPU the loader would compete with the training for the same cores
    # ViT-B/16 SVPT steps at ~2900 img/s on an H200; decoding 500x375 JPEGs gives ~280 img/s per
    # worker (benchmarks/results/loader_throughput_h200.txt): keep up with ~11+ workers.
    return max(1, min(16, (os.cpu_count() or 2) // ctx.world - 1))


def _loader(ds: Dataset, batch: int, sampler, workers: int, ctx: Dist, seed: int) -> DataLoader:
    extra = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    # Its own generator: creating an epoch's iterator must not draw from the global RNG
    # (prompt dropout's), or a resumed run would see other random numbers.
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", drop_last=False,
                      generator=torch.Generator().manual_seed(seed), **extra)


def _set_threads(cfg: TrainConfig, ctx: Dist) -> None:
    if ctx.device.type != "cpu":
        return
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif cfg.model is None and "OMP_NUM_THREADS" not in os.environ:
        # The quick-start model's matrices are too small to split over cores: more threads
        # only add synchronisation (4x slower with 2 threads on 2 busy cores, measured).
        torch.set_num_threads(1)


def _splits(source, cfg_train: str | None, cfg_eval: str | None) -> tuple[str, str]:
    train_split = source.check_split(cfg_train or source.default_train_split, "--train-split")
    eval_default = source.default_eval_split
    if not cfg_eval and not eval_default:
        raise DataError(f"{source.describe()}: no val/validation/test split to evaluate on; "
                        f"give --eval-split (accepted: {', '.join(source.splits)})")
    return train_split, source.check_split(cfg_eval or eval_default, "--eval-split")


# ---------------------------------------------------------------- optimisation
def _optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on 1-D tensors (biases, DA biases, AE scales), as timm does.
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _schedule(optimizer, steps_per_epoch: int, cfg: TrainConfig):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to zero, stepped every step."""
    total = steps_per_epoch * cfg.epochs
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- one epoch
def _autocast(ctx: Dist, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and ctx.device.type == "cuda" \
        else contextlib.nullcontext()


def train_epoch(model, loader, optimizer, scheduler, normalise, ctx: Dist, amp: bool, progress: Progress) -> dict:
    model.train()
    losses, lrs = [], []
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss * images, correct
    images_seen, data_wait = 0, 0.0
    start = fetch = time.perf_counter()
    for step, (images, labels) in enumerate(loader, 1):
        data_wait += time.perf_counter() - fetch
        x, y = normalise(images), labels.to(ctx.device, non_blocking=True)
        with _autocast(ctx, amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        loss = loss.detach()
        losses.append(loss)
        sums += torch.stack([loss.double() * len(y), (logits.argmax(-1) == y).sum().double()])
        images_seen += len(y) * ctx.world  # every process reads batches of the same size
        progress.update(step, images_seen, loss.item)
        fetch = time.perf_counter()
    # Mean over processes of each step's local mean loss = the global batch's mean loss.
    step_losses = (ctx.sum(torch.stack(losses)) / ctx.world).tolist()
    loss_sum, correct = ctx.sum(sums).tolist()
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / images_seen, "train_acc": correct / images_seen, "train_images": images_seen,
            "img_per_s": images_seen / elapsed, "data_wait_s": data_wait, "train_s": elapsed,
            "step_losses": step_losses, "step_lrs": lrs}


@torch.no_grad()
def evaluate(model, loader, normalise, ctx: Dist, amp: bool) -> dict:
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, images
    start = time.perf_counter()
    for images, labels in loader:
        y = labels.to(ctx.device, non_blocking=True)
        with _autocast(ctx, amp):
            logits = model(normalise(images))
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(-1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=ctx.device)])
    loss_sum, correct, count = ctx.sum(sums).tolist()
    return {"eval_loss": loss_sum / count, "eval_acc": correct / count, "eval_images": int(count),
            "eval_s": time.perf_counter() - start}


# ---------------------------------------------------------------- the run
def _run_dir(cfg: TrainConfig, ctx: Dist, resume: bool, name: str) -> str:
    default = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{name}-{cfg.method}")
    run_dir = ctx.broadcast(cfg.output or default)  # one name for every process
    if ctx.main:
        if not resume and os.path.exists(os.path.join(run_dir, RESUME_FILE)):
            raise ConfigError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                              "or give another --output")
        os.makedirs(run_dir, exist_ok=True)
    return run_dir


def _check_resume_config(cfg: TrainConfig, run_dir: str) -> None:
    saved = read_run_config(run_dir)["settings"]
    ours = json.loads(json.dumps(cfg.to_json()))
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in ours.items()
               if k not in RESUME_MAY_CHANGE and saved.get(k) != v]
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with other settings ({'; '.join(changed)}); a resumed run "
                          f"continues the original one; only {', '.join(RESUME_MAY_CHANGE)} may change")


def _versions() -> dict:
    import timm

    from .. import __version__
    return {"svpt": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train prompts as ``cfg`` says; ``resume=True`` continues the run in ``cfg.output``.
    Returns the final metrics (best and last epoch, run directory)."""
    cfg.check()
    ctx = setup(cfg.device)
    try:
        return _train(cfg, ctx, resume)
    finally:
        teardown(ctx)


def _train(cfg: TrainConfig, ctx: Dist, resume: bool) -> dict:
    say = print if ctx.main else (lambda *a, **k: None)
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
                          f"the {ctx.world} processes")
    _set_threads(cfg, ctx)
    source = open_data(cfg.data, cfg.val_fraction)
    train_split, eval_split = _splits(source, cfg.train_split, cfg.eval_split)
    say(source.describe())

    torch.manual_seed(cfg.seed)  # the same prompt init in every process
    built = build_model(cfg.model, cfg.model_kwargs, cfg.weights, cfg.img_size or source.native_size,
                        cfg.method, cfg.num_prompts, cfg.options, cfg.backend, len(source.classes), ctx)
    model = built.model
    torch.manual_seed((cfg.seed << 16) + ctx.rank + 1)  # per-process stream for prompt dropout

    train_ds = _limited(source.dataset(train_split, built.img_size), cfg.limit_train)
    eval_ds = _limited(source.dataset(eval_split, built.img_size), cfg.limit_eval)
    per_process = cfg.batch_size // ctx.world
    workers = _default_workers(ctx) if cfg.workers is None else cfg.workers
    # DistributedSampler with world size 1 too: the same permutation (seed + epoch) in every
    # layout, so N processes with batch B/N see exactly the batches of 1 process with batch B.
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    train_loader = _loader(train_ds, per_process, sampler, workers, ctx, cfg.seed)
    eval_loader = _loader(eval_ds, per_process, ShardSampler(len(eval_ds), ctx.rank, ctx.world), workers,
                          ctx, cfg.seed)
    normalise = backbone.to_uint8_normaliser(model, ctx.device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    scheduler = _schedule(optimizer, len(train_loader), cfg)
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.active else model

    run_dir = _run_dir(cfg, ctx, resume, built.name)
    start_epoch, best = 0, {"eval_acc": -1.0, "epoch": 0}
    if resume:
        _check_resume_config(cfg, run_dir)
        start_epoch, best = _restore(os.path.join(run_dir, RESUME_FILE), model, optimizer, scheduler, ctx, cfg)
        say(f"resuming {run_dir} after epoch {start_epoch}")
    elif ctx.main:
        resolved = {"model": built.name, "model_kwargs": built.model_kwargs, "img_size": built.img_size,
                    "classes": list(source.classes), "train_split": train_split, "eval_split": eval_split,
                    "train_images": len(train_ds), "eval_images": len(eval_ds), "world_size": ctx.world,
                    "device": str(ctx.device), "versions": _versions()}
        atomic_write(os.path.join(run_dir, "config.json"),
                     json.dumps({"settings": cfg.to_json(), "resolved": resolved}, indent=2).encode())
    records = RunRecords(run_dir, start_epoch) if ctx.main else None

    say(f"training {len(params)} tensors ({sum(p.numel() for p in params):,} values) on {ctx.device}"
        f"{f' x {ctx.world} processes' if ctx.active else ''}; backend {backends.get_backend()} "
        f"(usable here: {', '.join(backends.available_backends(ctx.device))}); {len(train_ds)} train / "
        f"{len(eval_ds)} eval images ({train_split}/{eval_split}), {len(train_loader)} steps of "
        f"{cfg.batch_size} per epoch, {workers} loader workers per process; run directory {run_dir}")
    last = {}
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        sampler.set_epoch(epoch)
        progress = Progress(cfg.progress if ctx.main else "none", epoch, cfg.epochs, len(train_loader))
        stats = train_epoch(ddp, train_loader, optimizer, scheduler, normalise, ctx, cfg.amp, progress)
        stats.update(evaluate(model, eval_loader, normalise, ctx, cfg.amp))
        last, best = _end_epoch(epoch, stats, best, len(train_loader), run_dir, model, optimizer, scheduler,
                                records, ctx, cfg)
        say(f"epoch {epoch}/{cfg.epochs}: train loss {last['train_loss']:.4f} acc {last['train_acc']:.3f} | "
            f"eval loss {last['eval_loss']:.4f} acc {last['eval_acc']:.3f} ({last['eval_images']} images) | "
            f"{last['img_per_s']:.0f} img/s, waiting for data {100 * last['data_wait_s'] / last['train_s']:.0f}% "
            f"| {last['train_s'] + last['eval_s']:.1f} s")
        if cfg.stop_after_epoch == epoch and epoch < cfg.epochs:
            say(f"stopped after epoch {epoch} (--stop-after-epoch); continue with: svpt train --resume {run_dir}")
            break
    say(f"best eval accuracy {best['eval_acc']:.4f} (epoch {best['epoch']}); prompts: "
        f"{os.path.join(run_dir, BEST)} (best), {os.path.join(run_dir, LAST)} (last); metrics: "
        f"{os.path.join(run_dir, 'metrics.jsonl')}, {os.path.join(run_dir, 'curves.png')}")
    return {"run_dir": run_dir, "best": best, "last": last}


def _end_epoch(epoch, stats, best, steps_per_epoch, run_dir, model, optimizer, scheduler, records, ctx, cfg):
    """Record the epoch's metrics and write its checkpoints (main process only)."""
    step_losses, step_lrs = stats.pop("step_losses"), stats.pop("step_lrs")
    step = epoch * steps_per_epoch
    row = {"epoch": epoch, "step": step, "lr": step_lrs[-1], **stats}
    rng = ctx.gather(rng_state(ctx.device))  # every process's stream, for an exact resume
    if stats["eval_acc"] > best["eval_acc"]:
        best = {"eval_acc": stats["eval_acc"], "epoch": epoch}
    if ctx.main:
        first = step - len(step_losses)
        records.add_epoch(row, [{"step": first + i + 1, "epoch": epoch, "epoch_float": epoch - 1 + (i + 1) / len(step_losses),
                                 "lr": lr, "loss": loss} for i, (loss, lr) in enumerate(zip(step_losses, step_lrs))])
        save_resume(os.path.join(run_dir, RESUME_FILE), epoch=epoch, step=step, trainable=prompt_state_dict(model),
                    optimizer=optimizer, scheduler=scheduler, rng=rng, best=best, config=cfg.to_json())
        save_prompts(model, os.path.join(run_dir, LAST))
        if best["epoch"] == epoch:
            save_prompts(model, os.path.join(run_dir, BEST))
    ctx.barrier()  # nobody runs ahead into a state the files do not describe yet
    return row, best


def _restore(path, model, optimizer, scheduler, ctx: Dist, cfg: TrainConfig):
    state = load_resume(path)
    load_prompt_state_dict(model, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["world_size"] == ctx.world:
        set_rng_state(state["rng"][ctx.rank], ctx.device)
    elif cfg.options.get("prompt_dropout"):
        if ctx.main:
            print(f"warning: the run was saved with {state['world_size']} processes and resumes with {ctx.world}: "
                  "prompt dropout draws other random numbers than an uninterrupted run would")
    return state["epoch"], state["best"]


# ---------------------------------------------------------------- svpt eval
def _prompt_metadata(path: str) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path!r}: no such file")
    try:
        with safe_open(path, "pt") as f:
            meta, head = f.metadata() or {}, f.get_slice("head.weight").get_shape() if "head.weight" in f.keys() else None
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"--prompts {path!r} is not a safetensors prompt checkpoint: {exc}") from None
    if meta.get("format") != "svpt-prompts-1" or head is None:
        raise ConfigError(f"--prompts {path!r} is not an svpt prompt checkpoint (written by svpt.save_prompts)")
    return {"method": meta["method"], "num_prompts": int(meta["num_prompts"]),
            "options": json.loads(meta["options"]), "num_classes": head[0]}


def evaluate_prompts(prompts: str, data: str | None = None, eval_split: str | None = None, model: str | None = None,
                     model_kwargs: dict | None = None, weights: str | None = None, img_size: int | None = None,
                     batch_size: int = 64, workers: int | None = None, backend: str = "auto",
                     device: str | None = None, amp: bool = True, config: str | None = None) -> dict:
    """Score a saved prompt set. The model, weights, data and split default to those of the run
    whose ``config.json`` sits next to ``prompts`` (or ``config``); method, prompts and options
    come from the prompt file itself."""
    meta = _prompt_metadata(prompts)
    run_config = config or os.path.join(os.path.dirname(os.path.abspath(prompts)), "config.json")
    saved = {}
    if os.path.isfile(run_config):
        with open(run_config, encoding="utf-8") as f:
            saved = json.load(f)
    elif config:
        raise ConfigError(f"--config {config!r}: no such file")
    settings, resolved = saved.get("settings", {}), saved.get("resolved", {})
    if not saved and model is None:
        raise ConfigError(f"no config.json next to {prompts}: give --model (and --weights, --data) as it was trained")
    ctx = setup(device)
    try:
        if saved and model is None:
            model, model_kwargs = resolved["model"], resolved["model_kwargs"] if model_kwargs is None else model_kwargs
            weights = settings.get("weights") if weights is None else weights
            img_size = resolved["img_size"] if img_size is None else img_size
        data = settings.get("data") if data is None and saved else data
        source = open_data(data, settings.get("val_fraction", 0.1))
        split = source.check_split(eval_split or resolved.get("eval_split") or source.default_eval_split, "--eval-split")
        if len(source.classes) != meta["num_classes"]:
            raise ConfigError(f"{prompts} has a head for {meta['num_classes']} classes; the data "
                              f"({source.describe()}) has {len(source.classes)}")
        # Without --weights the backbone is timm's random init: drawn from the run's seed, as in training.
        torch.manual_seed(settings.get("seed", 0))
        built = build_model(model, model_kwargs or {}, weights, img_size or source.native_size, meta["method"],
                            meta["num_prompts"], meta["options"], backend, meta["num_classes"], ctx)
        load_prompts(built.model, prompts)
        ds = source.dataset(split, built.img_size)
        per_process = max(1, batch_size // ctx.world)
        loader = _loader(ds, per_process, ShardSampler(len(ds), ctx.rank, ctx.world),
                         _default_workers(ctx) if workers is None else workers, ctx, 0)
        result = evaluate(built.model, loader, backbone.to_uint8_normaliser(built.model, ctx.device), ctx, amp)
        result.update(prompts=prompts, split=split, model=built.name)
        if ctx.main:
            print(f"{prompts} on {split} ({result['eval_images']} images): accuracy {result['eval_acc']:.4f}, "
                  f"loss {result['eval_loss']:.4f}")
        return result
    finally:
        teardown(ctx)
