"""Where the host makes the GPU wait inside a training step (issue 14: the compiled VPT-deep step leaves the
GPU idle 1.2 ms longer than the no-prompt step's, token_floor_vpt_deep_split_h100.txt).

    PYTHONPATH=. python benchmarks/idle_trace.py --rows no-prompts,vpt-deep --compiled yes --out OUT/idle

One row of token_floor.py (same model, step and sizes), warmed up, then ``--steps`` steps under
torch.profiler with CPU and CUDA activity. For every stretch over ``--min-us`` during which the GPU ran
nothing inside a step: the kernel that ended it and what the host did between launching the kernel
before and launching that one (the CPU ops in that window, longest first). Summed per host op over the
gaps it sat in. Writes OUT_<row>.json.gz (the chrome trace) and OUT.txt.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import token_floor  # noqa: E402
from svpt import backends  # noqa: E402


def trace_steps(row: str, compiled: bool, args, path: Path) -> dict:
    factory, backend = token_floor.ROWS[row]
    images = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
    labels = torch.randint(0, 100, (args.batch,), device="cuda")
    with backends.backend(backend or "auto"), token_floor.preferring(row):
        model = factory(args.img, args.num_prompts).cuda()
        step = token_floor.make_step(model, images, labels, compiled)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                torch.cuda._sleep(1)  # noqa: SLF001  the step's marker kernel (token_floor.MARK)
                step()
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(path.with_suffix("")))
    with open(path.with_suffix(""), "rb") as raw, gzip.open(path, "wb") as packed:
        packed.write(raw.read())
    path.with_suffix("").unlink()
    with gzip.open(path, "rt") as f:
        return json.load(f)


def gaps(trace: dict, min_us: float) -> list[dict]:
    """The GPU's idle stretches inside the steps, each with the host ops between the two launches."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                     key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in ("cpu_op", "python_function")]
    out, busy_until, previous, inside = [], None, None, False
    for kernel in kernels:
        if token_floor.MARK in kernel["name"]:
            busy_until, previous, inside = kernel["ts"] + kernel["dur"], kernel, True
            continue
        wait = kernel["ts"] - busy_until if inside else 0.0
        launch = launches.get(kernel["args"].get("correlation"))
        before = launches.get(previous["args"].get("correlation")) if previous else None
        if inside and wait >= min_us and launch and before:
            start, end = before["ts"] + before["dur"], launch["ts"]
            ops = sorted(((e["dur"], e["name"]) for e in host
                          if e["ts"] >= start and e["ts"] + e["dur"] <= end and e["tid"] == launch["tid"]),
                         reverse=True)
            out.append({"wait_us": wait, "kernel": kernel["name"], "host_window_us": end - start, "ops": ops[:6]})
        busy_until, previous = max(busy_until or 0.0, kernel["ts"] + kernel["dur"]), kernel
    return out


def report(row: str, found: list[dict], steps: int) -> list[str]:
    by_op = defaultdict(float)
    for gap in found:
        for _, name in gap["ops"][:1]:  # the longest host op of the window: what the host was busy with
            by_op[name] += gap["wait_us"] / steps
    lines = [f"\n{row}: {len(found) / steps:.0f} gaps a step, {sum(g['wait_us'] for g in found) / steps / 1000:.3f} "
             "ms of GPU idle a step; the longest host op between the two launches, summed over its gaps:"]
    lines += [f"  {us / 1000:7.3f} ms  {name[:110]}" for name, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]]
    lines.append("  the longest gaps (wait, host window, kernel that ended it; host ops in the window):")
    for gap in sorted(found, key=lambda g: -g["wait_us"])[:10]:
        lines.append(f"  {gap['wait_us']:7.1f} us wait, {gap['host_window_us']:7.1f} us host  {gap['kernel'][:70]}")
        lines += [f"{'':16}{dur:8.1f} us  {name[:90]}" for dur, name in gap["ops"][:4]]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="no-prompts,vpt-deep")
    parser.add_argument("--compiled", choices=("no", "yes"), default="yes")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--min-us", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.txt and OUT_<row>.json.gz")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    lines = [f"$ PYTHONPATH=. python {' '.join(sys.argv)}",
             f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, ViT-B/16 at {args.img}px, batch {args.batch}, "
             f"M={args.num_prompts}, bf16 autocast, {'compiled' if args.compiled == 'yes' else 'not compiled'}, "
             f"{args.steps} profiled steps"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for row in args.rows.split(","):
        trace = trace_steps(row, args.compiled == "yes", args, Path(f"{args.out}_{row}.json.gz"))
        lines += report(row, gaps(trace, args.min_us), args.steps)
        print("\n".join(lines[-20:]), flush=True)
    args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
