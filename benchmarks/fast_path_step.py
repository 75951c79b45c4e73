"""Training step of the exact fast paths against the frozen backbone's own step (the floor).

    PYTHONPATH=. python benchmarks/fast_path_step.py benchmarks/results/fast_path_step_h200.json

ViT-B/16 (random init, no download), batch 128, bf16 autocast, forward + backward + AdamW:
``NoPromptFloor`` (benchmarks/baselines.py: no prompts, one trainable vector added to the input
tokens), VPT-deep M=50 and CVPT M=10 on the Triton backend with their fast paths, and the same
two with the fast paths off (the plain path, for scale). Same process, same images; each row:
warm-up steps, then CUDA-event timing of single steps, median reported; the rows are measured
in interleaved rounds so that clock drift hits all alike. The target: each fast path within
1.10x of the floor. Writes JSON to the given path and the table next to it (.txt). Where the
time goes, kernel by kind: benchmarks/profile_step.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import svpt  # noqa: E402
from baselines import NoPromptFloor  # noqa: E402

TARGET = 1.10


MODEL = {"name": "vit_base_patch16_224", "kwargs": {}}


def vit():
    import timm
    torch.manual_seed(0)
    return timm.create_model(MODEL["name"], pretrained=False, num_classes=100, **MODEL["kwargs"])


def configs(args):
    """name -> (model factory, svpt backend, fast paths on)."""
    return {
        "floor (no prompts)": (lambda: NoPromptFloor(vit()), "eager", True),
        f"vpt-deep M={args.vpt_prompts} fast": (lambda: svpt.prompt(vit(), "vpt-deep", args.vpt_prompts), "triton", True),
        f"cvpt M={args.cvpt_prompts} fast": (lambda: svpt.prompt(vit(), "cvpt", args.cvpt_prompts), "triton", True),
        f"vpt-deep M={args.vpt_prompts} plain": (lambda: svpt.prompt(vit(), "vpt-deep", args.vpt_prompts), "triton", False),
        f"cvpt M={args.cvpt_prompts} plain": (lambda: svpt.prompt(vit(), "cvpt", args.cvpt_prompts), "triton", False),
    }


def make_step(model, images, labels):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(fn, iters: int) -> float:
    """Median of ``iters`` timed calls of ``fn`` after 3 untimed ones (CUDA events, ms)."""
    for _ in range(3):
        fn()
    return statistics.median(timed(fn) for _ in range(iters))


def measure_steps(args) -> list[dict]:
    size = vit().patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device="cuda")
    labels = torch.randint(0, 100, (args.batch,), device="cuda")
    rows = []
    for name, (factory, backend, fast) in configs(args).items():
        model = factory().cuda()
        rows.append(dict(name=name, backend=backend, fast_paths=fast, model=model,
                         step=make_step(model, images, labels), times=[]))
    for row in rows:  # warm-up (includes the Triton compilations)
        with svpt.backend(row["backend"]), svpt.backends.fast_paths(row["fast_paths"]):
            for _ in range(args.warmup):
                row["step"]()
    torch.cuda.synchronize()
    for _ in range(args.iters):
        for row in rows:
            with svpt.backend(row["backend"]), svpt.backends.fast_paths(row["fast_paths"]):
                row["times"].append(timed(row["step"]))
    out = []
    for row in rows:
        with svpt.backend(row["backend"]), svpt.backends.fast_paths(row["fast_paths"]):
            torch.cuda.reset_peak_memory_stats()
            row["step"]()
            torch.cuda.synchronize()
        times = row["times"]
        out.append(dict(name=row["name"], backend=row["backend"], fast_paths=row["fast_paths"],
                        median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                        iters=len(times), warmup=args.warmup,
                        peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                        images_per_s=args.batch / (statistics.median(times) / 1000)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="JSON file to write (the table goes next to it, .txt)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", default=MODEL["name"], help="timm model name (random init)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    parser.add_argument("--vpt-prompts", type=int, default=50)
    parser.add_argument("--cvpt-prompts", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    MODEL.update(name=args.model, kwargs={} if args.img_size is None else {"img_size": args.img_size})
    torch.backends.cuda.matmul.allow_tf32 = True  # bf16 autocast: the fp32 leftovers may use tf32
    rows = measure_steps(args)
    floor = rows[0]["median_ms"]
    for row in rows:
        row["ratio_to_floor"] = row["median_ms"] / floor
    result = {
        "benchmark": "training step (forward + backward + AdamW), bf16 autocast, vs the no-prompt floor",
        "model": f"{args.model} (random init)", "batch": args.batch, "target_ratio": TARGET,
        "command": " ".join(["PYTHONPATH=. python", *sys.argv]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "timm": __import__("timm").__version__,
        "python": platform.python_version(), "results": rows,
    }
    lines = [f"$ {result['command']}",
             f"# {result['device']}, torch {result['torch']}, triton {result['triton']}, timm {result['timm']}; "
             f"{args.model} {tuple(vit().patch_embed.img_size)}, batch {args.batch}, bf16 autocast, median of {args.iters} steps after {args.warmup} warm-up",
             "", f"{'configuration':<24} {'median ms':>10} {'x floor':>8} {'img/s':>8} {'peak GiB':>9}  target"]
    for row in rows:
        verdict = "" if row is rows[0] or not row["fast_paths"] else (
            "met" if row["ratio_to_floor"] <= TARGET else f"MISSED by {100 * (row['ratio_to_floor'] - TARGET):.1f} pts")
        lines.append(f"{row['name']:<24} {row['median_ms']:>10.2f} {row['ratio_to_floor']:>8.3f} "
                     f"{row['images_per_s']:>8.0f} {row['peak_memory_gib']:>9.2f}  {verdict}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.output.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
