"""The ``svpt`` command: ``svpt train``, ``svpt eval``, ``svpt vtab``, ``svpt fgvc``, ``svpt env``.

``svpt train`` with no arguments trains SVPT prompts of a tiny ViT on the built-in generated
images and reports their test accuracy (about a minute on two CPU cores); ``svpt train --task
segmentation`` trains prompts and a SETR-PUP decoder on built-in generated shapes and reports
their mIoU. Several GPUs: ``torchrun --nproc_per_node=N -m svpt train ...``. ``svpt vtab ROOT`` /
``svpt fgvc ROOT`` run every task of the suite found under ROOT with the papers' protocol and
write the table. A usage error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import logging
import os
import sys

from .training.config import ConfigError, TrainConfig

_OPTION_FLAGS = {  # METHOD.md option -> flag; None means "the method's default"
    "prompt_dropout": "--prompt-dropout", "da_init_bias": "--da-init-bias", "ae_init": "--ae-init",
    "ae_ratio": "--ae-ratio", "ae_source": "--ae-source", "ae_layers": "--ae-layers", "cdc": "--no-cdc",
    "cvpt_position": "--cvpt-position",
}
_UNSET = object()
_D = TrainConfig()  # the CLI's defaults are the API's
_SUITE_DEFAULTS = {"epochs": 100, "batch_size": 64, "warmup_epochs": 10.0}  # VPT's VTAB-1k / FGVC schedule
# Settings of TrainConfig the CLI sets (the others are derived: options, model_kwargs).
_FIELDS = ("model", "weights", "img_size", "method", "num_prompts", "backend", "data", "protocol", "train_split",
           "eval_split", "augment", "val_fraction", "limit_train", "limit_eval", "epochs", "batch_size",
           "eval_batch_size", "lr", "weight_decay", "optimizer", "momentum", "warmup_epochs", "seed", "amp", "output",
           "workers", "threads", "device", "device_data", "cuda_graphs", "stop_after_epoch", "progress")
TASKS = ("classification", "segmentation")
# svpt eval of a segmentation checkpoint: the flags that replace its run's settings, and those
# that only such a checkpoint takes.
_SEGMENTATION_EVAL_OVERRIDES = ("data", "weights", "backend", "device", "workers", "amp", "multi_scale", "flip",
                                "limit_eval")
_SEGMENTATION_EVAL_ONLY = ("multi_scale", "flip", "limit_eval")
_SEGMENTATION_LOG = "svpt.segmentation"  # the logger its progress goes to


def _tasks_available() -> list[str]:
    """``--task`` choices (tests/test_vtab.py asks for them)."""
    return list(TASKS)


# ---------------------------------------------------------------- argument types and checks
class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(f"{prog}: error: {message} (see {prog} --help)")


class _Parser(argparse.ArgumentParser):
    """Usage errors go to ``main`` (one line, exit code 2): the usage of ``svpt train`` alone
    fills a screen."""

    def error(self, message: str):
        raise _UsageError(self.prog, message)


def _model_kwarg(item: str) -> tuple[str, object]:
    """KEY=VALUE; the value is a Python literal (4, 0.1, True, 'avg') or else a string."""
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE (e.g. drop_path_rate=0.1 global_pool=avg)")
    if key == "img_size":  # it would be overridden by the input size the run uses
        raise argparse.ArgumentTypeError(f"{item!r}: the input size is --img-size (segmentation: --crop-size), "
                                         "not a model kwarg")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _ae_layers(text: str):
    if text == "all":
        return None
    if text == "none":
        return []
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'all', 'none' or block indices like 0,1,5") from None


def _check_device(text: str | None) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``, and only what this machine has."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None  # torch's message lists every device type it knows, svpt runs on two
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {text!r} is not accepted; accepted: cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if device.type == "cuda" else None
    if count == 0:
        raise ConfigError(f"--device {text!r}: no CUDA GPU is usable here (torch {torch.__version__}, built for "
                          f"CUDA {torch.version.cuda or 'none'}); accepted here: cpu")
    if count is not None and device.index is not None and device.index >= count:
        raise ConfigError(f"--device {text!r}: this machine has {count} CUDA GPU(s); accepted: cuda, "
                          f"cuda:0..cuda:{count - 1}, cpu")


def _field_names(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def _segmentation_only() -> set[str]:
    """Settings of the segmentation task that classification does not have (its group's flags)."""
    from .segmentation import SegmentationConfig
    return _field_names(SegmentationConfig) - _field_names(TrainConfig)


# ---------------------------------------------------------------- argument groups
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm ViT name, e.g. vit_base_patch16_224 (default: timm's test_vit with "
                   "4-pixel patches, a tiny random-init model for the built-in data)")
    g.add_argument("--model-kwargs", nargs="+", type=_model_kwarg, metavar="KEY=VALUE", help="extra "
                   "timm.create_model arguments, e.g. drop_path_rate=0.1 global_pool=avg (default: none)")
    g.add_argument("--weights", metavar="PATH", help="backbone weights: .npz (original ViT format, e.g. "
                   "ViT-B_16.npz), .pth/.pt/.bin or .safetensors; loaded by timm, never downloaded "
                   "(default: random init)")
    g.add_argument("--img-size", type=int, help="input size (default: the built-in data's 32, else the model's)")
    g.add_argument("--backend", default="auto", choices=["auto", "eager", "triton", "cpp"],
                   help="svpt op backend (default: auto, the fastest usable one)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("method (options default to docs/method.md's)")
    m.add_argument("--method", default=_D.method, choices=["vpt-shallow", "vpt-deep", "svpt", "cvpt"],
                   help="prompting method (default %(default)s)")
    m.add_argument("--num-prompts", type=int, default=_D.num_prompts, help="prompts per layer (default %(default)s)")
    m.add_argument("--prompt-dropout", type=float, help="all methods (default 0)")
    m.add_argument("--da-init-bias", type=float, help="svpt (default -2.0)")
    m.add_argument("--ae-init", type=float, help="svpt (default 0.0)")
    m.add_argument("--ae-ratio", type=float, help="svpt (default 0.25)")
    m.add_argument("--ae-source", choices=["cls", "prompt"], help="svpt (default cls)")
    m.add_argument("--ae-layers", type=_ae_layers, help="svpt: all (default), none, or indices like 0,1,5")
    m.add_argument("--no-cdc", dest="cdc", action="store_const", const=False,
                   help="svpt: no cross-layer connection (default: connected)")
    m.add_argument("--cvpt-position", type=int, help="cvpt: 1..5 (default 3)")


def _add_optimisation_args(p: argparse.ArgumentParser, defaults: dict, seed: bool) -> None:
    d = {**{k: getattr(_D, k) for k in ("epochs", "batch_size", "warmup_epochs")}, **defaults}
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=d["epochs"], help="default %(default)s (the papers use 100)")
    o.add_argument("--batch-size", type=int, default=d["batch_size"], help="GLOBAL batch size: split evenly over the "
                   "torchrun processes, so N GPUs x B/N trains like 1 GPU x B (default %(default)s)")
    o.add_argument("--eval-batch-size", type=int, default=_D.eval_batch_size,
                   help="global evaluation batch (no gradients; default %(default)s)")
    o.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (default %(default)s; the defaults "
                   "suit the built-in quick start, tune them for real data)")
    o.add_argument("--weight-decay", type=float, default=_D.weight_decay,
                   help="on tensors of 2+ dimensions (default %(default)s)")
    o.add_argument("--optimizer", default=_D.optimizer, choices=["adamw", "sgd"], help="default %(default)s")
    o.add_argument("--momentum", type=float, default=_D.momentum, help="SGD momentum (default %(default)s)")
    o.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"],
                   help="linear warm-up, then cosine decay to 0, per step (default %(default)s)")
    o.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA (default: bf16 autocast)")
    if seed:
        o.add_argument("--seed", type=int, default=_D.seed, help="backbone init (without --weights), prompt init, "
                       "data order and augmentation (default %(default)s)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int, help="loader processes per training process "
                   "(default: 0 on CPU, min(16, cores per process - 1) on CUDA)")
    r.add_argument("--threads", type=int, help="CPU threads (default: 1 for the quick-start model, whose "
                   "matrices are too small to split; else torch's default)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    r.add_argument("--device-data", default="auto", choices=["auto", "always", "never"],
                   help="decode the training images once and keep them on the training device, batched and "
                        "augmented there (auto: when they fit in 40%% of its free memory; the validation "
                        "split of tune / max-test runs too); never: a DataLoader every epoch (default %(default)s)")
    r.add_argument("--cuda-graphs", default=_D.cuda_graphs, choices=["auto", "on", "off"],
                   help="replay each batch size's training step from a CUDA graph, the same numbers with no "
                        "Python per step (auto: on one CUDA process without prompt dropout; default %(default)s)")


def _add_test_time_args(g) -> None:
    """Test-time augmentation of segmentation evaluation (svpt train --task segmentation and svpt eval)."""
    from .segmentation import MULTI_SCALE_RATIOS

    g.add_argument("--multi-scale", action="store_const", const=True, help="evaluate at ratios "
                   f"{', '.join(map(str, MULTI_SCALE_RATIOS))} of --test-scale, softmax averaged (default: 1.0 only)")
    g.add_argument("--flip", action="store_const", const=True,
                   help="evaluate the mirrored images too, softmax averaged (default: no flip)")


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _segmentation_note(p: argparse.ArgumentParser) -> str:
    """The segmentation group's description: which of ``p``'s other flags apply, and their
    defaults where they differ from classification's."""
    from .segmentation import SegmentationConfig
    from .segmentation.run import ADE20K_DEFAULTS, BUILTIN_DEFAULTS

    seg, flags = SegmentationConfig(), {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    shared = [f.name for f in dataclasses.fields(SegmentationConfig) if f.name in flags]
    differ = [f"{flags[n]} " + (_shown(getattr(seg, n)) if getattr(seg, n) is not None else
                                f"{BUILTIN_DEFAULTS[n]} (built-in) / {ADE20K_DEFAULTS[n]} (directory)")
              for n in shared if getattr(seg, n) != getattr(_D, n)]
    return ("Defaults: the quick-start recipe on the built-in shapes (no --data); mmseg's SETR-PUP ADE20K recipe "
            "for --data DIR, an ADE20K-layout directory (images/ and annotations/, each with training/ and "
            f"validation/). Of the other flags these apply: {', '.join(flags[n] for n in shared)}, the method "
            f"options and --resume; their defaults that differ here: {', '.join(differ)}; --model is timm's "
            "test_vit (16-pixel patches) at --crop-size. The others (--epochs, --protocol, --img-size, ...) are "
            "refused.")


def _add_segmentation_args(p: argparse.ArgumentParser) -> None:
    from .segmentation import DECODERS, SegmentationConfig
    from .segmentation.run import ADE20K_DEFAULTS, BUILTIN_DEFAULTS

    seg = SegmentationConfig()

    def recipe(name: str) -> str:
        return (f"default {_shown(BUILTIN_DEFAULTS[name])} on the built-in data, {_shown(ADE20K_DEFAULTS[name])} "
                "on a data directory")

    s = p.add_argument_group("segmentation (these flags apply to --task segmentation only)", _segmentation_note(p))
    s.add_argument("--decoder", choices=DECODERS, help="setr-pup: SETR's progressive upsampling head with auxiliary "
                   f"heads; linear: LayerNorm and a 1x1 classifier (default {seg.decoder})")
    s.add_argument("--decoder-channels", type=int, metavar="N", help=f"decoder width ({recipe('decoder_channels')})")
    s.add_argument("--out-indices", type=int, nargs="+", metavar="BLOCK", help="blocks whose maps the decoder and "
                   "auxiliary heads read (default: 9 14 19 23 for 24 blocks, the same fractions of the depth otherwise)")
    s.add_argument("--aux-weight", type=float, help=f"auxiliary heads' loss weight; 0: none (default {seg.aux_weight})")
    s.add_argument("--grad-checkpointing", action="store_const", const=True,
                   help="recompute each block's forward in backward: less memory (default off)")
    s.add_argument("--num-classes", type=int, metavar="N",
                   help="classes of a data directory (default 150, ADE20K's; the built-in data has 4)")
    s.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_const", const=False,
                   help="label 0 is a class (default: label 0, ADE20K's 'other', is ignored and 1..C are the classes)")
    s.add_argument("--crop-size", type=int, metavar="PX", help=f"training crop, sliding window and model input size "
                   f"({recipe('crop_size')})")
    s.add_argument("--train-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help=f"resize bound before the random ratio ({recipe('train_scale')})")
    s.add_argument("--ratio-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help=f"random resize ratios of --train-scale (default {_shown(seg.ratio_range)})")
    s.add_argument("--cat-max-ratio", type=float, help="redraw a crop (up to 10 times) while one class covers this "
                   f"share of its labelled pixels (default {seg.cat_max_ratio})")
    s.add_argument("--flip-prob", type=float, help=f"training horizontal flip probability (default {seg.flip_prob})")
    s.add_argument("--no-photometric", dest="photometric", action="store_const", const=False,
                   help="no brightness, contrast, saturation and hue distortion (default: distorted)")
    s.add_argument("--iterations", type=int, metavar="N", help=f"training iterations ({recipe('iterations')})")
    s.add_argument("--head-lr-mult", type=float, metavar="X", help="the decoder's and heads' learning rate is --lr "
                   f"times this (default {seg.head_lr_mult})")
    s.add_argument("--min-lr", type=float, help=f"poly decay's final learning rate ({recipe('min_lr')})")
    s.add_argument("--poly-power", type=float, help=f"poly decay's power (default {seg.poly_power})")
    s.add_argument("--eval-every", type=int, metavar="N", help="evaluate on the validation split every N iterations "
                   f"and after the last ({recipe('eval_every')})")
    s.add_argument("--stride", type=int, metavar="PX", help=f"sliding-window stride ({recipe('stride')})")
    s.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="evaluation resize bound (default: --train-scale)")
    _add_test_time_args(s)
    s.add_argument("--checkpoint-every", type=int, metavar="N", help="write the last checkpoint and resume.pt every "
                   f"N iterations ({recipe('checkpoint_every')})")
    s.add_argument("--log-every", type=int, metavar="N", help=f"steps.jsonl line every N iterations "
                   f"({recipe('log_every')})")
    s.add_argument("--stop-after-iteration", type=int, metavar="N", help="end this run after iteration N (checkpoints "
                   "written); --resume continues it (default: the last iteration)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="classification", choices=_tasks_available(),
                   help="classification: a head on image labels; segmentation: a decoder on pixel labels, "
                        "see the segmentation group (default %(default)s)")
    _add_model_args(p)
    _add_method_args(p)
    d = p.add_argument_group("data and protocol")
    d.add_argument("--data", metavar="PATH", help="image folder (<root>/<class>/* or <root>/<split>/<class>/*), "
                   "VTAB-1k list directory (train800.txt, val200.txt, train800val200.txt, test.txt), FGVC "
                   "directory (train.json, val.json, test.json) or 'builtin' (default: built-in generated images)")
    d.add_argument("--protocol", choices=["tune", "final", "max-test"],
                   help="tune: train train800 (FGVC, built-in: train), select on val200 (val), never read test; "
                        "final: train train800val200 (train+val), evaluate test once after the last epoch; "
                        "max-test: as final, but report the maximum test accuracy over epochs (selection on the "
                        "test set, as NOAH-lineage tables; labelled so). Default: final where the data has a "
                        "test split, else tune")
    d.add_argument("--train-split", help="replaces the protocol's training split (default: the protocol's)")
    d.add_argument("--eval-split", help="replaces the protocol's evaluation split; a tune run refuses test "
                   "(default: the protocol's)")
    d.add_argument("--augment", choices=["none", "crop-flip", "resized-crop-flip"],
                   help="training augmentation (default: crop-flip for FGVC, as VPT; none otherwise, as VTAB-1k)")
    d.add_argument("--val-fraction", type=float, default=_D.val_fraction,
                   help="image folder without split folders: share of each class held out as 'val' (default %(default)s)")
    d.add_argument("--limit-train", type=int, metavar="N", help="use a fixed subset of N training images (default: all)")
    d.add_argument("--limit-eval", type=int, metavar="N", help="use a fixed subset of N evaluation images (default: all)")
    _add_optimisation_args(p, {}, seed=True)
    r = p.add_argument_group("output")
    r.add_argument("--output", metavar="DIR", help="run directory (default: runs/<time>-<model>-<method>; "
                   "segmentation: runs/<time>-segmentation-<method>)")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR, classification or segmentation, with "
                   "its saved settings (default: a new run)")
    r.add_argument("--stop-after-epoch", type=int, metavar="N", help="end this run after epoch N (checkpoints "
                   "written); --resume continues it (default: the last epoch)")
    r.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                   help="auto: a bar on a terminal, plain lines otherwise (default %(default)s)")
    _add_run_args(p)
    _add_segmentation_args(p)


