"""The training run: model, data, epochs, the protocol's evaluations, checkpoints, resume, DDP."""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from .. import backends
from ..checkpoint import (atomic_write, backbone_identity, load_prompt_state_dict, load_prompts, prompt_state_dict,
                          read_prompt_metadata, save_prompts_with_run)
from ..data import Augmenter, open_data
from ..fused import apply as apply_prompts
from ..prompting import summary
from . import backbone
from .batches import (EvalBatches, ResidentImages, TrainBatches, default_workers, describe as describe_batches,
                      memory_budget, shard)
from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, read_run_config
from .distributed import Dist, setup, teardown
from .progress import Progress
from .protocol import Plan, make_plan
from .records import RunRecords
from .state import RESUME_FILE, load_resume, resume_state, rng_state, set_rng_state, write_resume
from .steps import WARMUP, TrainStep, autocast, graphs_decision
from .writer import BackgroundWriter

LAST, RESULT_FILE = "prompts_last.safetensors", "result.json"


# ---------------------------------------------------------------- model
@dataclass
class Built:
    model: torch.nn.Module
    name: str
    model_kwargs: dict
    img_size: int


class BackboneCache:
    """The last backbone built (unprompted, weights loaded, on its device), handed out as
    copies: the runs of ``svpt vtab`` that share a backbone skip timm's initialisation and
    the weights file. A run's numbers do not depend on whether its copy came from here."""

    def __init__(self):
        self.key, self.entry = None, None

    def get(self, key: tuple, make: Callable[[], tuple]) -> tuple:
        if key != self.key:
            self.key, self.entry = None, None  # free the old one before building the next
            self.entry, self.key = make(), key
        return copy.deepcopy(self.entry)


def _weights_key(path: str | None):
    """A weights file by path, size and modification time: a rewritten file is another backbone."""
    if not path or not os.path.isfile(path):
        return path  # load_weights says what is wrong with it
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def build_model(model: str | None, model_kwargs: dict, weights: str | None, img_size: int | None,
                method: str, num_prompts: int, options: dict, backend: str, num_classes: int,
                ctx: Dist, seed: int, cache: BackboneCache | None = None) -> Built:
    """The timm backbone (weights loaded), prompted, on this process's device. Without
    weights the backbone is timm's random init drawn from ``seed``; the prompts are drawn
    from ``seed`` too, after it. svpt.summary's line is printed by the main process only."""
    try:
        backends.set_backend(backend)  # an unusable backend is a usage error, said before any work
    except RuntimeError as exc:
        raise ConfigError(f"--backend {backend}: {exc}") from None

    def make() -> tuple:
        torch.manual_seed(seed)
        name, kwargs, net = backbone.create_backbone(model, model_kwargs, img_size)
        if weights:
            backbone.load_weights(net, weights, name)
        return name, kwargs, net.to(ctx.device)

    key = (model, json.dumps(model_kwargs, sort_keys=True, default=str), _weights_key(weights), img_size,
           str(ctx.device), None if weights else seed)
    name, kwargs, net = cache.get(key, make) if cache is not None else make()
    if ctx.main and not weights and model is not None:
        print(f"note: no --weights, so {name} keeps timm's random init (pretrained=False); "
              "give --weights PATH for a pretrained backbone")
    torch.manual_seed(seed)  # the prompt init, the same whether the backbone was built or copied
    apply_prompts(net, method, num_prompts, num_classes=num_classes, backend=backend, **options)
    if ctx.main:
        print(summary(net))
    return Built(net, name, kwargs, img_size or backbone.default_img_size(net))


# ---------------------------------------------------------------- data
def _limited(ds: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))  # the same subset every run
    return Subset(ds, sorted(order[:limit].tolist()))


def _set_threads(cfg: TrainConfig, ctx: Dist) -> None:
    if ctx.device.type != "cpu":
        return
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif cfg.model is None and "OMP_NUM_THREADS" not in os.environ:
        # The quick-start model's matrices are too small to split over cores: more threads
        # only add synchronisation (4x slower with 2 threads on 2 busy cores, measured).
        torch.set_num_threads(1)


@dataclass
class RunData:
    train: TrainBatches
    evaluation: EvalBatches
    train_images: int
    eval_images: int
    lines: list[str]  # what was decided, for the log


