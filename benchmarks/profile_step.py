"""Where a training step's time goes: wall time, host time and GPU kernel time per step, and
the kernels grouped by kind (torch.profiler), for the configurations named on the command line.

    PYTHONPATH=. python benchmarks/profile_step.py floor cvpt10 cvpt10-plain vpt-deep50 svpt50 svpt50-eager plain-svpt50 \
        --out benchmarks/results/profile_step_h200.txt

ViT-B/16 (random init), batch 128, bf16 autocast, forward + backward + AdamW, as
benchmarks/fast_path_step.py. "host ms" is how long the Python thread takes to issue one step
(the GPU queue is drained first); "GPU busy" is the summed kernel time over the wall time:
well below 100% means the GPU waits for the host (launch-bound), not for arithmetic.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import svpt  # noqa: E402
from baselines import NoPromptFloor, PlainSVPT  # noqa: E402
from fast_path_step import make_step, timed, vit  # noqa: E402

# name -> (model factory, svpt backend, fast paths on)
CONFIGS = {
    "floor": (lambda: NoPromptFloor(vit()), "eager", True),
    "cvpt10": (lambda: svpt.prompt(vit(), "cvpt", 10), "triton", True),
    "cvpt10-plain": (lambda: svpt.prompt(vit(), "cvpt", 10), "triton", False),
    "vpt-deep50": (lambda: svpt.prompt(vit(), "vpt-deep", 50), "triton", True),
    "vpt-deep50-cpp": (lambda: svpt.prompt(vit(), "vpt-deep", 50), "cpp", True),
    "svpt50": (lambda: svpt.prompt(vit(), "svpt", 50), "triton", True),
    "svpt50-eager": (lambda: svpt.prompt(vit(), "svpt", 50), "eager", True),
    "plain-svpt50": (lambda: PlainSVPT(vit(), 50), "eager", True),
}
# Kernel kinds by name fragment, first match wins (svpt's own Triton kernels by exact name);
# attention first: cuDNN's attention kernels' names also carry "sm90" and "wgmma".
KINDS = (("sdpa attention", ("flash", "fmha", "sdpa")),
         ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "sm90")),
         ("inductor triton", ("triton_",)),
         ("layer norm", ("layer_norm",)),
         ("softmax", ("softmax",)),
         ("optimizer", ("multi_tensor", "adam")),
         ("copy/cat", ("copy", "cat", "index")),
         ("reduction", ("reduce",)),
         ("elementwise", ("elementwise", "vectorized")))


def svpt_kernel_names() -> set[str]:
    import svpt_kernels.triton  # noqa: F401  (imports every op module)
    jit_types = {"JITFunction", "InterpretedFunction"}  # @triton.jit objects, compiled or interpreted
    modules = [mod for name, mod in sys.modules.items() if name.startswith("svpt_kernels.triton.")]
    return {name for mod in modules for name, obj in vars(mod).items() if type(obj).__name__ in jit_types}


def kind(name: str) -> str:
    if name in SVPT_KERNELS:
        return "svpt triton"
    low = name.lower()
    return next((k for k, frags in KINDS if any(f in low for f in frags)), "other")


SVPT_KERNELS: set[str] = set()


def kernel_times(prof, steps: int) -> dict[str, tuple[float, int]]:
    """Kernel name -> (ms per step, launches per step)."""
    out = {}
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = evt.self_cuda_time_total
        if evt.device_type == torch.autograd.DeviceType.CUDA and dev > 0:
            out[evt.key] = (dev / 1000 / steps, evt.count / steps)
    return out


def measure(name: str, images, labels, iters: int) -> list[str]:
    factory, backend, fast = CONFIGS[name]
    model = factory().cuda()
    step = make_step(model, images, labels)
    with svpt.backend(backend), svpt.backends.fast_paths(fast):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall = [timed(step) for _ in range(iters)]
        host = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            host.append(1000 * (time.perf_counter() - t0))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    kernels = kernel_times(prof, 5)
    gpu = sum(ms for ms, _ in kernels.values())
    launches = sum(n for _, n in kernels.values())
    med = statistics.median(wall)
    lines = [f"{name:<14} wall {med:7.2f} ms (min {min(wall):.2f}, max {max(wall):.2f})  host {statistics.median(host):7.2f} ms"
             f"  GPU kernels {gpu:7.2f} ms = {100 * gpu / med:5.1f}% busy  {launches:6.0f} launches/step"]
    by_kind = defaultdict(float)
    for k, (ms, _) in kernels.items():
        by_kind[kind(k)] += ms
    lines.append("    by kind: " + ", ".join(f"{k} {ms:.2f}" for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    for k, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:8]:
        lines.append(f"    {ms:6.2f} ms {n:5.0f}x  {k[:110]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", choices=list(CONFIGS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    SVPT_KERNELS.update(svpt_kernel_names())
    images = torch.randn(args.batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 100, (args.batch,), device="cuda")
    lines = [f"$ PYTHONPATH=. python {' '.join(sys.argv)}",
             f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, ViT-B/16, batch {args.batch}, bf16 autocast"]
    for name in args.configs:
        block = measure(name, images, labels, args.iters)
        lines += block
        print("\n".join(block), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