def _add_suite_args(p: argparse.ArgumentParser, suite: str) -> None:
    from .protocols import SUITES

    names = ", ".join(t.name for t in SUITES[suite].tasks)
    p.add_argument("root", metavar="ROOT", help=f"directory with one task directory per task ({names})")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks (default: every task under ROOT)")
    p.add_argument("--output", metavar="DIR", help="suite directory; re-running the same command continues it "
                   "(default: runs/<suite>-<model>-<method>-M<prompts>)")
    p.add_argument("--protocol", default="final", choices=["final", "max-test"],
                   help="the reported runs: final (default; test once, after the last epoch) or max-test "
                        "(maximum test accuracy over epochs, labelled as selection on the test set)")
    p.add_argument("--grid", nargs="?", const="vpt", default="none", choices=["none", "vpt"],
                   help="choose lr and weight decay first, by tune runs on the validation split: vpt (also "
                        "--grid alone) = VPT's "
                        "grid, lr {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05} x batch/256 and weight decay "
                        "{0.01, 0.001, 0.0001, 0}, for --optimizer sgd (default none: --lr and --weight-decay)")
    p.add_argument("--grid-lrs", type=float, nargs="+", metavar="LR",
                   help="your own lr grid, used as given (default: --grid's)")
    p.add_argument("--grid-wds", type=float, nargs="+", metavar="WD",
                   help="your own weight-decay grid (default: --grid's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the reported runs; mean +- std over "
                   "them (default 0; VPT used 42 44 82 100 800)")
    _add_model_args(p)
    _add_method_args(p)
    _add_optimisation_args(p, _SUITE_DEFAULTS, seed=False)
    p.add_argument_group("data").add_argument("--augment", choices=["none", "crop-flip", "resized-crop-flip"],
                                              help="default: none (VTAB-1k), crop-flip (FGVC)")
    _add_run_args(p)


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True, metavar="PATH", help="prompt checkpoint (.safetensors) "
                   "written by svpt train or svpt.save_prompts; or a segmentation checkpoint or run directory")
    p.add_argument("--config", metavar="PATH", help="the run's config.json (default: next to --prompts)")
    p.add_argument("--data", metavar="PATH", help="default: the run's data")
    p.add_argument("--eval-split", help="default: the run's evaluation split (segmentation: validation)")
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=_D.eval_batch_size, help="global batch (default %(default)s)")
    p.add_argument("--workers", type=int, help="loader processes (default: 0 on CPU, more on CUDA)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (default: a line of text)")
    s = p.add_argument_group("segmentation checkpoints only")
    _add_test_time_args(s)
    s.add_argument("--limit-eval", type=int, metavar="N", help="the first N images of the split (default: the run's)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svpt", description=__doc__.split("\n\n")[0],
                     epilog="Errors in what was asked are one line and exit code 2; SVPT_TRACEBACK=1 shows "
                            "their traceback.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train prompts (default: a quick run on built-in data)",
                                   description="Train VPT/SVPT/CVPT prompts of a frozen timm ViT: with a "
                                   "classifier head (default) or a segmentation decoder (--task segmentation)."))
    _add_eval_args(sub.add_parser("eval", help="score a saved prompt set",
                                  description="Evaluate a prompt checkpoint written by svpt train (accuracy), "
                                  "or a segmentation checkpoint or run directory (mIoU, mAcc, aAcc)."))
    for suite, title in (("vtab", "VTAB-1k"), ("fgvc", "FGVC")):
        _add_suite_args(sub.add_parser(suite, help=f"every {title} task under ROOT, the papers' protocol, one table",
                                       description=f"Run every {title} task found under ROOT: optional lr/wd grid "
                                       "on the validation split, then the final runs; results.md, results.csv, "
                                       "results.png. Resumable: run the same command again."), suite)
    sub.add_parser("env", help="versions, compilers and which backends are usable here")
    return parser


