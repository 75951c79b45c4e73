"""prompt_kv_attention: VPT-deep's KV-only attention, keys/values = prompt segment + tokens.

The queries are the image tokens only; the keys and values are the prompt keys/values
(batch 1: computed once per step, not per sample) followed by the tokens' own, read from two
separate tensors, so no concatenated sequence exists. This is prompt_attention's FlashAttention
machinery (prompt_attention.py) with its optional leading key/value segment switched on: the
forward and dQ kernels loop over the prompt segment and then the token keys; dK/dV run once per
segment, the prompt segment's per-sample fp32 gradients summed over the batch afterwards
(deterministic, no atomics).
"""
from typing import Tuple

import torch

from . import _common
from ._common import define_op, last_dim_contiguous
from .prompt_attention import attention_backward, attention_forward

__all__ = ["prompt_kv_attention", "PromptKVAttentionFunction"]


def _fwd_fake(q, k, v, prompt_k, prompt_v, scale):
    batch, tq, heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, tq), dtype=torch.float32))


@define_op("prompt_kv_attention", _fwd_fake)
def _prompt_kv_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
                            prompt_v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, prompt_k, prompt_v)


def _bwd_fake(grad_out, q, k, v, prompt_k, prompt_v, out, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format)
                 for t in (q, k, v, prompt_k, prompt_v))


@define_op("prompt_kv_attention_backward", _bwd_fake)
def _prompt_kv_attention_backward_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        prompt_k: torch.Tensor, prompt_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, scale, prompt_k, prompt_v)


class PromptKVAttentionFunction(torch.autograd.Function):
    """Autograd over ``svpt::prompt_kv_attention`` / ``svpt::prompt_kv_attention_backward``;
    saves the inputs, the output and the row log-sum-exp, never the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, scale):
        out, lse = _prompt_kv_attention_op(q, k, v, prompt_k, prompt_v, scale)
        ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        grads = _prompt_kv_attention_backward_op(grad_out, *ctx.saved_tensors, ctx.scale)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def _check(q, k, v, prompt_k, prompt_v):
    if any(t.dim() != 4 for t in (q, k, v, prompt_k, prompt_v)):
        raise ValueError("prompt_kv_attention: q, k, v, prompt_k, prompt_v must be [B, T, H, D]")
    batch, tq, heads, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (heads, dim):
        raise ValueError(f"prompt_kv_attention: k {tuple(k.shape)} / v {tuple(v.shape)} must be "
                         f"[{batch}, Tk, {heads}, {dim}] for q {tuple(q.shape)}")
    if (prompt_k.shape != prompt_v.shape or prompt_k.shape[0] not in (1, batch)
            or prompt_k.shape[2:] != (heads, dim) or prompt_k.shape[1] + k.shape[1] < 1):
        raise ValueError(f"prompt_kv_attention: prompt_k {tuple(prompt_k.shape)} / prompt_v "
                         f"{tuple(prompt_v.shape)} must be [1 or {batch}, M, {heads}, {dim}]")
    if dim > 256:
        raise ValueError(f"prompt_kv_attention: head dim {dim} > 256 is not supported by the Triton kernels")


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    """Triton prompt_kv_attention; same contract as :func:`svpt.ops.prompt_kv_attention`."""
    _check(q, k, v, prompt_k, prompt_v)
    dtype = q.dtype
    for t in (k, v, prompt_k, prompt_v):
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype not in _common.KERNEL_DTYPES:
        from svpt import reference  # float64 and others: the kernels are written for fp32/fp16/bf16
        return reference.prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale)
    tensors = (last_dim_contiguous(t.to(dtype)) for t in (q, k, v, prompt_k, prompt_v))
    return PromptKVAttentionFunction.apply(*tensors, float(scale))[0]
