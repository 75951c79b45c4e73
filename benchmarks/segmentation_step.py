"""Segmentation training step at 512 x 512: fused (Triton) against eager and the token floor.

    python benchmarks/segmentation_step.py                 # on an H200: writes the result file below
    python benchmarks/segmentation_step.py --smoke OUT.txt # tiny shapes on a CPU, eager only: the script runs

ViT-B/16 (batch 16) and ViT-L/16 (batch 8), random init (no download) at img_size 512 (32 x 32
patches), bf16 autocast, SGD with momentum. Rows: SVPT M = 50, VPT-deep M = 50 and CVPT M = 10 on
the eager and Triton backends; the token floor (VPT-shallow M = 50 through timm's own blocks, PyTorch
SDPA: what 50 extra tokens cost with nothing else changed) and the no-prompt floor (M = 0). Two
steps per row: "backbone", the prompted ViT's maps at the SETR out_indices (svpt.dense) with a
sum-of-squares loss, so its time and memory are the backbone's; "SETR-PUP", the whole step of
svpt.segmentation (decoder with 3 auxiliary heads, 150 classes, cross-entropy at 512 x 512).
Each: warm-up steps, then CUDA-event timing of single steps (median), and the peak allocated
memory of the timed steps (weights included). Writes benchmarks/results/segmentation_step_h200.txt.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import svpt  # noqa: E402
from baselines import TimmVPTShallow  # noqa: E402
from svpt.segmentation import SegmentationModel, default_out_indices  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "segmentation_step_h200.txt"
MODELS = (("ViT-B/16", "vit_base_patch16_224", 16), ("ViT-L/16", "vit_large_patch16_224", 8))
METHODS = (("svpt", 50), ("vpt-deep", 50), ("cvpt", 10))
NUM_CLASSES = 150


class TokenFloor(TimmVPTShallow):
    """The token floor of benchmarks/baselines.py (M prompts inserted once after the prefix, timm's
    own blocks) with ``forward_intermediates`` as svpt.dense's (prompt rows and prefix removed,
    NCHW), so the same decoder sits on it. M = 0: the frozen backbone alone (a trainable offset
    keeps backward running through every block, as prompts make it)."""

    def __init__(self, vit: nn.Module, num_prompts: int) -> None:
        super().__init__(vit, num_prompts)
        self.blocks, self.embed_dim, self.patch_embed = vit.blocks, vit.embed_dim, vit.patch_embed
        self.offset = nn.Parameter(torch.zeros(1, 1, vit.embed_dim)) if num_prompts == 0 else None

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        self.vit.eval()  # the backbone stays in eval mode, as svpt's prompted models do
        return self

    def forward_intermediates(self, images, indices, stop_early=True, intermediates_only=True):
        vit, n_p, m = self.vit, self.vit.num_prefix_tokens, self.prompts.shape[1]
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        x = x + self.offset if self.offset is not None else torch.cat(
            [x[:, :n_p], self.prompts.expand(x.shape[0], -1, -1).to(x.dtype), x[:, n_p:]], 1)
        grid = vit.patch_embed.dynamic_feat_size(images.shape[-2:])
        maps = []
        for layer, blk in enumerate(vit.blocks[: max(indices) + 1]):
            x = blk(x)
            if layer in indices:
                maps.append(x[:, n_p + m:].reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2))
        return maps


def backbone(name: str, size: int) -> nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=size, num_classes=0)


def build(vit: nn.Module, method: str, num_prompts: int) -> SegmentationModel:
    net = copy.deepcopy(vit)
    if method == "floor":
        net = TokenFloor(net, num_prompts)
    else:
        svpt.prompt(net, method, num_prompts, num_classes=0)
    return SegmentationModel(net, NUM_CLASSES, "setr-pup").to(DEVICE)


def measure(model: SegmentationModel, step_kind: str, backend: str, batch: int, size: int, warmup: int,
            iters: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=DEVICE, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch, size, size), device=DEVICE, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    model.train()
    indices = list(model.out_indices)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            if step_kind == "backbone":
                maps = model.backbone.forward_intermediates(images, indices=indices, stop_early=True,
                                                            intermediates_only=True)
                loss = sum(m.float().square().mean() for m in maps)
            else:
                loss = model(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with svpt.backend(backend):
        for _ in range(warmup):
            step()
        sync()
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            if DEVICE == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                step()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                step()
                times.append(1000 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else float("nan")
    return {"ms": statistics.median(times), "peak_gib": peak}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run_row(vit, label, method, num_prompts, backend, batch, size, args) -> dict:
    row = {"model": label, "batch": batch, "method": method, "M": num_prompts, "backend": backend}
    for step_kind in ("backbone", "SETR-PUP"):
        model = None
        try:
            model = build(vit, method, num_prompts)
            row[step_kind] = measure(model, step_kind, backend, batch, size, args.warmup, args.iters)
        except torch.cuda.OutOfMemoryError:
            row[step_kind] = {"ms": float("nan"), "peak_gib": float("nan"), "oom": True}
        finally:
            del model
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> list[str]:
    head = (f"{'model':<9} {'batch':>5} {'method':<9} {'M':>3} {'backend':<8} | {'backbone ms':>11} {'peak GiB':>8} "
            f"{'x floor':>7} | {'SETR-PUP ms':>11} {'peak GiB':>8} {'x floor':>7}")
    lines = [head, "-" * len(head)]
    for row in rows:
        floor = next(r for r in rows if r["model"] == row["model"] and r["method"] == "floor" and r["M"] == 50)
        cells = []
        for kind in ("backbone", "SETR-PUP"):
            got = row[kind]
            if got.get("oom"):
                cells.append(f"{'OOM':>11} {'':>8} {'':>7}")
            else:
                cells.append(f"{got['ms']:>11.1f} {got['peak_gib']:>8.2f} {got['ms'] / floor[kind]['ms']:>7.2f}")
        name = "floor" if row["method"] == "floor" else row["method"]
        lines.append(f"{row['model']:<9} {row['batch']:>5} {name:<9} {row['M']:>3} {row['backend']:<8} | "
                     f"{cells[0]} | {cells[1]}")
    return lines


def ratios(rows: list[dict]) -> list[str]:
    lines = []
    for label, _, _ in MODELS:
        for method, _ in METHODS:
            pair = {r["backend"]: r for r in rows if r["model"] == label and r["method"] == method}
            if set(pair) != {"eager", "triton"}:
                continue
            for kind in ("backbone", "SETR-PUP"):
                eager, fused = pair["eager"][kind], pair["triton"][kind]
                if eager.get("oom") or fused.get("oom"):
                    continue
                lines.append(f"{label} {method} {kind}: triton {eager['ms'] / fused['ms']:.2f}x faster than eager, "
                             f"peak memory {fused['peak_gib']:.2f} vs {eager['peak_gib']:.2f} GiB")
    return lines


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=RESULT)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, eager backend only")
    args = parser.parse_args()
    DEVICE = "cpu" if args.smoke else "cuda"
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # bf16 autocast: the fp32 leftovers may use tf32
    models = (("test_vit", "test_vit", 2),) if args.smoke else MODELS
    size = 64 if args.smoke else 512
    backends = ("eager",) if args.smoke else ("eager", "triton")
    if args.smoke:
        args.warmup, args.iters = 1, 1
    started, rows = time.time(), []
    for label, name, batch in models:
        vit = backbone(name, size).to(DEVICE)
        configs = [("floor", 50, "eager"), ("floor", 0, "eager")]
        configs += [(method, m, b) for method, m in METHODS for b in backends]
        for method, num_prompts, backend_name in configs:
            t0 = time.time()
            rows.append(run_row(vit, label, method, num_prompts, backend_name, batch, size, args))
            print(f"  {label} {method} M={num_prompts} {backend_name}: {time.time() - t0:.0f} s", flush=True)
        del vit
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu"
    versions = f"torch {torch.__version__}, timm {__import__('timm').__version__}"
    if DEVICE == "cuda":
        versions += f", triton {__import__('triton').__version__}"
    text = [f"$ python {' '.join(sys.argv)}", f"# {versions}, {device}; {size} x {size}, bf16 autocast "
            f"(CUDA), SGD; median of {args.iters} steps after {args.warmup}; x floor: against the token floor "
            f"(VPT-shallow M=50, timm blocks) of the same step; {time.time() - started:.0f} s in all", "",
            *table(rows), "", *ratios(rows)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(text) + "\n")
    print("\n".join(text))


DEVICE = "cuda"

if __name__ == "__main__":
    main()
