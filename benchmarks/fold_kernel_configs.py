"""Block sizes of the Triton folded cross-attention kernels (CVPT's fold), swept at ViT-B/16
shapes: rows 128*197, d 768, 12 heads, M 10, fp32 residual stream with bf16 autocast, residual
= x (as CVPT calls it). Prints forward and backward times per configuration next to a copy of
x (the memory floor of reading x and writing out) and the two d x d projections it replaces.

    PYTHONPATH=. python benchmarks/fold_kernel_configs.py
    ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats -k regex:_folded_ca --launch-skip 2 --launch-count 2 \
        python benchmarks/fold_kernel_configs.py --ncu     # the current blocks, for Nsight Compute

``--ncu`` runs the current configuration's forward and backward twice each and nothing else.
"""
import importlib
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from config_sweep import rank_configs  # noqa: E402
from fast_path_step import median_ms  # noqa: E402

fca = importlib.import_module("svpt_kernels.triton.folded_cross_attention")

ROWS, WIDTH, HEADS, PROMPTS = 128 * 197, 768, 12, 10


def main() -> None:
    ncu = "--ncu" in sys.argv[1:]
    x = torch.randn(ROWS, WIDTH, device="cuda")
    wl = 0.05 * torch.randn(HEADS, PROMPTS, WIDTH, device="cuda", dtype=torch.bfloat16)
    wv = 0.05 * torch.randn(HEADS, PROMPTS, WIDTH, device="cuda", dtype=torch.bfloat16)
    bl = torch.randn(HEADS, PROMPTS, device="cuda")
    bias = torch.randn(WIDTH, device="cuda")
    grad = torch.randn(ROWS, WIDTH, device="cuda")
    w = torch.randn(WIDTH, WIDTH, device="cuda", dtype=torch.bfloat16) / WIDTH ** 0.5
    fwd = lambda: fca._folded_ca_op(x, wl, bl, wv, bias, None, True)  # noqa: E731
    bwd = lambda: fca._folded_ca_backward_op(grad, x, wl, bl, wv, True, True)  # noqa: E731
    if ncu:
        for _ in range(2):
            fwd(), bwd()
        torch.cuda.synchronize()
        return
    print(f"copy of x (fp32 read + write)      {median_ms(lambda: x.clone(), 30):.3f} ms")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print(f"two d x d linears + residual (fwd) {median_ms(lambda: x + F.linear(F.linear(x, w), w), 30):.3f} ms")
    default = fca._config
    print(f"default: fwd {median_ms(fwd, 30):.3f} ms  bwd {median_ms(bwd, 30):.3f} ms")
    grid = [dict(BLOCK_R=rows, BLOCK_K=chunk, BLOCK_D=chunk, num_warps=warps, num_stages=stages)
            for rows, warps, chunk, stages in itertools.product((16, 32, 64, 128), (4, 8), (32, 64, 128), (1, 2, 3))]
    for backward in (False, True):
        install = lambda cfg, backward=backward: setattr(  # noqa: E731
            fca, "_config", lambda dtype, bw: cfg if bw == backward else default(dtype, bw))
        rank_configs("bwd" if backward else "fwd", grid, install,
                     lambda backward=backward: (median_ms(bwd if backward else fwd, 15), None), keep=6)
        fca._config = default


if __name__ == "__main__":
    main()
