"""da_mix: SVPT's CDC + DA gate and mix, written straight into the block's token buffer.

One pass over the token rows writes the output sequence: prompt rows get
``g * P_out + (1 - g) * P`` with ``g = sigmoid(P_out . w0 + P . w1 + b)``, the other rows
are copied, so there is no ``torch.cat`` of the sequence and no gate tensor in memory.
The backward recomputes the gate from the saved prompt rows, prompts and gate parameters.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import define_op, launch, next_pow2

__all__ = ["da_mix", "DaMixFunction"]


@triton.jit
def _da_mix_fwd_kernel(TOK, PROMPT, W, BIAS, OUT, T, d, num_prefix, M,
                       stride_tb, stride_tt, stride_pb, stride_pm, stride_ob, stride_ot,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < d
    m = rows - num_prefix
    is_prompt = (m >= 0) & (m < M) & row_ok
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(TOK + b * stride_tb + rows[:, None] * stride_tt + cols[None, :], mask=tile_ok, other=0.0)
    prompt_ok = is_prompt[:, None] & col_ok[None, :]
    p = tl.load(PROMPT + b * stride_pb + m[:, None] * stride_pm + cols[None, :], mask=prompt_ok,
                other=0.0).to(tl.float32)
    w0 = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    w1 = tl.load(W + d + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    xf = x.to(tl.float32)
    logit = tl.sum(xf * w0[None, :], axis=1) + tl.sum(p * w1[None, :], axis=1) + bias
    gate = 1.0 / (1.0 + tl.exp(-logit))  # bias = -inf gives exactly 0: the output is P
    mixed = gate[:, None] * xf + (1.0 - gate[:, None]) * p
    y = tl.where(is_prompt[:, None], mixed, xf)
    tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + cols[None, :],
             y.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _da_mix_bwd_kernel(GRAD_OUT, PREV, PROMPT, W, BIAS, GRAD_TOK, GRAD_PROMPT_ROWS, GRAD_LOGIT,
                       T, d, num_prefix, M,
                       stride_gb, stride_gt, stride_vb, stride_vm, stride_pb, stride_pm,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    col_ok = cols < d
    m = rows - num_prefix
    is_prompt = (m >= 0) & (m < M) & row_ok
    tile_ok = row_ok[:, None] & col_ok[None, :]
    prompt_ok = is_prompt[:, None] & col_ok[None, :]
    go = tl.load(GRAD_OUT + b * stride_gb + rows[:, None] * stride_gt + cols[None, :], mask=tile_ok,
                 other=0.0).to(tl.float32)
    x = tl.load(PREV + b * stride_vb + m[:, None] * stride_vm + cols[None, :], mask=prompt_ok,
                other=0.0).to(tl.float32)
    p = tl.load(PROMPT + b * stride_pb + m[:, None] * stride_pm + cols[None, :], mask=prompt_ok,
                other=0.0).to(tl.float32)
    w0 = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    w1 = tl.load(W + d + cols, mask=col_ok, other=0.0).to(tl.float32)
    bias = tl.load(BIAS).to(tl.float32)
    logit = tl.sum(x * w0[None, :], axis=1) + tl.sum(p * w1[None, :], axis=1) + bias
    gate = 1.0 / (1.0 + tl.exp(-logit))
    # dL/dlogit = (go . (P_out - P)) * g (1 - g)
    grad_logit = tl.sum(go * (x - p), axis=1) * gate * (1.0 - gate)
    grad_x = tl.where(is_prompt[:, None], gate[:, None] * go + grad_logit[:, None] * w0[None, :], go)
    tl.store(GRAD_TOK + b * stride_gb + rows[:, None] * stride_gt + cols[None, :],
             grad_x.to(GRAD_TOK.dtype.element_ty), mask=tile_ok)
    grad_p = (1.0 - gate[:, None]) * go + grad_logit[:, None] * w1[None, :]
    # Per-sample rows, summed over a broadcast prompt batch afterwards: deterministic, no atomics.
    tl.store(GRAD_PROMPT_ROWS + (b * M + m[:, None]) * d + cols[None, :], grad_p, mask=prompt_ok)
    tl.store(GRAD_LOGIT + b * M + m, grad_logit, mask=is_prompt)


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = next_pow2(d)
    block_t = max(1, min(16, 4096 // block_d))  # ~4k elements per program
    return block_t, block_d, 4 if block_d <= 1024 else 8


def _out_dtype(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.dtype:
    # The reference's cat promotes the copied rows and the mixed rows (whose dtype follows
    # tokens and prompts; the gate's autocast dtype is never wider).
    return torch.promote_types(tokens.dtype, prompts.dtype)


def _check(tokens, prompts, weight, bias, num_prefix):
    batch, length, width = tokens.shape
    if prompts.dim() != 3 or prompts.shape[0] not in (1, batch) or prompts.shape[2] != width:
        raise ValueError(f"da_mix: prompts {tuple(prompts.shape)} must be [1 or {batch}, M, {width}]")
    if num_prefix + prompts.shape[1] > length:
        raise ValueError(f"da_mix: {num_prefix} prefix + {prompts.shape[1]} prompt rows exceed T={length}")
    if tuple(weight.shape) != (2, width) or bias.numel() != 1:
        raise ValueError(f"da_mix: weight {tuple(weight.shape)} must be [2, {width}] and bias a scalar")


def _da_mix_fake(tokens, prompts, weight, bias, num_prefix):
    return tokens.new_empty(tokens.shape, dtype=_out_dtype(tokens, prompts))


@define_op("da_mix", _da_mix_fake)
def _da_mix_op(tokens: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    batch, length, width = tokens.shape
    num_prompts = prompts.shape[1]
    out = torch.empty(tokens.shape, dtype=_out_dtype(tokens, prompts), device=tokens.device)
    block_t, block_d, warps = _blocks(width)
    grid = (triton.cdiv(length, block_t), batch)
    launch(_da_mix_fwd_kernel)[grid](
        tokens, prompts, weight, bias, out, length, width, num_prefix, num_prompts,
        tokens.stride(0), tokens.stride(1), prompts.stride(0) if prompts.shape[0] > 1 else 0,
        prompts.stride(1), out.stride(0), out.stride(1),
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    return out


def _da_mix_backward_fake(grad_out, prev, prompts, weight, bias, num_prefix):
    return (torch.empty_like(grad_out, memory_format=torch.contiguous_format), torch.empty_like(prompts),
            torch.empty_like(weight), torch.empty_like(bias))


@define_op("da_mix_backward", _da_mix_backward_fake)
def _da_mix_backward_op(grad_out: torch.Tensor, prev: torch.Tensor, prompts: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor,
                        num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # prev: the input's prompt rows P_out [B, M, d]; dL/dtokens comes out in grad_out's dtype.
    batch, length, width = grad_out.shape
    num_prompts = prompts.shape[1]
    grad_out = grad_out.contiguous()
    grad_tokens = torch.empty_like(grad_out)
    grad_prompt_rows = torch.empty((batch, num_prompts, width), dtype=torch.float32, device=grad_out.device)
    grad_logit = torch.empty((batch, num_prompts), dtype=torch.float32, device=grad_out.device)
    block_t, block_d, warps = _blocks(width)
    grid = (triton.cdiv(length, block_t), batch)
    launch(_da_mix_bwd_kernel)[grid](
        grad_out, prev, prompts, weight, bias, grad_tokens, grad_prompt_rows, grad_logit,
        length, width, num_prefix, num_prompts, grad_out.stride(0), grad_out.stride(1),
        prev.stride(0), prev.stride(1), prompts.stride(0) if prompts.shape[0] > 1 else 0,
        prompts.stride(1), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps)
    grad_w0 = (grad_logit.unsqueeze(-1) * prev.float()).sum(dim=(0, 1))
    if prompts.shape[0] == 1:
        grad_prompts = grad_prompt_rows.sum(dim=0, keepdim=True)
        grad_w1 = (grad_logit.sum(0).unsqueeze(-1) * prompts[0].float()).sum(dim=0)
    else:
        grad_prompts = grad_prompt_rows
        grad_w1 = (grad_logit.unsqueeze(-1) * prompts.float()).sum(dim=(0, 1))
    grad_weight = torch.stack([grad_w0, grad_w1]).to(weight.dtype)
    grad_bias = grad_logit.sum().reshape(bias.shape).to(bias.dtype)
    return grad_tokens, grad_prompts.to(prompts.dtype), grad_weight, grad_bias


class DaMixFunction(torch.autograd.Function):
    """Autograd of da_mix over the ops ``svpt::da_mix`` and ``svpt::da_mix_backward`` (both
    traceable by torch.compile). Saves the prompts, the gate's parameters and only the prompt
    rows P_out of the input (not the whole [B, T, d] sequence, which nothing else keeps: the
    previous block's output); the gate is recomputed."""

    @staticmethod
    def forward(ctx, tokens, prompts, weight, bias, num_prefix):
        prev = tokens[:, num_prefix:num_prefix + prompts.shape[1]].contiguous()
        ctx.save_for_backward(prev, prompts, weight, bias)
        ctx.num_prefix, ctx.tokens_dtype = num_prefix, tokens.dtype
        return _da_mix_op(tokens, prompts, weight, bias, num_prefix)

    @staticmethod
    def backward(ctx, grad_out):
        prev, prompts, weight, bias = ctx.saved_tensors
        grads = _da_mix_backward_op(grad_out, prev, prompts, weight, bias, ctx.num_prefix)
        grads = (grads[0].to(ctx.tokens_dtype), *grads[1:])
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def da_mix(tokens, prompts, weight, bias, num_prefix):
    """Triton da_mix; same contract as :func:`svpt.ops.da_mix`."""
    _check(tokens, prompts, weight, bias, num_prefix)
    if tokens.dtype not in _common.KERNEL_DTYPES or prompts.dtype not in _common.KERNEL_DTYPES:
        from svpt import reference  # float64 and others: the kernels are written for fp32/fp16/bf16
        return reference.da_mix(tokens, prompts, weight, bias, num_prefix)
    tokens = tokens.contiguous()
    prompts = prompts.contiguous()
    return DaMixFunction.apply(tokens, prompts, weight.contiguous(), bias.reshape(()), num_prefix)
