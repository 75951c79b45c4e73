"""SVPT M=50 on the Triton backend, eager mode against torch.compile (ViT-B/16, batch 128, bf16
autocast, training step; median of 10 steps), and how long the first compiled step takes.

    PYTHONPATH=. python benchmarks/svpt_compile_check.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import svpt  # noqa: E402
from fast_path_step import make_step, timed, vit  # noqa: E402


def median_ms(step) -> float:
    for _ in range(3):
        step()
    return sorted(timed(step) for _ in range(10))[5]


def main() -> None:
    images = torch.randn(128, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 100, (128,), device="cuda")
    with svpt.backend("triton"):
        model = svpt.prompt(vit(), "svpt", 50).cuda()
        eager = median_ms(make_step(model, images, labels))
        step = make_step(torch.compile(model), images, labels)
        start = time.time()
        step()
        torch.cuda.synchronize()
        first = time.time() - start
        compiled = median_ms(step)
    print(f"svpt50 triton: eager-mode median {eager:.2f} ms; compiled: first step {first:.1f} s, median {compiled:.2f} ms")


if __name__ == "__main__":
    main()