def prepare_data(cfg: TrainConfig, ctx: Dist, plan: Plan, train_ds: Dataset, eval_ds: Dataset,
                 augmenter: Augmenter, workers: int) -> RunData:
    """Batches of both splits: decoded once onto the device where they fit (``device_data``),
    else read by a DataLoader every epoch. The test split of a final run is read once, so it
    always streams through a loader (its decoding then overlaps the evaluation)."""
    budget = None if cfg.device_data == "always" else memory_budget(ctx.device)
    wanted = cfg.device_data != "never"
    train_res = ResidentImages.decode(train_ds, ctx.device, workers, budget) if wanted else None
    eval_shard = shard(eval_ds, ctx)
    left = None if budget is None else budget - (train_res.nbytes if train_res else 0)
    eval_res = ResidentImages.decode(eval_shard, ctx.device, workers, left) \
        if wanted and plan.evaluates_every_epoch else None
    # DistributedSampler with world size 1 too: the same permutation (seed + epoch) in every
    # layout, so N processes with batch B/N see exactly the batches of 1 process with batch B.
    sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    train = TrainBatches(train_ds, sampler, cfg.batch_size // ctx.world, augmenter, train_res, workers, ctx, cfg.seed)
    evaluation = EvalBatches(eval_ds, max(1, cfg.eval_batch_size // ctx.world), eval_res, workers, ctx,
                             persistent=plan.evaluates_every_epoch)
    lines = [describe_batches(f"train {plan.train_split} ({augmenter.augment} augmentation)", train_ds, train_res,
                              workers, ctx),
             describe_batches(f"evaluation {plan.eval_split}", eval_shard, eval_res, workers, ctx)]
    return RunData(train, evaluation, len(train_ds), len(eval_ds), lines)


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
def train_epoch(model, step: TrainStep, batches: Iterator, optimizer, scheduler, ctx: Dist,
                progress: Progress) -> dict:
    model.train()
    losses, lrs = [], []
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss * images, correct
    images_seen, data_wait = 0, 0.0
    start = fetch = time.perf_counter()
    for index, (images, labels) in enumerate(batches, 1):
        data_wait += time.perf_counter() - fetch
        y = labels.to(ctx.device, non_blocking=True)
        loss, logits = step(images, y)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        losses.append(loss)
        sums += torch.stack([loss.double() * len(y), (logits.argmax(-1) == y).sum().double()])
        images_seen += len(y) * ctx.world  # every process reads batches of the same size
        progress.update(index, images_seen, loss.item)
        fetch = time.perf_counter()
    # Mean over processes of each step's local mean loss = the global batch's mean loss.
    step_losses = (ctx.sum(torch.stack(losses)) / ctx.world).tolist()
    loss_sum, correct = ctx.sum(sums).tolist()
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / images_seen, "train_acc": correct / images_seen, "train_images": images_seen,
            "img_per_s": images_seen / elapsed, "data_wait_s": data_wait, "train_s": elapsed,
            "step_losses": step_losses, "step_lrs": lrs}


@torch.no_grad()
def evaluate(model, batches: Iterable, normalise, ctx: Dist, amp: bool) -> dict:
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, correct
    count = 0  # on the host: a device tensor made per batch would synchronise the stream
    start = time.perf_counter()
    for images, labels in batches:
        y = labels.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, amp):
            logits = model(normalise(images))
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        sums += torch.stack([loss.double(), (logits.argmax(-1) == y).sum().double()])
        count += len(y)
    loss_sum, correct, count = ctx.sum([*sums.tolist(), float(count)]).tolist()
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
    defaults = TrainConfig().to_json()  # settings added after the run was made: their defaults
    changed = [f"{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in ours.items()
               if k not in RESUME_MAY_CHANGE and saved.get(k, defaults[k]) != v]
    if changed:
        raise ConfigError(f"cannot resume {run_dir} with other settings ({'; '.join(changed)}); a resumed run "
                          f"continues the original one; only {', '.join(RESUME_MAY_CHANGE)} may change")


