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

from torch.autograd.function import once_differentiable

from ._common import define_op, last_dim_contiguous
from .prompt_attention import attention_backward, attention_forward, common_dtype

__all__ = ["prompt_kv_attention", "PromptKVAttentionFunction"]


def _fwd_fake(q, k, v, prompt_k, prompt_v, scale):
    batch, tq, heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, tq), dtype=torch.float32))


@define_op("prompt_kv_attention", _fwd_fake)
def _prompt_kv_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
                            prompt_v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale, prompt_k, prompt_v)


def _grads_like(tensors, token_grads):
    """Gradients shaped like ``(q, k, v, prompt_k, prompt_v)``; empty for the tokens' when
    they are not computed."""
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if i >= 3 or token_grads
                 else t.new_empty((0,)) for i, t in enumerate(tensors))


def _bwd_fake(grad_out, q, k, v, prompt_k, prompt_v, out, lse, scale, token_grads):
    return _grads_like((q, k, v, prompt_k, prompt_v), token_grads)


@define_op("prompt_kv_attention_backward", _bwd_fake)
def _prompt_kv_attention_backward_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        prompt_k: torch.Tensor, prompt_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        scale: float, token_grads: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = attention_backward(grad_out, q, k, v, out, lse, scale, prompt_k, prompt_v, token_grads)
    return grads if token_grads else _grads_like((q, k, v), False) + grads[3:]


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
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        token_grads = any(ctx.needs_input_grad[:3])  # not in VPT-deep's first block: its input is frozen
        grads = _prompt_kv_attention_backward_op(grad_out, *ctx.saved_tensors, ctx.scale, token_grads)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    """Triton prompt_kv_attention; same contract as :func:`svpt.ops.prompt_kv_attention`."""
    dtype = common_dtype(q, k, v, prompt_k, prompt_v)
    tensors = (last_dim_contiguous(t.to(dtype)) for t in (q, k, v, prompt_k, prompt_v))
    return PromptKVAttentionFunction.apply(*tensors, float(scale))[0]
