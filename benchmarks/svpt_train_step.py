"""Time one SVPT training step (forward + backward + AdamW) on ViT-B/16, fused vs eager.

    python benchmarks/svpt_train_step.py benchmarks/results/svpt_train_step_h200.json

ViT-B/16 (random init, no download), M = 50 prompts, batch 128, bf16 autocast. Each
configuration: warm-up steps, then CUDA-event timing of single steps; the median is
reported, with the peak memory of a step. VPT-deep rows give the cost of the prompts alone.
Writes JSON to the given path and prints a short table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svpt  # noqa: E402


def build(method: str, num_prompts: int):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    return svpt.prompt(model, method, num_prompts).cuda()


def time_steps(method: str, backend: str, num_prompts: int, batch: int, warmup: int, iters: int) -> dict:
    model = build(method, num_prompts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    images = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 100, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with svpt.backend(backend):
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    del model, opt
    torch.cuda.empty_cache()
    return {"method": method, "backend": backend, "median_ms": statistics.median(times),
            "min_ms": min(times), "max_ms": max(times), "iters": iters, "warmup": warmup,
            "peak_memory_gib": peak / 2 ** 30, "step_memory_gib": (peak - base) / 2 ** 30,
            "images_per_s": batch / (statistics.median(times) / 1000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="JSON file to write")
    parser.add_argument("--num-prompts", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--methods", default="svpt,vpt-deep")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True  # bf16 autocast: the fp32 leftovers may use tf32
    rows = []
    for method in args.methods.split(","):
        for backend in ("eager", "triton"):
            t0 = time.time()
            rows.append(time_steps(method, backend, args.num_prompts, args.batch, args.warmup, args.iters))
            print(f"  measured {method}/{backend} in {time.time() - t0:.0f}s", flush=True)
    result = {
        "benchmark": "svpt training step: forward + backward + AdamW, bf16 autocast",
        "model": "vit_base_patch16_224 (random init)", "num_prompts": args.num_prompts,
        "batch": args.batch, "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(),
        "results": rows,
    }
    for method in args.methods.split(","):
        eager, fused = (next(r for r in rows if r["method"] == method and r["backend"] == b)
                        for b in ("eager", "triton"))
        result[f"{method}_speedup"] = eager["median_ms"] / fused["median_ms"]
        result[f"{method}_memory_ratio"] = fused["peak_memory_gib"] / eager["peak_memory_gib"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'method':<10} {'backend':<8} {'median ms':>10} {'img/s':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['method']:<10} {r['backend']:<8} {r['median_ms']:>10.1f} {r['images_per_s']:>8.0f} "
              f"{r['peak_memory_gib']:>9.2f}")
    for method in args.methods.split(","):
        print(f"{method}: fused is {result[f'{method}_speedup']:.2f}x faster, "
              f"peak memory x{result[f'{method}_memory_ratio']:.2f}")


if __name__ == "__main__":
    main()