def _versions() -> dict:
    import timm

    from .. import __version__
    return {"svpt": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def train(cfg: TrainConfig, resume: bool = False, cache: BackboneCache | None = None) -> dict:
    """Train prompts as ``cfg`` says; ``resume=True`` continues the run in ``cfg.output``.
    Returns the run's result (protocol, what the accuracy is, its value; also written to
    ``result.json``), or, after ``stop_after_epoch``, the epoch it stopped after."""
    cfg.check()
    ctx = setup(cfg.device)
    writer = BackgroundWriter(threaded=ctx.device.type == "cuda")
    try:
        return _train(cfg, ctx, resume, cache, writer)
    finally:
        writer.close()  # a run that failed still finishes the files it handed over
        teardown(ctx)


def _train(cfg: TrainConfig, ctx: Dist, resume: bool, cache: BackboneCache | None, writer: BackgroundWriter) -> dict:
    say = print if ctx.main else (lambda *a, **k: None)
    if cfg.batch_size % ctx.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must divide evenly over "
                          f"the {ctx.world} processes")
    _set_threads(cfg, ctx)
    graphs, steps_line = graphs_decision(cfg.cuda_graphs, ctx.device, ctx.active, cfg.options)
    source = open_data(cfg.data, cfg.val_fraction)
    plan = make_plan(source, cfg.protocol, cfg.train_split, cfg.eval_split)
    for split in (plan.train_split, plan.eval_split):
        source.validate(split)  # lists, labels and files of both splits, before any work
    augment = cfg.augment or source.default_augment
    say(source.describe())
    say(plan.describe())

    built = build_model(cfg.model, cfg.model_kwargs, cfg.weights, cfg.img_size or source.native_size,
                        cfg.method, cfg.num_prompts, cfg.options, cfg.backend, len(source.classes), ctx,
                        cfg.seed, cache)
    model = built.model
    torch.manual_seed((cfg.seed << 16) + ctx.rank + 1)  # per-process stream for prompt dropout

    train_ds = _limited(source.dataset(plan.train_split, built.img_size, augment), cfg.limit_train)
    eval_ds = _limited(source.dataset(plan.eval_split, built.img_size), cfg.limit_eval)
    workers = default_workers(ctx) if cfg.workers is None else cfg.workers
    data = prepare_data(cfg, ctx, plan, train_ds, eval_ds, Augmenter(augment, built.img_size, cfg.seed), workers)
    normalise = backbone.to_uint8_normaliser(model, ctx.device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, cfg)
    scheduler = _schedule(optimizer, len(data.train), cfg)
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.active else model
    step = TrainStep(ddp, params, normalise, ctx.device, cfg.amp, graphs)

    run_dir = _run_dir(cfg, ctx, resume, built.name)
    start_epoch, best, last = 0, {"eval_acc": -1.0, "epoch": 0}, {}
    if resume:
        _check_resume_config(cfg, run_dir)
        start_epoch, best, last = _restore(os.path.join(run_dir, RESUME_FILE), model, optimizer, scheduler, ctx, cfg)
        say(f"resuming {run_dir} after epoch {start_epoch}")
    elif ctx.main:
        _write_config(run_dir, cfg, built, source, plan, augment, data, ctx, steps_line)
    records = RunRecords(run_dir, start_epoch, f"{plan.eval_split} ({plan.protocol})", writer) if ctx.main else None

    say(f"training {len(params)} tensors ({sum(p.numel() for p in params):,} values) on {ctx.device}"
        f"{f' x {ctx.world} processes' if ctx.active else ''}; backend {backends.get_backend()} "
        f"(usable here: {', '.join(backends.available_backends(ctx.device))}); {data.train_images} train / "
        f"{data.eval_images} eval images ({plan.train_split}/{plan.eval_split}), {len(data.train)} steps of "
        f"{cfg.batch_size} per epoch; run directory {run_dir}")
    for line in data.lines:
        say(line)
    say(f"training steps: {steps_line}")
    decode_test_from = _test_decoding_epoch(cfg, plan, ctx, start_epoch)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        progress = Progress(cfg.progress if ctx.main else "none", epoch, cfg.epochs, len(data.train))
        if epoch == decode_test_from:
            writer.flush()  # its thread idle: the loader forks its workers now
            data.evaluation.start()
        stats = train_epoch(ddp, step, data.train.epoch(epoch), optimizer, scheduler, ctx, progress)
        if plan.evaluates_every_epoch:
            stats.update(evaluate(model, data.evaluation, normalise, ctx, cfg.amp), eval_split=plan.eval_split)
        last, best = _end_epoch(epoch, stats, best, len(data.train), run_dir, model, optimizer, scheduler,
                                records, writer, ctx, cfg, plan)
        say(_epoch_line(epoch, cfg.epochs, last))
        if cfg.stop_after_epoch == epoch and epoch < cfg.epochs:
            writer.flush()
            say(f"stopped after epoch {epoch} (--stop-after-epoch); continue with: svpt train --resume {run_dir}")
            return {"run_dir": run_dir, "stopped_after_epoch": epoch, "last": last}
    say(f"training steps of this process: {step.describe()}")
    writer.flush()
    return _finish(plan, cfg, ctx, model, data, normalise, best, last, run_dir, records, say)