# ---------------------------------------------------------------- given flags
def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[command]  # noqa: SLF001 - argparse has no public way


def _explicit(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Only the arguments given on the command line ``argv`` (command first); argparse leaves
    pre-set attributes alone."""
    sub = _subparser(parser, argv[0])
    blank = argparse.Namespace(**{a.dest: _UNSET for a in sub._actions if a.dest != "help"})
    sub.parse_args(argv[1:], namespace=blank)
    return argparse.Namespace(**{k: v for k, v in vars(blank).items() if v is not _UNSET})


def _refuse(parser: argparse.ArgumentParser, given: argparse.Namespace, command: str, dests, where: str) -> None:
    """A ConfigError naming the flags of ``dests`` that were given: they do not apply ``where``."""
    flags = {a.dest: max(a.option_strings, key=len) for a in _subparser(parser, command)._actions if a.option_strings}
    wrong = [flags[d] for d in sorted(dests) if hasattr(given, d)]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply {where}")


def _config_fields(args: argparse.Namespace, names=_FIELDS) -> dict:
    """Config fields ``names`` from parsed args (only those present in ``args``), with
    ``model_kwargs`` and the method ``options`` derived."""
    fields = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if hasattr(args, "model_kwargs"):
        fields["model_kwargs"] = dict(args.model_kwargs or [])
    options = {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k, None) is not None}
    if options or any(hasattr(args, k) for k in _OPTION_FLAGS):
        fields["options"] = options
    return fields


def _resumed(saved, changes: dict, run_dir: str):
    """A run's saved config with the flags given now (the run refuses those that would change
    what it computes)."""
    if "options" in changes:
        changes = {**changes, "options": {**saved.options, **changes["options"]}}
    cfg = dataclasses.replace(saved, **{**changes, "output": run_dir})
    _check_device(cfg.device)
    return cfg


# ---------------------------------------------------------------- train
def _train_task(args: argparse.Namespace, given: argparse.Namespace) -> str:
    """--task, or with --resume the task of the run being continued."""
    if args.resume is None:
        return args.task
    from .segmentation import is_segmentation_run
    from .training.config import read_run_config

    read_run_config(args.resume)  # a ConfigError unless it is a run directory
    task = TASKS[1] if is_segmentation_run(args.resume) else TASKS[0]
    if getattr(given, "task", task) != task:
        raise ConfigError(f"--resume {args.resume} continues a {task} run; --task {given.task} does not match")
    return task


def _run_train(parser, argv: list[str], args: argparse.Namespace) -> int:
    given = _explicit(parser, argv)
    if _train_task(args, given) == "segmentation":
        return _run_segmentation_train(parser, given)
    _refuse(parser, given, "train", _segmentation_only(), "to classification; add --task segmentation")
    from .training import train
    from .training.config import read_run_config

    if args.resume is None:
        train(TrainConfig(**_config_fields(args)))
    else:
        saved = TrainConfig.from_json(read_run_config(args.resume)["settings"])
        train(_resumed(saved, _config_fields(given), args.resume), resume=True)
    return 0


@contextlib.contextmanager
def _segmentation_session(device: str | None):
    """torchrun's process group (svpt.segmentation runs in the caller's) and, in the main
    process, svpt.segmentation's progress log on stdout."""
    from .training.distributed import setup, teardown

    ctx = setup(device)
    logger = logging.getLogger(_SEGMENTATION_LOG)
    handler, level = logging.StreamHandler(sys.stdout), logger.level
    handler.setFormatter(logging.Formatter("%(message)s"))
    if ctx.main:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield ctx
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        teardown(ctx)


