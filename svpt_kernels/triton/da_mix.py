"""da_mix: SVPT's CDC + DA gate and mix, in place on the M prompt rows of the token buffer.

The forward reads the prompt rows ``P_out`` and the prompts ``P``, writes
``g * P_out + (1 - g) * P`` (``g = sigmoid(P_out . w0 + P . w1 + b)``) over those rows and keeps
a copy of ``P_out`` [B, M, d] for backward; no other row is read or written. The backward reads
and rewrites the prompt rows of the incoming gradient only (the other rows' gradient passes
through unchanged) and recomputes the gate.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import define_op, launch, next_pow2, writable

__all__ = ["da_mix", "DaMixFunction"]


@triton.jit
def _gate(x, p, W, BIAS, cols, col_ok, d):
    """sigmoid(x . w0 + p . w1 + b) per row, with w0, w1 (fp32)."""
    w0 = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    w1 = tl.load(W + d + cols, mask=col_ok, other=0.0).to(tl.float32)
    logit = tl.sum(x * w0[None, :], axis=1) + tl.sum(p * w1[None, :], axis=1) + tl.load(BIAS).to(tl.float32)
    return 1.0 / (1.0 + tl.exp(-logit)), w0, w1  # bias = -inf gives exactly 0: the rows become P


@triton.jit
def _da_mix_fwd_kernel(TOK, PROMPT, W, BIAS, PREV, d, num_prefix, M,
                       stride_tb, stride_tt, stride_pb, stride_pm,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    ok = (m < M)[:, None] & col_ok[None, :]
    rows = TOK + b * stride_tb + (num_prefix + m)[:, None] * stride_tt + cols[None, :]
    x_raw = tl.load(rows, mask=ok, other=0.0)
    p = tl.load(PROMPT + b * stride_pb + m[:, None] * stride_pm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(PREV + (b * M + m[:, None]) * d + cols[None, :], x_raw, mask=ok)
    x = x_raw.to(tl.float32)
    gate, _w0, _w1 = _gate(x, p, W, BIAS, cols, col_ok, d)
    mixed = gate[:, None] * x + (1.0 - gate[:, None]) * p
    tl.store(rows, mixed.to(TOK.dtype.element_ty), mask=ok)


@triton.jit
def _da_mix_bwd_kernel(GRAD, PREV, PROMPT, W, BIAS, GRAD_PROMPT_ROWS, GRAD_PARAM_PART, d, num_prefix, M,
                       stride_gb, stride_gt, stride_pb, stride_pm,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    ok = (m < M)[:, None] & col_ok[None, :]
    rows = GRAD + b * stride_gb + (num_prefix + m)[:, None] * stride_gt + cols[None, :]
    go = tl.load(rows, mask=ok, other=0.0).to(tl.float32)
    x = tl.load(PREV + (b * M + m[:, None]) * d + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    p = tl.load(PROMPT + b * stride_pb + m[:, None] * stride_pm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gate, w0, w1 = _gate(x, p, W, BIAS, cols, col_ok, d)
    # dL/dlogit = (go . (P_out - P)) * g (1 - g)
    grad_logit = tl.sum(go * (x - p), axis=1) * gate * (1.0 - gate)
    grad_x = gate[:, None] * go + grad_logit[:, None] * w0[None, :]
    tl.store(rows, grad_x.to(GRAD.dtype.element_ty), mask=ok)
    grad_p = (1.0 - gate[:, None]) * go + grad_logit[:, None] * w1[None, :]
    # Per-sample rows, summed over a broadcast prompt batch afterwards; the gate parameters'
    # gradients as one partial row [dw0, dw1, db] per program, summed afterwards: no atomics.
    tl.store(GRAD_PROMPT_ROWS + (b * M + m[:, None]) * d + cols[None, :], grad_p, mask=ok)
    part = GRAD_PARAM_PART + (b * tl.num_programs(0) + pid_m) * (2 * d + 1)
    tl.store(part + cols, tl.sum(grad_logit[:, None] * x, axis=0), mask=col_ok)
    tl.store(part + d + cols, tl.sum(grad_logit[:, None] * p, axis=0), mask=col_ok)
    tl.store(part + 2 * d, tl.sum(grad_logit, axis=0))


def _grid(batch: int, num_prompts: int, width: int) -> tuple[tuple[int, int], dict]:
    block_d = next_pow2(width)
    block_m = max(1, min(16, 4096 // block_d))  # ~4k elements per program
    meta = dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4 if block_d <= 1024 else 8)
    return (triton.cdiv(num_prompts, block_m), batch), meta


def _prompt_batch_stride(prompts: torch.Tensor) -> int:
    return prompts.stride(0) if prompts.shape[0] > 1 else 0


def _da_mix_fake(tokens, prompts, weight, bias, num_prefix):
    return tokens.new_empty((tokens.shape[0], prompts.shape[1], tokens.shape[2]))


@define_op("da_mix", _da_mix_fake, mutates_args=("tokens",))
def _da_mix_op(tokens: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mixes the prompt rows of ``tokens`` in place; returns their old values P_out [B, M, d]."""
    batch, _, width = tokens.shape
    num_prompts = prompts.shape[1]
    prev = torch.empty((batch, num_prompts, width), dtype=tokens.dtype, device=tokens.device)
    grid, meta = _grid(batch, num_prompts, width)
    launch(_da_mix_fwd_kernel)[grid](
        tokens, prompts, weight, bias, prev, width, num_prefix, num_prompts,
        tokens.stride(0), tokens.stride(1), _prompt_batch_stride(prompts), prompts.stride(1), **meta)
    return prev


