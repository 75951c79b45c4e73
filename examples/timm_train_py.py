"""Run timm's own train.py and validate.py on prompted models: the README's patch, every mode.

    git clone https://github.com/huggingface/pytorch-image-models /tmp/timm-src
    python examples/timm_train_py.py --timm-src /tmp/timm-src            # CPU, ~2 min on 2 cores

timm's scripts are not in the timm wheel, so this is run by hand, not in CI (tests/test_timm_train.py
drives the helpers they are built on). It copies train.py and validate.py into --work (default: a new
temporary directory, printed), patched as docs/timm.md shows (one line after ``create_model``; for the
prompt-only runs also ``utils.CheckpointSaver(`` -> ``svpt.timm_support.PromptCheckpointSaver(``),
writes a tiny ImageFolder (3 classes of generated 32x32 images) and a random-init ViT as the
"pretrained" backbone file, runs each mode and prints one line per mode: what ran, pass or fail,
seconds, and what was checked (the backbone bit-identical in the checkpoint, the checkpoint's size,
the validation result). Nothing is written outside --work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

MODEL_KWARGS = ["img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"]
MODEL = ["--model", "test_vit", "--num-classes", "3", "--input-size", "3", "32", "32", "--device", "cpu",
         "--workers", "0", "--no-prefetcher", "-b", "8"]
SCHEDULE = ["--warmup-epochs", "0", "--sched", "cosine", "--lr", "0.01", "--opt", "adamw", "--log-interval", "1",
            "--checkpoint-hist", "2"]
# The patch after create_model; for validate.py the method comes from the checkpoint.
TRAIN_PATCH = '    import svpt; svpt.fused.apply(model, "{method}", num_prompts=4, num_classes=args.num_classes)\n'
VALIDATE_PATCH = "    import svpt; svpt.timm_support.prompt_from_checkpoint(model, args.checkpoint)\n"
VALIDATE_BY_HAND = '    import svpt; svpt.fused.apply(model, "svpt", num_prompts=4, num_classes=args.num_classes)\n'


def patched(source: str, line: str, prompt_only_saver: bool) -> str:
    """``source`` with ``line`` after its ``model = create_model(...)`` statement."""
    match = re.search(r"\n    model = create_model\((.*?)\n    \)\n", source, re.S)
    if match is None:
        raise SystemExit("no `model = create_model(...)` statement found: a timm revision this script does not know")
    source = source[:match.end()] + line + source[match.end():]
    if prompt_only_saver:
        source = source.replace("utils.CheckpointSaver(", "svpt.timm_support.PromptCheckpointSaver(")
    return source


def write_scripts(timm_src: str, work: str) -> None:
    for name, variants in (("train.py", {"svpt": None, "cvpt": None, "vpt-deep": None}),
                           ("validate.py", {"meta": VALIDATE_PATCH, "by_hand": VALIDATE_BY_HAND})):
        with open(os.path.join(timm_src, name)) as f:
            source = f.read()
        for variant, line in variants.items():
            if name == "train.py":
                for saver in ("whole", "prompts"):
                    out = os.path.join(work, f"train_{variant}_{saver}.py")
                    with open(out, "w") as f:
                        f.write(patched(source, TRAIN_PATCH.format(method=variant), saver == "prompts"))
            else:
                with open(os.path.join(work, f"validate_{variant}.py"), "w") as f:
                    f.write(patched(source, line, False))


def write_data(work: str) -> tuple[str, str]:
    """An ImageFolder (train/ and validation/, 3 classes) and the backbone file."""
    from PIL import Image
    import timm

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("validation", 8)):
        for label in range(3):
            folder = os.path.join(work, "data", split, f"class{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = (torch.rand(32, 32, 3, generator=g) * 80 + 80 * label).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    backbone = os.path.join(work, "backbone.pth")
    torch.save(vit.state_dict(), backbone)
    return os.path.join(work, "data"), backbone


def run(work: str, name: str, script: str, args: list[str]) -> tuple[bool, float, str]:
    """Run ``script`` with ``args``; its command and output go to logs/<name>.log."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.join(work, script), *args], cwd=work, capture_output=True,
                          text=True)
    log = done.stdout + done.stderr
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    with open(os.path.join(work, "logs", re.sub(r"[^\w.-]+", "_", name).strip("_") + ".log"), "w") as f:
        f.write(" ".join([script, *args]) + "\n" + log)
    return done.returncode == 0, time.perf_counter() - start, log