def _run_segmentation_train(parser, given: argparse.Namespace) -> int:
    from .segmentation import SegmentationConfig, train
    from .segmentation.run import read_run_config

    names = _field_names(SegmentationConfig) - {"model_kwargs", "options"}
    _refuse(parser, given, "train", set(vars(given)) - names - {"model_kwargs", "task", "resume", *_OPTION_FLAGS},
            "to --task segmentation (svpt train --help lists its flags)")
    fields = _config_fields(given, names)
    resume = getattr(given, "resume", None)
    if resume is None:
        cfg = SegmentationConfig(**fields)
    else:
        cfg = _resumed(SegmentationConfig.from_json(read_run_config(resume)["settings"]), fields, resume)
    with _segmentation_session(cfg.device) as ctx:
        result = train(cfg, resume=resume is not None)
        if ctx.main:
            print(_segmentation_summary(result, cfg.resolved()["iterations"]))
    return 0


def _scores(row: dict) -> str:
    return " ".join(f"{k} {100 * row[k]:.2f}" for k in ("mIoU", "mAcc", "aAcc"))


def _segmentation_summary(result: dict, iterations: int) -> str:
    from .segmentation.run import BEST

    run, last, best = result["run_dir"], result["last"], result["best"]
    if last.get("iteration") != iterations:  # a finished run evaluates after its last iteration
        return f"stopped before the last iteration ({iterations}); continue with: svpt train --resume {run}"
    return (f"result: {_scores(last)} (percent) after the last iteration ({iterations}), on {last['eval_images']} "
            f"validation images; best mIoU {100 * best['mIoU']:.2f} at iteration {best['iteration']} "
            f"({os.path.join(run, BEST)}); run directory {run}")


