"""Host side of an eager training step: does anything synchronise with the GPU, and where does
the Python thread spend its time (cProfile, top functions by own time)?

    PYTHONPATH=. python benchmarks/host_cprofile.py > benchmarks/results/host_cprofile_h200.txt

ViT-B/16 (random init), batch 128, bf16 autocast, Triton backend, VPT-deep M=50, SVPT M=50 and
CVPT M=10; one step each after warm-up. ``torch.cuda.set_sync_debug_mode("error")`` turns any
synchronising call in the step into an exception.
"""
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import svpt  # noqa: E402
from fast_path_step import make_step, vit  # noqa: E402


def main() -> None:
    images = torch.randn(128, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 100, (128,), device="cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, method, prompts in [("vpt-deep50", "vpt-deep", 50), ("svpt50", "svpt", 50), ("cvpt10", "cvpt", 10)]:
        with svpt.backend("triton"):
            step = make_step(svpt.prompt(vit(), method, prompts).cuda(), images, labels)
            for _ in range(4):
                step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
                print(f"{name}: no synchronising call in the step")
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            step()
            profiler.disable()
            print(f"{name}: host {1000 * (time.perf_counter() - start):.1f} ms under cProfile")
            torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        print(text.getvalue().split("ncalls", 1)[-1].rstrip() + "\n")


if __name__ == "__main__":
    main()
