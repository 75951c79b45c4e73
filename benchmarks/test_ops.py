"""Op level: each op of svpt.ops, forward and forward+backward, on every usable backend
(``eager`` is the plain-PyTorch composition the fused kernels replace).

CUDA: ViT-B/16 block shapes (B 128, T = 1 + 50 + 196, 12 heads of 64), bf16 activations
with the fp32 residual stream, as under autocast. CPU: B 8, T = 1 + 10 + 16, 3 heads, fp32.
"""
from __future__ import annotations

import pytest
import torch

import svpt
from svpt import ops
from harness import CUDA, SETTING

B, M, N, H, D = (128, 50, 196, 12, 64) if CUDA else (8, 10, 16, 3, 64)
NUM_PREFIX, WIDTH = 1, H * D
T = NUM_PREFIX + M + N
LOW = torch.bfloat16 if CUDA else torch.float32  # dtype of activations under autocast


def _t(*shape, dtype=torch.float32, scale=1.0, grad=True):
    return (scale * torch.randn(*shape, device=SETTING.device, dtype=dtype)).requires_grad_(grad)


def _inputs(op: str):
    if op == "da_mix":
        return (_t(B, T, WIDTH), _t(1, M, WIDTH), _t(2, WIDTH, scale=0.1), _t(())), dict(num_prefix=NUM_PREFIX)
    if op == "prompt_attention":
        q, k, v = (_t(B, T, H, D, dtype=LOW) for _ in range(3))
        return (q, k, v, D ** -0.5), dict(saliency_rows=(0, 1), saliency_cols=NUM_PREFIX + M)
    saliency = torch.rand(B, N, device=SETTING.device)
    return ((_t(B, T, WIDTH), _t(B, T, WIDTH, dtype=LOW), saliency, _t(())),
            dict(num_prefix=NUM_PREFIX, num_prompts=M, k=round(0.25 * N)))


def _step(op: str, backward: bool):
    args, kwargs = _inputs(op)
    fn = getattr(ops, op)
    grad_out = None

    def run():
        nonlocal grad_out
        out = fn(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if backward:
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.backward(out, grad_out)
        if CUDA:
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("backend", svpt.available_backends(SETTING.device))
@pytest.mark.parametrize("op", ["da_mix", "prompt_attention", "ae_update"])
def test_op(benchmark, op, backend, backward):
    with svpt.backend(backend):
        step = _step(op, backward)
        for _ in range(3):
            step()
        benchmark.pedantic(step, rounds=20, iterations=1)
    benchmark.extra_info.update(op=op, backend=backend, backward=backward, device=SETTING.device,
                                shape=dict(B=B, T=T, H=H, D=D, M=M), dtype=str(LOW))