# ---------------------------------------------------------------- suites
def _run_suite(suite: str, args: argparse.Namespace) -> int:
    from .protocols import SuiteConfig, run_suite

    fields = _config_fields(args)
    base = TrainConfig(**{k: v for k, v in fields.items() if k not in ("output", "protocol")})
    cfg = SuiteConfig(suite=suite, root=args.root, output=args.output, base=base, tasks=args.tasks,
                      protocol=args.protocol, grid=args.grid, grid_lrs=args.grid_lrs, grid_wds=args.grid_wds,
                      seeds=args.seeds)
    outcome = run_suite(cfg)
    return 0 if not outcome.failed else 1


# ---------------------------------------------------------------- eval
def _is_segmentation(path: str) -> bool:
    from .segmentation import is_segmentation_checkpoint, is_segmentation_run

    return is_segmentation_run(path) if os.path.isdir(path) else is_segmentation_checkpoint(path)


def _run_eval(parser, argv: list[str], args: argparse.Namespace) -> int:
    given = _explicit(parser, argv)
    if _is_segmentation(args.prompts):
        return _run_segmentation_eval(parser, given)
    _refuse(parser, given, "eval", _SEGMENTATION_EVAL_ONLY, "to classification prompts, only to segmentation checkpoints")
    if os.path.isdir(args.prompts):
        raise ConfigError(f"--prompts {args.prompts!r} is a directory but not a segmentation run; give a prompt "
                          "checkpoint, e.g. its prompts_last.safetensors")
    from .training import evaluate_prompts

    result = evaluate_prompts(args.prompts, data=args.data, eval_split=args.eval_split, model=args.model,
                              model_kwargs=dict(args.model_kwargs) if args.model_kwargs else None,
                              weights=args.weights, img_size=args.img_size, batch_size=args.batch_size,
                              workers=args.workers, backend=args.backend, device=args.device, amp=args.amp,
                              config=args.config)
    if args.json:
        print(json.dumps(result))
    return 0


