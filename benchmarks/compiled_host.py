"""Where a compiled training step's time goes besides the GPU kernels (issue 14): per row of
benchmarks/token_floor.py (ViT-B/16 224, batch 128, M=50, CVPT M=10, bf16 autocast, fwd+bwd+SGD,
torch.compile default mode), the graphs and graph breaks torch._dynamo.explain finds on the first
call, then, compiled afresh, the host time to enqueue one step against its wall time (median of
10), and a CPU+CUDA profile of 3 steps sorted by host time. With ``static``, Inductor launches
svpt's Triton kernels through its static CUDA launcher
(``torch._inductor.config.static_launch_user_defined_triton_kernels``) and only the times print.

    PYTHONPATH=. python benchmarks/compiled_host.py no-prompts,token-floor,svpt,cvpt,vpt-deep
    PYTHONPATH=. python benchmarks/compiled_host.py svpt,cvpt static
"""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path[:0] = [".", "benchmarks"]
import token_floor as tf  # noqa: E402

BATCH, IMG, PROMPTS = 128, 224, 50


def explain(name: str, loss_fn) -> None:
    """Graphs and graph breaks of the first call (torch._dynamo.explain), then a clean slate."""
    ex = torch._dynamo.explain(loss_fn)()
    print(f"[{name}] graphs {ex.graph_count} breaks {ex.graph_break_count} ops {ex.op_count}")
    for r in ex.break_reasons[:6]:
        print("   break:", str(r.reason)[:200])
    torch._dynamo.reset()


def host_and_wall(step) -> tuple[float, float]:
    """Median ms to enqueue one step (the call returning) and to finish it (synchronized)."""
    enqueue, wall = [], []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        enqueue.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return statistics.median(enqueue), statistics.median(wall)


def cpu_profile(step) -> str:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=70)
    return "\n".join(table.splitlines()[:30])


def main() -> None:
    rows = sys.argv[1].split(",")
    static = len(sys.argv) > 2 and sys.argv[2] == "static"
    if static:
        torch._inductor.config.static_launch_user_defined_triton_kernels = True
    torch.backends.cuda.matmul.allow_tf32 = True
    images = torch.randn(BATCH, 3, IMG, IMG, device="cuda")
    labels = torch.randint(0, 100, (BATCH,), device="cuda")
    for name in rows:
        factory, backend = tf.ROWS[name]
        with tf.svpt.backend(backend or "auto"):
            model = factory(IMG, PROMPTS).cuda()

            def loss_fn():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return torch.nn.functional.cross_entropy(model(images), labels)
            torch._dynamo.reset()
            if not static:
                explain(name, loss_fn)
            step = tf.make_step(model, images, labels, True)
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            enqueue, wall = host_and_wall(step)
            print(f"[{name}{' static' if static else ''}] host enqueue {enqueue:.2f} ms, wall {wall:.2f} ms", flush=True)
            if not static:
                print(cpu_profile(step))
            del model, step
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
