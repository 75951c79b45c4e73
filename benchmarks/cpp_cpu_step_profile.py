"""Where the CPU training step's time goes, eager vs cpp: torch.profiler, self time per op.

    OMP_NUM_THREADS=1 python benchmarks/cpp_cpu_step_profile.py benchmarks/results/cpp_cpu_step_profile.txt

(one thread: the shares do not depend on the thread count, and a profile on one core is not
disturbed by other processes on a shared 2-core machine the way a 2-thread one is)

The step of benchmarks/test_cpp_cpu_step.py (SVPT M=10 on ViT-Tiny/16 at 224, batch 32, fp32),
one profiled step per backend after a warm-up. The frozen backbone's linear layers (aten::mm /
aten::addmm, identical in both backends) bound what any attention or prompt kernel can gain:
the table gives their share, the attention's, and the rest.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cpp_cpu_step import BACKENDS, _step_fn  # noqa: E402

LINEAR = ("aten::mm", "aten::addmm")
ATTENTION = ("svpt_cpp::prompt_attention_fwd", "svpt_cpp::prompt_attention_bwd", "aten::bmm", "aten::_softmax",
             "aten::_softmax_backward_data")


def profiled(backend: str) -> dict[str, float]:
    """Self CPU seconds per op name over one step."""
    step = _step_fn(backend)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS")
    command = f"{'OMP_NUM_THREADS=' + threads + ' ' if threads else ''}python {' '.join(sys.argv)}"
    lines = [f"$ {command}", f"# {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
             "self CPU seconds of one profiled step (the profiler adds a little overhead)", "",
             f"{'backend':<8} {'total':>7} {'linear layers':>14} {'attention':>10} {'rest':>7}   top ops"]
    for backend in BACKENDS:
        times = profiled(backend)
        total = sum(times.values())
        linear = sum(times.get(k, 0.0) for k in LINEAR)
        attention = sum(times.get(k, 0.0) for k in ATTENTION)
        top = ", ".join(f"{k} {v:.3f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"{backend:<8} {total:>7.3f} {linear:>14.3f} {attention:>10.3f} {total - linear - attention:>7.3f}"
                     f"   {top}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