def _run_segmentation_eval(parser, given: argparse.Namespace) -> int:
    """The checkpoint (or the run's best, else its last) scored as its run's config.json says,
    with the flags given replacing those settings; the library logs the scores."""
    from .segmentation import evaluate

    _refuse(parser, given, "eval", set(vars(given)) - {*_SEGMENTATION_EVAL_OVERRIDES, "prompts", "eval_split", "json"},
            "to a segmentation checkpoint: its run's config.json says how it was built")
    overrides = {k: getattr(given, k) for k in _SEGMENTATION_EVAL_OVERRIDES if hasattr(given, k)}
    where = {"run_dir": given.prompts} if os.path.isdir(given.prompts) else {"checkpoint": given.prompts}
    with _segmentation_session(overrides.get("device")) as ctx:
        result = evaluate(**where, split=getattr(given, "eval_split", "validation"), **overrides)
    if getattr(given, "json", False) and ctx.main:
        print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- main
def _user_message(exc: Exception) -> str:
    # A DataError raised in a DataLoader worker arrives wrapped with the worker's traceback;
    # its last line is the original message.
    text = str(exc)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())  # one line


def _dispatch(parser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    _check_device(getattr(args, "device", None))
    if args.command == "env":
        from .env import report
        print(report())
        return 0
    if args.command == "train":
        return _run_train(parser, argv, args)
    if args.command in ("vtab", "fgvc"):
        return _run_suite(args.command, args)
    return _run_eval(parser, argv, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = argv[0] if argv else "svpt"
    try:
        return _dispatch(parser, argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("SVPT_TRACEBACK"):
            raise
        print(f"svpt {command}: error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = _resume_hint(argv)
        print("\ninterrupted; the last checkpoint written is kept"
              + (f"; continue with: {where}" if where else ""), file=sys.stderr)
        return 130


def _resume_hint(argv: list[str]) -> str | None:
    for flag in ("--resume", "--output"):
        if flag in argv[:-1] and argv[:1] == ["train"]:
            return f"svpt train --resume {argv[argv.index(flag) + 1]}"
    return f"the same svpt {argv[0]} command" if argv[:1] in (["vtab"], ["fgvc"]) else None


if __name__ == "__main__":
    sys.exit(main())
