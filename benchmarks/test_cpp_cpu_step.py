"""CPU training step, eager vs the C++ extension (backend "cpp").

ViT-Tiny shapes (timm vit_tiny_patch16_224, random init), SVPT with M=10 prompts, batch 32,
float32: forward, backward and an AdamW step over the trainable tensors.

The record (paired rounds: eager and cpp steps alternate, so that load from other processes hits
both alike; JSON and a text table, with the command and the machine):
    python benchmarks/test_cpp_cpu_step.py benchmarks/results/cpp_cpu_step.json

Under pytest-benchmark (one backend after the other, about 2-3 minutes on 2 cores):
    PYTHONPATH=. python -m pytest benchmarks/test_cpp_cpu_step.py -q \\
        --benchmark-json=benchmarks/results/cpp_cpu_step.raw.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svpt  # noqa: E402

BATCH, PROMPTS = 32, 10
BACKENDS = ("eager", "cpp")


def _setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100)
    model = svpt.prompt(model, "svpt", PROMPTS, ae_init=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images = torch.randn(BATCH, 3, 224, 224)
    labels = torch.randint(0, 100, (BATCH,))
    return model, optimizer, images, labels


def _step_fn(backend: str):
    if backend == "cpp":
        from svpt_kernels import cpp
        assert cpp.why_unusable("cpu") is None, cpp.why_unusable("cpu")
    model, optimizer, images, labels = _setup()

    def step():
        with svpt.backend(backend):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step(benchmark, backend):
    step = _step_fn(backend)
    step()  # warm-up (allocator, lazy init)
    benchmark.extra_info.update(backend=backend, batch=BATCH, prompts=PROMPTS, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=6, iterations=1)


def _stats(times: list[float]) -> dict:
    return {"min": round(min(times), 4), "median": round(statistics.median(times), 4),
            "max": round(max(times), 4), "rounds": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description="paired CPU training steps, eager vs cpp")
    parser.add_argument("output", type=Path, help="JSON file to write (the table goes next to it, .txt)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    steps = {backend: _step_fn(backend) for backend in BACKENDS}
    with svpt.backends.trace() as log:
        steps["cpp"]()
    for step in steps.values():
        step()  # warm-up
    times = {backend: [] for backend in BACKENDS}
    loads = []
    for _ in range(args.rounds):
        for backend, step in steps.items():
            start = time.perf_counter()
            step()
            times[backend].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
    stats = {backend: _stats(t) for backend, t in times.items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {
        "what": f"SVPT training step on CPU (forward + backward + AdamW), timm vit_tiny_patch16_224 (random init), "
                f"M={PROMPTS} prompts, batch {BATCH}, float32; seconds per step, eager and cpp steps alternating",
        "command": f"python {' '.join(sys.argv)}",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_1min_per_round": loads},
        "cpp_ran": sorted(set(log)),
        "seconds_per_step": stats,
        "speedup_cpp_over_eager_median": round(stats["eager"]["median"] / stats["cpp"]["median"], 3),
        "speedup_cpp_over_eager_min": round(stats["eager"]["min"] / stats["cpp"]["min"], 3),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "commit": commit + " (+ working tree)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"$ {result['command']}", f"# {result['what']}",
             f"# {result['machine']['cpu']}, {result['machine']['threads']} threads, torch {torch.__version__}; "
             f"load average per round: {', '.join(f'{x:.2f}' for x in loads)}", "",
             f"{'backend':<8} {'min s':>7} {'median s':>9} {'max s':>7}"]
    for backend, s in stats.items():
        lines.append(f"{backend:<8} {s['min']:>7.3f} {s['median']:>9.3f} {s['max']:>7.3f}")
    lines.append(f"\ncpp over eager: {result['speedup_cpp_over_eager_median']:.3f}x (medians), "
                 f"{result['speedup_cpp_over_eager_min']:.3f}x (best rounds)")
    text = "\n".join(lines) + "\n"
    args.output.with_suffix(".txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
