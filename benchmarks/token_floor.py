"""svpt's fused methods against what users would otherwise run, in one run on one GPU.

    PYTHONPATH=. python benchmarks/token_floor.py --out benchmarks/results/token_floor_h200
    PYTHONPATH=. python benchmarks/token_floor.py --img 512 --batch 16 --rows token-floor,plain-svpt,svpt \\
        --out benchmarks/results/token_floor_512_h200

A training step is forward + backward + SGD under bf16 autocast (ViT-B/16 or --model, random init), timed
with CUDA events; the median of ``--iters`` steps after warm-up (compilation included in the
warm-up), and the allocator's peak over the timed steps. Rows, each not compiled and compiled:
the frozen backbone with no prompts (one trainable token added), the token floor (VPT-shallow
with the same M prompts through timm's blocks), timm VPT-deep with SDPA, a plain-PyTorch SVPT
with SDPA, the research-code SVPT (svpt's eager backend: T x T probabilities), and svpt's SVPT,
VPT-deep and CVPT on the selected backend. Ratios are taken inside
this run. ``--profile`` adds each row's GPU kernel time per step by kernel (torch.profiler) and the GPU's
idle time in the step: before its first kernel, and inside it by the kernel the GPU waited for.
Rows asked for by name only (``--rows``) change one of those: a hand-over the backend does not
declare (HAND_OVERS), or drops (``cvpt-own-kernels`` runs the fused fold kernel also where the backend
hands it to svpt.fusible under torch.compile), or Inductor options (COMPILE_OPTIONS).
Writes OUT.json and OUT.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import svpt  # noqa: E402
from svpt import backends  # noqa: E402
from baselines import NoPromptFloor, PlainSVPT, TimmVPTDeep, TimmVPTShallow  # noqa: E402


BACKBONE = {"name": "vit_base_patch16_224"}  # --model


def vit(img: int):
    import timm
    torch.manual_seed(0)
    return timm.create_model(BACKBONE["name"], pretrained=False, num_classes=100, img_size=img)


ROWS = {  # name -> (factory(img, M), svpt backend: None = --backend)
    "no-prompts": (lambda img, m: NoPromptFloor(vit(img)), None),
    "token-floor": (lambda img, m: TimmVPTShallow(vit(img), m), None),
    "timm-vpt-deep": (lambda img, m: TimmVPTDeep(vit(img), m), None),
    "plain-svpt": (lambda img, m: PlainSVPT(vit(img), m), None),
    "research-svpt": (lambda img, m: svpt.prompt(vit(img), "svpt", m), "eager"),  # T x T probabilities
    "svpt": (lambda img, m: svpt.prompt(vit(img), "svpt", m), None),
    "vpt-deep": (lambda img, m: svpt.prompt(vit(img), "vpt-deep", m), None),
    "cvpt": (lambda img, m: svpt.prompt(vit(img), "cvpt", 10), None),
}
# Hand-overs against the backend's declarations: row -> (the row it changes, {op: implementation}), each
# implementation preferred for its op (every dtype, on CUDA) for the row's run; None: the backend's own
# kernel also while torch.compile traces (its "compiling" PREFER rules dropped), for the A/B of those rules.
HAND_OVERS = {
    "vpt-deep-sdpa-kv": ("vpt-deep", {"prompt_kv_attention": "sdpa"}),
    "vpt-deep-split": ("vpt-deep", {"prompt_kv_attention": "split"}),
    "cvpt-own-kernels": ("cvpt", {"folded_cross_attention": None}),
}
# Rows compiled with Inductor options: row -> (the row it changes, torch.compile(options=...)).
COMPILE_OPTIONS = {
    "svpt-static-launch": ("svpt", {"static_launch_user_defined_triton_kernels": True}),
}
DEFAULT_ROWS = ",".join(ROWS)
ROWS |= {name: ROWS[base] for name, (base, _) in (HAND_OVERS | COMPILE_OPTIONS).items()}


@contextlib.contextmanager
def preferring(row: str):
    """The row's hand-overs (HAND_OVERS) as the selected backend's PREFER rules, for the block."""
    if row not in HAND_OVERS:
        yield
        return
    prefer = backends.resolve(torch.device("cuda")).PREFER
    saved = {op: prefer.get(op) for op in HAND_OVERS[row][1]}
    for op, use in HAND_OVERS[row][1].items():
        prefer[op] = ([rule for rule in saved[op] or () if not rule.get("compiling")] if use is None else
                      [{"devices": ("cuda",), "use": use, "why": row}])
    backends._KERNELS.clear()  # noqa: SLF001 - resolved kernels are cached per configuration
    try:
        yield
    finally:
        for op, rules in saved.items():
            prefer.pop(op) if rules is None else prefer.__setitem__(op, rules)
        backends._KERNELS.clear()  # noqa: SLF001


def make_step(model, images, labels, compiled: bool, options: dict | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def loss_fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.nn.functional.cross_entropy(model(images), labels)

    forward = torch.compile(loss_fn, options=options) if compiled else loss_fn

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


MARK = "spin_kernel"  # torch.cuda._sleep's kernel: where each profiled step starts on the GPU


def kernel_profile(step, steps: int = 5) -> dict:
    """GPU kernel time per step by kernel, and the GPU's idle time per step: before the step's first
    kernel (the host's prologue: guards, the first launches) and between kernels inside it, by the
    kernel that ended the wait. Each step is synchronised, as in the timed loop."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.cuda._sleep(1)  # noqa: SLF001  a marker kernel, launched just before the step
            step()
            torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    return gpu_timeline(spans, steps)


def gpu_timeline(spans: list[tuple[float, float, str]], steps: int) -> dict:
    """``kernel_profile``'s sums over GPU spans (start us, end us, name) sorted by start, each step's
    led by a MARK kernel."""
    kernels, waits = defaultdict(float), defaultdict(float)
    idle_start = idle_inside = 0.0
    busy_until, first = 0.0, False
    for begin, end, name in spans:
        if MARK in name:  # demangled: at::cuda::(anonymous namespace)::spin_kernel(long)
            busy_until, first = end, True
            continue
        kernels[name] += (end - begin) / 1000 / steps
        wait = max(0.0, begin - busy_until) / 1000 / steps
        if first:
            idle_start += wait
        else:
            idle_inside += wait
            waits[name] += wait
        busy_until, first = max(busy_until, end), False
    return {"gpu_ms": sum(kernels.values()), "kernels": sorted(kernels.items(), key=lambda kv: -kv[1]),
            "idle_start_ms": idle_start, "idle_inside_ms": idle_inside,
            "top_waits": sorted(waits.items(), key=lambda kv: -kv[1])[:8]}


def measure(name: str, compiled: bool, args, images, labels) -> dict:
    factory, backend = ROWS[name]
    with svpt.backend(backend or args.backend), preferring(name):
        return _measure(name, factory, compiled, args, images, labels)


def _measure(name: str, factory, compiled: bool, args, images, labels) -> dict:
    model = factory(args.img, args.num_prompts).cuda()
    step = make_step(model, images, labels, compiled, COMPILE_OPTIONS.get(name, (None, None))[1])
    for _ in range(args.warmup):
        step()
    ran = None
    if not compiled:  # what ran each op (a compiled step calls no Python to record)
        with backends.trace() as log:
            step()
        ran = sorted(set(log))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    row = {"row": name, "compiled": compiled, "median_ms": statistics.median(times), "min_ms": min(times),
           "max_ms": max(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "ran": ran}
    if args.profile:
        row |= kernel_profile(step)
    del model, step
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS,
                        help=f"default {DEFAULT_ROWS}; by name also {','.join(HAND_OVERS | COMPILE_OPTIONS)}")
    parser.add_argument("--compiled", choices=("no", "yes", "both"), default="both")
    parser.add_argument("--model", default=BACKBONE["name"], help="timm ViT (random init)")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.txt")
    args = parser.parse_args()
    BACKBONE["name"] = args.model
    torch.backends.cuda.matmul.allow_tf32 = True  # bf16 autocast: fp32 leftovers as users run them
    images = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
    labels = torch.randint(0, 100, (args.batch,), device="cuda")
    modes = {"no": (False,), "yes": (True,), "both": (False, True)}[args.compiled]
    rows = []
    for compiled in modes:
        for name in args.rows.split(","):
            rows.append(measure(name, compiled, args, images, labels))
            r = rows[-1]
            print(f"  {name:<14} {'compiled' if compiled else 'eager   '} {r['median_ms']:7.2f} ms "
                  f"{r['peak_gib']:6.2f} GiB" + (f"  GPU {r['gpu_ms']:.2f} ms" if args.profile else ""), flush=True)
    lines = [f"$ PYTHONPATH=. python {' '.join(sys.argv)}",
             f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
             f"{args.model} at {args.img}px, batch {args.batch}, M={args.num_prompts} (CVPT M=10), bf16 autocast, "
             f"fwd+bwd+SGD, median of {args.iters}, svpt backend {args.backend}",
             f"{'row':<14} {'mode':<9} {'ms/step':>8} {'img/s':>7} {'peak GiB':>8} {'x floor':>8} {'x no-pr':>8} {'mem x fl':>8}"]
    for r in rows:
        same = {x["row"]: x for x in rows if x["compiled"] == r["compiled"]}
        floor, bare = same.get("token-floor"), same.get("no-prompts")
        ratio = lambda base, key: f"{r[key] / base[key]:8.3f}" if base else f"{'-':>8}"  # noqa: E731
        lines.append(f"{r['row']:<14} {'compiled' if r['compiled'] else 'eager':<9} {r['median_ms']:8.2f} "
                     f"{args.batch / r['median_ms'] * 1000:7.0f} {r['peak_gib']:8.2f} {ratio(floor, 'median_ms')} "
                     f"{ratio(bare, 'median_ms')} {ratio(floor, 'peak_gib')}")
    lines.append("\nwhat ran (not compiled): " + "; ".join(
        f"{r['row']}: {', '.join(f'{op} {impl}' for op, impl in r['ran'])}" for r in rows if r["ran"]))
    if args.profile:
        for r in rows:
            lines.append(f"\n{r['row']} ({'compiled' if r['compiled'] else 'eager'}): GPU kernels {r['gpu_ms']:.2f} ms/step; "
                         f"GPU idle {r['idle_start_ms']:.2f} ms before the first kernel, {r['idle_inside_ms']:.2f} ms inside")
            lines += [f"    {ms:6.3f} ms  {k[:100]}" for k, ms in r["kernels"][:12]]
            lines += [f"    waited {ms:6.3f} ms before  {k[:100]}" for k, ms in r["top_waits"]]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": lines[0], "setup": lines[1], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
