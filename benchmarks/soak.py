"""Soak test (issue 8): minutes of fused prompt training, sampling allocated memory and step time.

    PYTHONPATH=. python benchmarks/soak.py --minutes 5 --batch-size 256 \
        --out benchmarks/results/soak_h200.json

Trains ``--method`` prompts (default SVPT, M=50) of a frozen ``--model`` (default ViT-B/16, timm's
random init: no download, the speed and memory do not depend on the weights) with
``svpt.fused.apply`` (backend ``auto``: Triton on CUDA), bf16 autocast and AdamW, on synthetic
images made on the device (so the data loader is not what is measured), for ``--minutes``.
Every step is timed between two synchronisations, and ``torch.cuda.memory_allocated`` is read at
the same point of every step (after ``optimizer.step`` and ``zero_grad(set_to_none=True)``): in a
steady state it is the same number every step.

Verdict (written to the JSON and the exit status, 0 = pass):
* no memory growth: after the warm-up, allocated memory at the step boundary grows by at most
  ``--max-growth-mib`` (default 8 MiB) from the first to the last sample, and the peak
  (``max_memory_allocated``) of the second half is not above the first half's by more than that;
* no slowdown: the median step time of the last minute is at most ``--max-slowdown`` (default
  5%) above the median of the first minute after warm-up.

A CPU smoke run checks the script itself (seconds, tiny model):
    PYTHONPATH=. python benchmarks/soak.py --device cpu --model test_vit --batch-size 8 --minutes 0.1 \
        --warmup-steps 2 --out /tmp/soak_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--method", default="svpt", choices=["vpt-shallow", "vpt-deep", "svpt", "cvpt"])
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="autocast dtype (fp32: none)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps excluded from the verdict")
    p.add_argument("--max-growth-mib", type=float, default=8.0)
    p.add_argument("--max-slowdown", type=float, default=0.05)
    p.add_argument("--out", default="benchmarks/results/soak.json")
    return p.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    return 0, 0


def build(args, device):
    import timm

    import svpt

    kwargs = {"img_size": 32, "patch_size": 8} if args.model == "test_vit" else {}
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    svpt.fused.apply(model, args.method, args.num_prompts, num_classes=args.num_classes, backend=args.backend)
    model.to(device).train()
    size = model.patch_embed.img_size
    return model, (args.batch_size, 3, *size)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as users train; fp32 numerics are not measured here
    torch.manual_seed(0)
    model, shape = build(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # A fixed pool of synthetic batches made on the device: no host transfer inside the timed loop.
    gen = torch.Generator(device=device).manual_seed(1)
    pool = [(torch.randn(shape, generator=gen, device=device),
             torch.randint(0, args.num_classes, (shape[0],), generator=gen, device=device)) for _ in range(4)]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    samples = []
    start = time.perf_counter()
    deadline = start + 60 * args.minutes
    step = 0
    synchronize(device)
    while time.perf_counter() < deadline or step <= args.warmup_steps + 1:
        images, labels = pool[step % len(pool)]
        t0 = time.perf_counter()
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        t1 = time.perf_counter()
        mem, peak = allocated(device)
        samples.append({"step": step, "t": t1 - start, "step_s": t1 - t0, "allocated": mem, "max_allocated": peak,
                        "loss": loss.item()})
        step += 1

    steady = [s for s in samples if s["step"] >= args.warmup_steps]
    t_first = steady[0]["t"]
    first = [s["step_s"] for s in steady if s["t"] - t_first <= 60] or [steady[0]["step_s"]]
    last = [s["step_s"] for s in steady if samples[-1]["t"] - s["t"] <= 60] or [steady[-1]["step_s"]]
    half = len(steady) // 2
    growth = steady[-1]["allocated"] - steady[0]["allocated"]
    peak_growth = (max(s["max_allocated"] for s in steady[half:]) - max(s["max_allocated"] for s in steady[:half])
                   if half else 0)
    slowdown = statistics.median(last) / statistics.median(first) - 1
    mib = 2 ** 20
    verdict = {
        "memory_growth_mib": growth / mib, "peak_growth_mib": peak_growth / mib,
        "median_step_first_minute_s": statistics.median(first), "median_step_last_minute_s": statistics.median(last),
        "slowdown": slowdown,
        "no_memory_growth": growth <= args.max_growth_mib * mib and peak_growth <= args.max_growth_mib * mib,
        "no_slowdown": slowdown <= args.max_slowdown,
    }
    verdict["passed"] = verdict["no_memory_growth"] and verdict["no_slowdown"] and all(
        s["loss"] == s["loss"] for s in samples)  # and no NaN loss
    import svpt
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "settings": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "svpt": svpt.__version__, "python": platform.python_version()},
        "backend": svpt.get_backend(), "steps": len(samples), "duration_s": samples[-1]["t"],
        "images_per_s": args.batch_size * len(steady) / max(1e-9, sum(s["step_s"] for s in steady)),
        "verdict": verdict, "samples": samples,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    return 0 if verdict["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
