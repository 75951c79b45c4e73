"""The ``svpt`` command: ``svpt train``, ``svpt eval``, ``svpt vtab``, ``svpt fgvc``, ``svpt env``.

``svpt train`` with no arguments trains SVPT prompts of a tiny ViT on the built-in generated
images and reports their test accuracy (about a minute on two CPU cores). Several GPUs:
``torchrun --nproc_per_node=N -m svpt train ...``. ``svpt vtab ROOT`` / ``svpt fgvc ROOT`` run
every task of the suite found under ROOT with the papers' protocol and write the table.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import sys

from .training.config import TrainConfig

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
           "workers", "threads", "device", "device_data", "stop_after_epoch", "progress")


# ---------------------------------------------------------------- argument types
def _model_kwargs(items: list[str] | None) -> dict:
    """KEY=VALUE pairs; values are Python literals (4, 0.1, True, 'avg') or else strings."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f"--model-kwargs {item!r} is not KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _ae_layers(text: str):
    if text == "all":
        return None
    if text == "none":
        return []
    try:
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ae-layers {text!r}: give 'all', 'none' or block indices like 0,1,5") from None


def _tasks_available() -> list[str]:
    """``--task`` choices: segmentation once its package (svpt.segmentation) exists."""
    has_segmentation = importlib.util.find_spec("svpt.segmentation") is not None
    return ["classification"] + (["segmentation"] if has_segmentation else [])


# ---------------------------------------------------------------- argument groups
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm ViT name, e.g. vit_base_patch16_224 (default: timm's test_vit with "
                   "4-pixel patches, a tiny random-init model for the built-in data)")
    g.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", help="extra timm.create_model arguments, "
                   "e.g. drop_path_rate=0.1 global_pool=avg")
    g.add_argument("--weights", metavar="PATH", help="backbone weights: .npz (original ViT format, e.g. "
                   "ViT-B_16.npz), .pth/.pt/.bin or .safetensors; loaded by timm, never downloaded "
                   "(default: random init)")
    g.add_argument("--img-size", type=int, help="input size (default: the built-in data's 32, else the model's)")
    g.add_argument("--backend", default="auto", choices=["auto", "eager", "triton", "cpp"],
                   help="svpt op backend (default: auto, the fastest usable one)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("method (options default to docs/method.md's)")
    m.add_argument("--method", default="svpt", choices=["vpt-shallow", "vpt-deep", "svpt", "cvpt"])
    m.add_argument("--num-prompts", type=int, default=_D.num_prompts, help=f"prompts per layer (default {_D.num_prompts})")
    m.add_argument("--prompt-dropout", type=float, help="all methods (default 0)")
    m.add_argument("--da-init-bias", type=float, help="svpt (default -2.0)")
    m.add_argument("--ae-init", type=float, help="svpt (default 0.0)")
    m.add_argument("--ae-ratio", type=float, help="svpt (default 0.25)")
    m.add_argument("--ae-source", choices=["cls", "prompt"], help="svpt (default cls)")
    m.add_argument("--ae-layers", type=_ae_layers, help="svpt: all (default), none, or indices like 0,1,5")
    m.add_argument("--no-cdc", dest="cdc", action="store_const", const=False, help="svpt: no cross-layer connection")
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
    o.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    o.add_argument("--momentum", type=float, default=_D.momentum, help="SGD momentum (default 0.9)")
    o.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"],
                   help="linear warm-up, then cosine decay to 0, per step (default %(default)s)")
    o.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 on CUDA (default: bf16 autocast)")
    if seed:
        o.add_argument("--seed", type=int, default=0)


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
                        "split of tune / max-test runs too); never: a DataLoader every epoch")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="classification", choices=_tasks_available(),
                   help="what to train (default classification)")
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
    d.add_argument("--train-split", help="replaces the protocol's training split")
    d.add_argument("--eval-split", help="replaces the protocol's evaluation split (a tune run refuses test)")
    d.add_argument("--augment", choices=["none", "crop-flip", "resized-crop-flip"],
                   help="training augmentation (default: crop-flip for FGVC, as VPT; none otherwise, as VTAB-1k)")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="image folder without split folders: share of each class held out as 'val' (default 0.1)")
    d.add_argument("--limit-train", type=int, metavar="N", help="use a fixed random subset of N training images")
    d.add_argument("--limit-eval", type=int, metavar="N", help="use a fixed random subset of N evaluation images")
    _add_optimisation_args(p, {}, seed=True)
    r = p.add_argument_group("output")
    r.add_argument("--output", metavar="DIR", help="run directory (default: runs/<time>-<model>-<method>)")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its saved settings")
    r.add_argument("--stop-after-epoch", type=int, metavar="N", help="end this run after epoch N (checkpoints "
                   "written); --resume continues it")
    r.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                   help="auto: a bar on a terminal, plain lines otherwise")
    _add_run_args(p)


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
    p.add_argument("--grid-lrs", type=float, nargs="+", metavar="LR", help="your own lr grid (used as given)")
    p.add_argument("--grid-wds", type=float, nargs="+", metavar="WD", help="your own weight-decay grid")
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
                   "written by svpt train or svpt.save_prompts")
    p.add_argument("--config", metavar="PATH", help="the run's config.json (default: next to --prompts)")
    p.add_argument("--data", metavar="PATH", help="default: the run's data")
    p.add_argument("--eval-split", help="default: the run's evaluation split")
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=_D.eval_batch_size)
    p.add_argument("--workers", type=int)
    p.add_argument("--device")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svpt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_args(sub.add_parser("train", help="train prompts (default: a quick run on built-in data)",
                                   description="Train VPT/SVPT/CVPT prompts of a frozen timm ViT."))
    _add_eval_args(sub.add_parser("eval", help="score a saved prompt set",
                                  description="Evaluate a prompt checkpoint written by svpt train."))
    for suite, title in (("vtab", "VTAB-1k"), ("fgvc", "FGVC")):
        _add_suite_args(sub.add_parser(suite, help=f"every {title} task under ROOT, the papers' protocol, one table",
                                       description=f"Run every {title} task found under ROOT: optional lr/wd grid "
                                       "on the validation split, then the final runs; results.md, results.csv, "
                                       "results.png. Resumable: run the same command again."), suite)
    sub.add_parser("env", help="versions, compilers and which backends are usable here")
    return parser