def _da_mix_backward_fake(grad, prev, prompts, weight, bias, num_prefix):
    return torch.empty_like(prompts), torch.empty_like(weight), torch.empty_like(bias)


@define_op("da_mix_backward", _da_mix_backward_fake, mutates_args=("grad",))
def _da_mix_backward_op(grad: torch.Tensor, prev: torch.Tensor, prompts: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor,
                        num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrites the prompt rows of ``grad`` (dL/dout -> dL/dtokens) in place; returns the
    gradients of prompts, weight and bias."""
    batch, _, width = grad.shape
    num_prompts = prompts.shape[1]
    grad_prompts = torch.empty((batch, num_prompts, width), dtype=torch.float32, device=grad.device)
    grid, meta = _grid(batch, num_prompts, width)
    part = torch.empty((grid[0] * batch, 2 * width + 1), dtype=torch.float32, device=grad.device)
    launch(_da_mix_bwd_kernel)[grid](
        grad, prev, prompts, weight, bias, grad_prompts, part, width, num_prefix, num_prompts,
        grad.stride(0), grad.stride(1), _prompt_batch_stride(prompts), prompts.stride(1), **meta)
    if prompts.shape[0] == 1:
        grad_prompts = grad_prompts.sum(dim=0, keepdim=True)
    params = part.sum(dim=0)
    grad_weight = params[:2 * width].view(2, width).to(weight.dtype)
    # a copy: a custom op's outputs must not alias each other (grad_weight may be a view of params)
    grad_bias = params[2 * width].reshape(bias.shape).to(bias.dtype, copy=True)
    return grad_prompts.to(prompts.dtype), grad_weight, grad_bias


class DaMixFunction(torch.autograd.Function):
    """Autograd of the in-place da_mix over ``svpt::da_mix`` / ``svpt::da_mix_backward``. Saves
    the prompts, the gate's parameters and the M old prompt rows, never the [B, T, d] buffer."""

    @staticmethod
    def forward(ctx, tokens, prompts, weight, bias, num_prefix):
        prev = _da_mix_op(tokens, prompts, weight, bias, num_prefix)
        ctx.mark_dirty(tokens)
        ctx.save_for_backward(prev, prompts, weight, bias)
        ctx.num_prefix = num_prefix
        return tokens

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        prev, prompts, weight, bias = ctx.saved_tensors
        grad = writable(grad)
        grads = _da_mix_backward_op(grad, prev, prompts, weight, bias, ctx.num_prefix)
        need = ctx.needs_input_grad
        return (grad, *(g if n else None for g, n in zip(grads, need[1:4])), None)


def da_mix(tokens, prompts, weight, bias, num_prefix):
    """Triton da_mix; same contract as :func:`svpt.ops.da_mix` (in place on ``tokens``)."""
    return DaMixFunction.apply(tokens, prompts.to(tokens.dtype).contiguous(), weight.contiguous(),
                               bias.reshape(()), num_prefix)
