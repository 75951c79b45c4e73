"""Block sizes of the Triton prompt-attention kernels at VPT-deep's fast-path shape (issue 14):
ViT-B/16, batch 128, 12 heads of 64, 197 token queries against 50 prompt keys (batch 1) + 197
token keys, bf16, q/k/v as views of timm's qkv buffer. The forward, the dK/dV and the dQ kernels
are swept one at a time (the other two at their current block sizes); the backward's time includes
the delta kernel and the prompt segment's sum over the batch; every configuration's outputs are
compared with the current blocks' (same values to bf16 rounding, or it is not ranked). cuDNN's attention (SDPA) at the
no-prompt 197 x 197 and over the concatenated 247 keys is printed beside it for scale.

    PYTHONPATH=. python benchmarks/prompt_attention_configs.py
"""
import importlib
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from config_sweep import rank_configs  # noqa: E402
from fast_path_step import median_ms  # noqa: E402

pa = importlib.import_module("svpt_kernels.triton.prompt_attention")
pkv = importlib.import_module("svpt_kernels.triton.prompt_kv_attention")

BATCH, TOKENS, PROMPTS, HEADS, DIM = 128, 197, 50, 12, 64
SCALE = DIM ** -0.5


def sdpa_ms(q, k, v, grad) -> float:
    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
    return median_ms(step, 20)


def main() -> None:
    qkv = torch.randn(BATCH, TOKENS, 3, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    pk, pv = (torch.randn(1, PROMPTS, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad = torch.randn(BATCH, TOKENS, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    # Through the ops' eager entry (define_op): the kernels launched directly, as in a step.
    fwd = lambda: pkv._prompt_kv_attention_op(q, k, v, pk, pv, SCALE)  # noqa: E731
    out, lse = fwd()
    bwd = lambda: pkv._prompt_kv_attention_backward_op(grad, q, k, v, pk, pv, out, lse, SCALE, True)  # noqa: E731
    expected = (out, *bwd())

    heads_first = lambda t: t.transpose(1, 2).detach().requires_grad_()  # noqa: E731
    q_, k_, v_ = (heads_first(t) for t in (q, k, v))
    k_all = heads_first(torch.cat([pk.expand(BATCH, -1, -1, -1), k], 1))
    v_all = heads_first(torch.cat([pv.expand(BATCH, -1, -1, -1), v], 1))
    g_ = grad.transpose(1, 2)
    print(f"cuDNN attention fwd+bwd, 197 x 197 keys (no prompts):       {sdpa_ms(q_, k_, v_, g_):.3f} ms")
    print(f"cuDNN attention fwd+bwd, 197 x 247 keys (concatenated, no cat): {sdpa_ms(q_, k_all, v_all, g_):.3f} ms")
    fwd_cfg, bwd_cfgs = pa._config, pa._bwd_configs
    print(f"current: fwd {median_ms(fwd, 20):.3f} ms  bwd {median_ms(bwd, 20):.3f} ms  "
          f"({fwd_cfg(64, torch.bfloat16)}, {bwd_cfgs(64, torch.bfloat16)})", flush=True)
    grid = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
            for m, n, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))]
    installs = {
        "fwd": lambda cfg: setattr(pa, "_config", lambda d, dt: dict(cfg)),
        "dkdv": lambda cfg: setattr(pa, "_bwd_configs", lambda d, dt: (dict(cfg), bwd_cfgs(d, dt)[1])),
        "dq": lambda cfg: setattr(pa, "_bwd_configs", lambda d, dt: (bwd_cfgs(d, dt)[0], dict(cfg))),
    }
    for kernel, install in installs.items():
        rank_configs(kernel, grid, install, lambda kernel=kernel: (
            median_ms(fwd if kernel == "fwd" else bwd, 10), (fwd()[0], *bwd())), expected=expected)
        pa._config, pa._bwd_configs = fwd_cfg, bwd_cfgs


if __name__ == "__main__":
    main()
