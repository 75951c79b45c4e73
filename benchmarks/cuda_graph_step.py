"""svpt train's training step (svpt/training/steps.py: forward, loss, backward, then SGD),
eager against replayed from a CUDA graph.

    PYTHONPATH=. python benchmarks/cuda_graph_step.py benchmarks/results/cuda_graph_step_h200.json

ViT-B/16 (random init, no download), bf16 autocast, backend auto, uint8 images on the GPU as
svpt train keeps VTAB-1k's; SVPT M = 50, VPT-deep M = 50 and CVPT M = 10 at batch 64 (svpt
vtab's batch) and 128. Each row runs the same TrainStep class svpt train uses, once with graphs
off and once on, from the same initial state on the same 4 batches; it reports the median
wall time per step over ITERS steps (after each batch size's eager warm-up steps and the
capture) and whether the two runs' first 8 losses are bit-identical. Writes JSON to the given
path and the table next to it (.txt).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import svpt  # noqa: E402
from svpt.training.backbone import to_uint8_normaliser  # noqa: E402
from svpt.training.steps import TrainStep  # noqa: E402

CASES = {"svpt M=50": ("svpt", 50), "vpt-deep M=50": ("vpt-deep", 50), "cvpt M=10": ("cvpt", 10)}
BATCHES, ITERS, CHECKED = (64, 128), 30, 8


def run(method: str, prompts: int, batch: int, graphs: bool) -> dict:
    import timm
    torch.manual_seed(0)
    model = svpt.fused.apply(timm.create_model("vit_base_patch16_224", pretrained=False), method, prompts,
                             num_classes=10).cuda().train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    step = TrainStep(model, params, to_uint8_normaliser(model, torch.device("cuda")), torch.device("cuda"),
                     amp=True, graphs=graphs)
    gen = torch.Generator(device="cuda").manual_seed(1)
    data = [(torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda", generator=gen),
             torch.randint(0, 10, (batch,), device="cuda", generator=gen)) for _ in range(4)]

    def one(i: int) -> torch.Tensor:
        loss, _ = step(*data[i % 4])
        optimizer.step()
        return loss

    losses = [one(i).item() for i in range(CHECKED)]
    times = []
    for i in range(ITERS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        one(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "losses": losses, "steps": step.describe(),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    out = Path(sys.argv[1])
    rows = []
    for name, (method, prompts) in CASES.items():
        for batch in BATCHES:
            torch.cuda.reset_peak_memory_stats()
            eager = run(method, prompts, batch, graphs=False)
            torch.cuda.reset_peak_memory_stats()
            graphed = run(method, prompts, batch, graphs=True)
            rows.append({"case": name, "batch": batch, "eager_ms": eager["ms"], "graph_ms": graphed["ms"],
                         "speedup": eager["ms"] / graphed["ms"], "img_per_s_graph": batch / graphed["ms"] * 1e3,
                         "same_losses": eager["losses"] == graphed["losses"], "eager_peak_gib": eager["peak_gib"],
                         "graph_peak_gib": graphed["peak_gib"], "graph_steps": graphed["steps"],
                         "losses": eager["losses"]})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
            "backend": svpt.get_backend(), "command": "PYTHONPATH=. python benchmarks/cuda_graph_step.py " + sys.argv[1]}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# {meta['device']}, torch {meta['torch']}; {meta['command']}",
             "# ViT-B/16 bf16, svpt train's TrainStep + SGD, median of %d steps" % ITERS,
             f"{'case':14s} {'batch':>5s} {'eager ms':>9s} {'graph ms':>9s} {'speedup':>7s} {'img/s':>6s} "
             f"{'same losses':>11s} {'peak GiB e/g':>13s}"]
    lines += [f"{r['case']:14s} {r['batch']:5d} {r['eager_ms']:9.2f} {r['graph_ms']:9.2f} {r['speedup']:7.2f} "
              f"{r['img_per_s_graph']:6.0f} {str(r['same_losses']):>11s} {r['eager_peak_gib']:6.2f}/{r['graph_peak_gib']:.2f}"
              for r in rows]
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