def backbone_unchanged(checkpoint: str, backbone: str) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    reference = torch.load(backbone, map_location="cpu")
    frozen = [k for k in reference if not k.startswith("head.")]
    if "prompter.prompts" not in state:
        return f"prompt-only state dict ({len(state)} entries, {os.path.getsize(checkpoint) / 1024:.0f} KB)"
    same = all(torch.equal(state[k], reference[k]) for k in frozen)
    return (f"backbone {'bit-identical' if same else 'CHANGED'} in the checkpoint "
            f"({os.path.getsize(checkpoint) / 1024:.0f} KB)")


def last_line(log: str, pattern: str) -> str:
    lines = [line.strip() for line in log.splitlines() if re.search(pattern, line)]
    return lines[-1][:150] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-src", required=True, help="a checkout of pytorch-image-models (its train.py, validate.py)")
    parser.add_argument("--work", help="working directory (default: a new temporary one)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="svpt-timm-")
    os.makedirs(work, exist_ok=True)
    print(f"working in {work}")
    write_scripts(args.timm_src, work)
    data, backbone = write_data(work)
    out = os.path.join(work, "output")
    pretrained = ["--pretrained", "--pretrained-path", backbone]

    def model(*kwargs):
        return ["--data-dir", data, *MODEL, "--model-kwargs", *MODEL_KWARGS, *kwargs]

    def train(name, script, *extra, epochs=2):
        return name, script, [*model(), *SCHEDULE, "--epochs", str(epochs), *pretrained, "--output", out,
                              "--experiment", name, *extra]

    def validate(name, script, checkpoint_of, *extra, kwargs=()):
        return name, script, [*model(*kwargs), "--split", "validation", "--checkpoint", checkpoint(checkpoint_of),
                              *extra]

    def checkpoint(name):
        return os.path.join(out, name, "last.pth.tar")

    ema = ("--model-ema", "--model-ema-decay", "0.9")
    modes = [
        train("plain", "train_svpt_whole.py"),
        train("model-ema", "train_svpt_whole.py", *ema),
        train("amp-bf16", "train_svpt_whole.py", "--amp", "--amp-dtype", "bfloat16"),
        train("grad-checkpointing", "train_svpt_whole.py", "--grad-checkpointing"),
        train("torchcompile", "train_svpt_whole.py", "--torchcompile"),
        train("drop-path", "train_svpt_whole.py", "--drop-path", "0.1", "--drop", "0.1"),
        train("cvpt", "train_cvpt_whole.py"),
        train("vpt-deep", "train_vpt-deep_whole.py"),
        train("resume", "train_svpt_whole.py", "--resume", checkpoint("plain"), epochs=3),
        validate("validate (method by hand)", "validate_by_hand.py", "plain"),
        train("prompt-only saver", "train_svpt_prompts.py", *ema),
        train("prompt-only resume", "train_svpt_prompts.py", "--resume", checkpoint("prompt-only saver"), *ema,
              epochs=3),
        validate("validate (method from checkpoint)", "validate_meta.py", "prompt-only saver", "--pretrained",
                 kwargs=[f"pretrained_cfg_overlay={{'file': '{backbone}'}}"]),
        validate("validate EMA (method from checkpoint)", "validate_meta.py", "prompt-only saver", "--pretrained",
                 "--use-ema", kwargs=[f"pretrained_cfg_overlay={{'file': '{backbone}'}}"]),
        validate("validate without --pretrained (refused)", "validate_meta.py", "prompt-only saver"),
        train("--initial-checkpoint prompted (refused by timm)", "train_svpt_whole.py", "--initial-checkpoint",
              checkpoint("plain")),
    ]
    expected_failures = ("refused",)
    rows = []
    for name, script, mode_args in modes:
        ok, seconds, log = run(work, name, script, mode_args)
        note = ""
        if ok and name.startswith("validate"):
            note = last_line(log, r"\* Acc@1|top1")
        elif ok and os.path.exists(checkpoint(name)):
            note = backbone_unchanged(checkpoint(name), backbone)
        if "svpt: these settings" in log:
            note += " | warned: " + last_line(log, "svpt: these settings")[:100]
        if not ok:
            note = last_line(log, r"Error|error") or log.strip().splitlines()[-1][:150]
        as_expected = ok != any(word in name for word in expected_failures)
        rows.append({"mode": name, "script": script, "exit": "ok" if ok else "failed",
                     "as expected": as_expected, "seconds": round(seconds, 1), "checked": note})
        status = ("ok" if ok else "failed") + ("" if as_expected else " (UNEXPECTED)")
        print(f"{name:<48} {status:<20} {seconds:6.1f}s  {note}", flush=True)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if all(r["as expected"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
