"""Op level: each op of svpt.ops, forward and forward+backward, on every usable backend
(``eager`` is the plain-PyTorch composition the fused kernels replace).

CUDA: ViT-B/16 block shapes (B 128, T = 1 + 50 + 196, 12 heads of 64), bf16 activations
with the fp32 residual stream, as under autocast. CPU: B 8, T = 1 + 10 + 16, 3 heads, fp32.
The fast-path ops at their methods' shapes: prompt_kv_attention (VPT-deep) with the 1 + N
image tokens' queries and an M-prompt key/value segment shared by the batch;
folded_cross_attention (CVPT) at M = 10 on the fp32 residual stream under autocast, its
residual the input itself, as CVPT calls it. ``da_mix`` and ``ae_update`` work in place on the
token buffer: their forward+backward rows start from a clone of it (autograd needs a non-leaf
buffer), and the ``clone`` row times that clone alone, to subtract. ``attention_saliency`` has
no gradient: forward rows only.
"""
from __future__ import annotations

import pytest
import torch

import svpt
from svpt import ops
from harness import CUDA, SETTING

B, M, N, H, D = (128, 50, 196, 12, 64) if CUDA else (8, 10, 16, 3, 64)
NUM_PREFIX, WIDTH = 1, H * D
CVPT_M = 10
T = NUM_PREFIX + M + N
LOW = torch.bfloat16 if CUDA else torch.float32  # dtype of activations under autocast


def _t(*shape, dtype=torch.float32, scale=1.0, grad=True):
    return (scale * torch.randn(*shape, device=SETTING.device, dtype=dtype)).requires_grad_(grad)


def _inputs(op: str):
    if op in ("da_mix", "clone"):
        return (_t(B, T, WIDTH), _t(1, M, WIDTH), _t(2, WIDTH, scale=0.1), _t(())), dict(num_prefix=NUM_PREFIX)
    if op == "prompt_attention":
        return tuple(_t(B, T, H, D, dtype=LOW) for _ in range(3)) + (D ** -0.5,), {}
    if op == "attention_saliency":
        q, k = (_t(B, T, H, D, dtype=LOW, grad=False) for _ in range(2))
        return (q, k, D ** -0.5, (0, 1), NUM_PREFIX + M), {}
    if op == "prompt_kv_attention":
        q, k, v = (_t(B, T - M, H, D, dtype=LOW) for _ in range(3))
        return (q, k, v, _t(1, M, H, D, dtype=LOW), _t(1, M, H, D, dtype=LOW), D ** -0.5), {}
    if op == "folded_cross_attention":
        x = _t(B, T - M, WIDTH)
        w_logits, w_values = (_t(H, CVPT_M, WIDTH, scale=WIDTH ** -0.5) for _ in range(2))
        return (x, w_logits, _t(H, CVPT_M), w_values, _t(WIDTH, grad=False)), dict(residual=x)
    saliency = torch.rand(B, N, device=SETTING.device)
    return (_t(B, T, WIDTH), saliency, _t(())), dict(num_prefix=NUM_PREFIX, num_prompts=M, k=round(0.25 * N))


IN_PLACE = ("da_mix", "ae_update")


def _step(op: str, backward: bool):
    args, kwargs = _inputs(op)
    fn = (lambda tokens, *rest, **kw: tokens) if op == "clone" else getattr(ops, op)
    grad_out = None
    autocast = torch.autocast(SETTING.device, dtype=LOW, enabled=CUDA and op == "folded_cross_attention")

    def run():
        nonlocal grad_out
        call_args = args
        if op in IN_PLACE + ("clone",):
            # forward only: in place on the same buffer, no autograd; with backward: a fresh clone
            call_args = (args[0].clone() if backward else args[0].detach(),) + args[1:]
        with autocast, torch.set_grad_enabled(backward):
            out = fn(*call_args, **kwargs)
        if backward:
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.backward(out, grad_out)
        if CUDA:
            torch.cuda.synchronize()
    return run


OPS = ["da_mix", "prompt_attention", "attention_saliency", "ae_update", "prompt_kv_attention",
       "folded_cross_attention", "clone"]


# attention_saliency has no gradient (AE's top-k indices carry none): forward rows only.
CASES = [pytest.param(op, backward, id=f"{op}-{'forward+backward' if backward else 'forward'}")
         for op in OPS for backward in (False, True) if not (backward and op == "attention_saliency")]


@pytest.mark.parametrize("backend", svpt.available_backends(SETTING.device))
@pytest.mark.parametrize("op, backward", CASES)
def test_op(benchmark, op, backend, backward):
    with svpt.backend(backend):
        step = _step(op, backward)
        for _ in range(3):
            step()
        benchmark.pedantic(step, rounds=20, iterations=1)
    benchmark.extra_info.update(op=op, backend=backend, backward=backward, device=SETTING.device,
                                shape=dict(B=B, T=T, H=H, D=D, M=M), dtype=str(LOW))
