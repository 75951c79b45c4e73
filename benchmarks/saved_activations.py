"""What one training step keeps for backward: the bytes of the distinct activation storages
(parameters excluded) that autograd saves during the forward (torch.autograd.graph.saved_tensors_hooks), per configuration.
Runs anywhere (CPU: the Triton kernels through the interpreter); it counts memory that scales
with the batch, which is most of a training step's peak on the GPU.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/saved_activations.py --batch 2

ViT-B/16 at 224 (random init), fp32, M = 50: the no-prompt floor, SVPT on the Triton backend
(fused) and on the eager backend (research code).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import svpt  # noqa: E402
from baselines import NoPromptFloor  # noqa: E402
from fast_path_step import vit  # noqa: E402


def saved_bytes(model, images) -> int:
    """Activations only: the model's own parameters (saved by its linears) are not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images).sum()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    images = torch.randn(args.batch, 3, 224, 224)
    rows = [("floor (no prompts)", lambda: NoPromptFloor(vit()), "eager"),
            (f"svpt M={args.prompts} fused (triton)", lambda: svpt.prompt(vit(), "svpt", args.prompts), "triton"),
            (f"svpt M={args.prompts} eager", lambda: svpt.prompt(vit(), "svpt", args.prompts), "eager")]
    print(f"$ PYTHONPATH=. python {' '.join(sys.argv)}   (TRITON_INTERPRET=1)")
    print(f"# saved for backward, one forward, ViT-B/16, batch {args.batch}, fp32, torch {torch.__version__}")
    floor = None
    for name, factory, backend in rows:
        with svpt.backend(backend):
            mib = saved_bytes(factory(), images) / 2 ** 20
        floor = floor or mib
        print(f"{name:<28} {mib:9.1f} MiB  {mib / floor:5.2f}x floor", flush=True)


if __name__ == "__main__":
    main()