def _test_decoding_epoch(cfg: TrainConfig, plan: Plan, ctx: Dist, start_epoch: int) -> int | None:
    """The epoch from which a final run's test split is decoded while the training goes on (it
    is read once, after the last epoch). On CUDA the training leaves the host's cores to the
    loader's workers once Triton has compiled and every batch size's graph is captured (each
    size comes once an epoch: after WARMUP + 1 epochs); on a CPU they would compete with it."""
    reaches_end = cfg.stop_after_epoch is None or cfg.stop_after_epoch >= cfg.epochs
    if plan.protocol != "final" or not reaches_end or ctx.device.type != "cuda":
        return None
    return min(start_epoch + WARMUP + 2, cfg.epochs)


def _write_config(run_dir: str, cfg: TrainConfig, built: Built, source, plan: Plan, augment: str, data: RunData,
                  ctx: Dist, steps_line: str) -> None:
    resolved = {"model": built.name, "model_kwargs": built.model_kwargs, "img_size": built.img_size,
                "classes": list(source.classes), "protocol": plan.protocol, "protocol_description": plan.describe(),
                "train_split": plan.train_split, "eval_split": plan.eval_split, "augment": augment,
                "train_images": data.train_images, "eval_images": data.eval_images, "batches": data.lines,
                "training_steps": steps_line,
                **backbone_identity(built.model), "world_size": ctx.world, "device": str(ctx.device),
                "versions": _versions()}
    atomic_write(os.path.join(run_dir, "config.json"),
                 json.dumps({"settings": cfg.to_json(), "resolved": resolved}, indent=2).encode())


def _epoch_line(epoch: int, epochs: int, row: dict) -> str:
    evaluated = (f" | {row['eval_split']} loss {row['eval_loss']:.4f} acc {row['eval_acc']:.3f} "
                 f"({row['eval_images']} images)") if "eval_acc" in row else ""
    seconds = row["train_s"] + row.get("eval_s", 0.0)
    return (f"epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}{evaluated} | "
            f"{row['img_per_s']:.0f} img/s, waiting for data {100 * row['data_wait_s'] / row['train_s']:.0f}% "
            f"| {seconds:.1f} s")


def _run_metadata(plan: Plan, cfg: TrainConfig, epoch: int, selection: str) -> dict:
    return {"protocol": plan.protocol, "train_split": plan.train_split, "eval_split": plan.eval_split,
            "data": cfg.data or "builtin", "epoch": epoch, "epochs": cfg.epochs, "selection": selection}