# ---------------------------------------------------------------- train
def _config_fields(args: argparse.Namespace) -> dict:
    """TrainConfig fields from parsed args (only those present in ``args``)."""
    fields = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    if hasattr(args, "model_kwargs"):
        fields["model_kwargs"] = _model_kwargs(args.model_kwargs)
    options = {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k, None) is not None}
    if options or any(hasattr(args, k) for k in _OPTION_FLAGS):
        fields["options"] = options
    return fields


def _explicit(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Only the arguments given on the command line (argparse leaves pre-set attributes alone)."""
    sub = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001 - argparse has no public way
    blank = argparse.Namespace(**{a.dest: _UNSET for a in sub._actions if a.dest != "help"})
    sub.parse_args(argv, namespace=blank)
    return argparse.Namespace(**{k: v for k, v in vars(blank).items() if v is not _UNSET})


def _run_train(parser, argv: list[str], args: argparse.Namespace) -> int:
    from .training import TrainConfig, train
    from .training.config import read_run_config

    del args.task  # classification: segmentation was handed over before parsing (_dispatch)
    if args.resume is None:
        train(TrainConfig(**_config_fields(args)))
        return 0
    explicit = _explicit(parser, argv)
    del explicit.resume
    explicit.__dict__.pop("task", None)
    cfg = TrainConfig.from_json(read_run_config(args.resume)["settings"])
    changes = _config_fields(explicit)
    if "options" in changes:
        changes["options"] = {**cfg.options, **changes["options"]}
    for key, value in changes.items():
        setattr(cfg, key, value)
    cfg.output = args.resume
    train(cfg, resume=True)
    return 0


def _run_segmentation(argv: list[str]) -> int:
    """``svpt train --task segmentation ...``: the rest of the command line goes to
    ``svpt.segmentation.main(argv)``, which owns its options."""
    module = importlib.import_module("svpt.segmentation")
    if not hasattr(module, "main"):
        raise ValueError("svpt.segmentation has no main(argv); the segmentation task is not usable from the CLI yet")
    return module.main(argv)


def _segmentation_argv(argv: list[str]) -> list[str] | None:
    """The rest of a ``train --task segmentation`` command line, when that task exists and is
    asked for (its options are not ours, so it is handed over before parsing)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    known, rest = pre.parse_known_args(argv)
    return rest if known.task == "segmentation" and "segmentation" in _tasks_available() else None


def _run_suite(suite: str, args: argparse.Namespace) -> int:
    from .protocols import SuiteConfig, run_suite

    fields = _config_fields(args)
    base = TrainConfig(**{k: v for k, v in fields.items() if k not in ("output", "protocol")})
    cfg = SuiteConfig(suite=suite, root=args.root, output=args.output, base=base, tasks=args.tasks,
                      protocol=args.protocol, grid=args.grid, grid_lrs=args.grid_lrs, grid_wds=args.grid_wds,
                      seeds=args.seeds)
    outcome = run_suite(cfg)
    return 0 if not outcome.failed else 1


def _run_eval(args: argparse.Namespace) -> int:
    from .training import evaluate_prompts

    result = evaluate_prompts(args.prompts, data=args.data, eval_split=args.eval_split, model=args.model,
                              model_kwargs=_model_kwargs(args.model_kwargs) if args.model_kwargs else None,
                              weights=args.weights, img_size=args.img_size, batch_size=args.batch_size,
                              workers=args.workers, backend=args.backend, device=args.device, amp=args.amp,
                              config=args.config)
    if args.json:
        print(json.dumps(result))
    return 0


def _user_message(exc: Exception) -> str:
    # A DataError raised in a DataLoader worker arrives wrapped with the worker's traceback;
    # its last line is the original message.
    text = str(exc)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def _dispatch(parser, argv: list[str]) -> int:
    segmentation = _segmentation_argv(argv[1:]) if argv[:1] == ["train"] else None
    if segmentation is not None:
        return _run_segmentation(segmentation)
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import report
        print(report())
        return 0
    if args.command == "train":
        return _run_train(parser, argv[1:], args)
    if args.command in ("vtab", "fgvc"):
        return _run_suite(args.command, args)
    return _run_eval(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = argv[0] if argv else "svpt"
    try:
        return _dispatch(parser, argv)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if os.environ.get("SVPT_TRACEBACK"):
            raise
        print(f"svpt {command}: error: {_user_message(exc)}", file=sys.stderr)
        print("(set SVPT_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = _resume_hint(argv)
        print("\ninterrupted; the last finished epoch's checkpoint is kept"
              + (f"; continue with: {where}" if where else ""), file=sys.stderr)
        return 130


def _resume_hint(argv: list[str]) -> str | None:
    for flag in ("--resume", "--output"):
        if flag in argv[:-1] and argv[:1] == ["train"]:
            return f"svpt train --resume {argv[argv.index(flag) + 1]}"
    return f"the same svpt {argv[0]} command" if argv[:1] in (["vtab"], ["fgvc"]) else None


if __name__ == "__main__":
    sys.exit(main())