def _end_epoch(epoch, stats, best, steps_per_epoch, run_dir, model, optimizer, scheduler, records, writer, ctx, cfg,
               plan):
    """Record the epoch's metrics and write its checkpoints (main process only): the best
    epoch's prompts when it improves, the last epoch's when the run ends or stops, resume.pt
    every epoch and last (in the writer's thread, after the metrics), so an epoch whose files
    are not all written is replayed on resume."""
    step_losses, step_lrs = stats.pop("step_losses"), stats.pop("step_lrs")
    step = epoch * steps_per_epoch
    row = {"epoch": epoch, "step": step, "lr": step_lrs[-1], **stats}
    rng = ctx.gather(rng_state(ctx.device))  # every process's stream, for an exact resume
    if plan.evaluates_every_epoch and stats["eval_acc"] > best["eval_acc"]:
        best = {"eval_acc": stats["eval_acc"], "eval_loss": stats["eval_loss"], "epoch": epoch}
    if ctx.main:
        first, ends = step - len(step_losses), epoch in (cfg.epochs, cfg.stop_after_epoch)
        step_rows = [{"step": first + i + 1, "epoch": epoch, "epoch_float": epoch - 1 + (i + 1) / len(step_losses),
                      "lr": lr, "loss": loss} for i, (loss, lr) in enumerate(zip(step_losses, step_lrs))]
        records.add_epoch(row, step_rows, last=ends)
        if ends:
            save_prompts_with_run(model, os.path.join(run_dir, LAST), _run_metadata(plan, cfg, epoch, "last epoch"))
        if plan.evaluates_every_epoch and best["epoch"] == epoch:
            on_test = "; selected on the test set" if plan.protocol == "max-test" else ""
            save_prompts_with_run(model, os.path.join(run_dir, plan.best_file), _run_metadata(
                plan, cfg, epoch, f"best {plan.eval_split} accuracy over epochs (epoch {epoch}){on_test}"))
        writer.submit(write_resume, os.path.join(run_dir, RESUME_FILE), resume_state(
            epoch=epoch, step=step, trainable=prompt_state_dict(model), optimizer=optimizer, scheduler=scheduler,
            rng=rng, best=best, last=row, config=cfg.to_json()))
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
    return state["epoch"], state["best"], state.get("last", {})


# ---------------------------------------------------------------- the result
def _result(plan: Plan, cfg: TrainConfig, last: dict, best: dict, final: dict | None, run_dir: str) -> dict:
    """What the run reports, and in words what that number is."""
    if plan.protocol == "final":
        accuracy, loss, epoch, images, prompts = final["eval_acc"], final["eval_loss"], cfg.epochs, \
            final["eval_images"], LAST
    elif plan.protocol == "tune":
        accuracy, loss, epoch, images, prompts = last["eval_acc"], last["eval_loss"], cfg.epochs, \
            last["eval_images"], LAST
    else:
        accuracy, loss, epoch, images, prompts = best["eval_acc"], best["eval_loss"], best["epoch"], \
            last["eval_images"], plan.best_file
    result = {"protocol": plan.protocol, "description": plan.describe(),
              "metric": plan.result_metric(epoch, cfg.epochs), "accuracy": accuracy, "loss": loss, "epoch": epoch, "epochs": cfg.epochs,
              "train_split": plan.train_split, "eval_split": plan.eval_split, "eval_images": images,
              "prompts": os.path.join(run_dir, prompts), "run_dir": run_dir}
    if final is not None:
        result["eval_s"] = final["eval_s"]
    if plan.evaluates_every_epoch:
        result.update(last_epoch_accuracy=last["eval_acc"],
                      best_epoch={"epoch": best["epoch"], "accuracy": best["eval_acc"],
                                  "prompts": os.path.join(run_dir, plan.best_file)})
    return result


def _summary(result: dict) -> str:
    acc, split = result["accuracy"], result["eval_split"]
    if result["protocol"] == "final":
        return (f"result (protocol final): {split} accuracy {acc:.4f} after the last epoch ({result['epochs']}), "
                f"evaluated once on {result['eval_images']} images; prompts: {result['prompts']}")
    best = result["best_epoch"]
    if result["protocol"] == "tune":
        return (f"result (protocol tune): {split} accuracy {acc:.4f} after the last epoch; best {split} "
                f"{best['accuracy']:.4f} at epoch {best['epoch']} ({best['prompts']}); the test split was not read")
    return (f"result (protocol max-test): MAXIMUM {split} accuracy over epochs {acc:.4f} at epoch {result['epoch']}, "
            f"selected on the test set (not VPT's protocol); {split} accuracy after the last epoch "
            f"{result['last_epoch_accuracy']:.4f}; prompts of the maximum: {result['prompts']}")


def _finish(plan, cfg, ctx, model, data, normalise, best, last, run_dir, records, say) -> dict:
    final = evaluate(model, data.evaluation, normalise, ctx, cfg.amp) if plan.protocol == "final" else None
    result = _result(plan, cfg, last, best, final, run_dir)
    if ctx.main:
        atomic_write(os.path.join(run_dir, RESULT_FILE), json.dumps(result, indent=2).encode())
        say(_summary(result))
        say(f"files: {os.path.join(run_dir, RESULT_FILE)}, {os.path.join(run_dir, 'metrics.jsonl')}, "
            f"{os.path.join(run_dir, 'curves.png')}")
    ctx.barrier()
    return {**result, "last": last}


# ---------------------------------------------------------------- svpt eval
def _checkpoint_metadata(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--prompts {path!r}: no such file")
    try:
        meta = read_prompt_metadata(path)
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            head = f.get_slice("head.weight").get_shape() if "head.weight" in f.keys() else None
    except ValueError as exc:
        raise ConfigError(f"--prompts {exc}") from None
    if head is None:
        raise ConfigError(f"--prompts {path!r} is not an svpt prompt checkpoint (no head.weight)")
    return {**meta, "num_prompts": int(meta["num_prompts"]), "num_classes": head[0]}


def _run_config(prompts: str, config: str | None) -> dict:
    path = config or os.path.join(os.path.dirname(os.path.abspath(prompts)), "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if config:
        raise ConfigError(f"--config {config!r}: no such file")
    return {}


def _default_eval_split(source) -> str:
    splits = source.final_splits or source.tune_splits
    if splits is None:
        raise ConfigError(f"{source.describe()}: no test or val split to evaluate on; give --eval-split")
    return splits[1]


def evaluate_prompts(prompts: str, data: str | None = None, eval_split: str | None = None, model: str | None = None,
                     model_kwargs: dict | None = None, weights: str | None = None, img_size: int | None = None,
                     batch_size: int = 256, workers: int | None = None, backend: str = "auto",
                     device: str | None = None, amp: bool = True, config: str | None = None) -> dict:
    """Score a saved prompt set. The model, weights, data and split default to those of the run
    whose ``config.json`` sits next to ``prompts`` (or ``config``); method, prompts and options
    come from the prompt file itself, which must have been trained on this backbone."""
    meta = _checkpoint_metadata(prompts)
    saved = _run_config(prompts, config)
    settings, resolved = saved.get("settings", {}), saved.get("resolved", {})
    if not saved and model is None:
        raise ConfigError(f"no config.json next to {prompts}: give --model (and --weights, --data) as it was trained")
    if saved and model is None:
        model, model_kwargs = resolved["model"], resolved["model_kwargs"] if model_kwargs is None else model_kwargs
        weights = settings.get("weights") if weights is None else weights
        img_size = resolved["img_size"] if img_size is None else img_size
    if meta.get("backbone") and model is not None and meta["backbone"] != model:
        raise ConfigError(f"{prompts} holds prompts trained on backbone {meta['backbone']}; --model is {model}")
    ctx = setup(device)
    try:
        data = settings.get("data") if data is None and saved else data
        source = open_data(data, settings.get("val_fraction", 0.1))
        split = source.check_split(eval_split or resolved.get("eval_split") or _default_eval_split(source),
                                   "--eval-split")
        source.validate(split)
        if len(source.classes) != meta["num_classes"]:
            raise ConfigError(f"{prompts} has a head for {meta['num_classes']} classes; the data "
                              f"({source.describe()}) has {len(source.classes)}")
        built = build_model(model, model_kwargs or {}, weights, img_size or source.native_size, meta["method"],
                            meta["num_prompts"], meta["options"], backend, meta["num_classes"], ctx,
                            settings.get("seed", 0))
        load_prompts(built.model, prompts)  # refuses prompts of another backbone, naming both
        ds = source.dataset(split, built.img_size)
        batches = EvalBatches(ds, max(1, batch_size // ctx.world), None,
                              default_workers(ctx) if workers is None else workers, ctx, persistent=False)
        result = evaluate(built.model, batches, backbone.to_uint8_normaliser(built.model, ctx.device), ctx, amp)
        run = meta.get("run", {})
        result.update(prompts=prompts, split=split, model=built.name, trained_protocol=run.get("protocol"),
                      trained_selection=run.get("selection"))
        if ctx.main:
            made = f" (from a {run['protocol']} run, {run['selection']})" if run else ""
            print(f"{prompts}{made} on {split} ({result['eval_images']} images): accuracy {result['eval_acc']:.4f}, "
                  f"loss {result['eval_loss']:.4f}")
        return result
    finally:
        teardown(ctx)
