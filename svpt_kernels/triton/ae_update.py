"""ae_update: SVPT's attentive enhancement fused with the attention residual add.

``h = tokens + attn_out``; ``u = scale * mean(h[:, n_p : n_p+M])``; the top-k patch rows by
saliency get ``u`` added. Selection is ``torch.topk`` (indices carry no gradient); one kernel
then computes the prompt-row mean and writes every row of the output, so ``h`` is never
materialised separately. The forward also writes ``mean(h_prompt)`` ([B, d]), which with the
indices and the scale is all the backward needs: the [B, T, d] inputs are not kept for it.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import define_op, launch, next_pow2

__all__ = ["ae_update", "AeUpdateFunction"]


@triton.jit
def _ae_update_fwd_kernel(TOK, ATT, SELECTED, SCALE, OUT, MEAN, T, d, num_prefix, M,
                          stride_zb, stride_zt, stride_ab, stride_at, stride_ob, stride_ot,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    # u = scale * mean over the prompt rows of h
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, M, BLOCK_T):
        rows = num_prefix + t0 + tl.arange(0, BLOCK_T)
        ok = ((t0 + tl.arange(0, BLOCK_T)) < M)[:, None] & col_ok[None, :]
        z = tl.load(TOK + b * stride_zb + rows[:, None] * stride_zt + cols[None, :], mask=ok, other=0.0)
        a = tl.load(ATT + b * stride_ab + rows[:, None] * stride_at + cols[None, :], mask=ok, other=0.0)
        total += tl.sum(z.to(tl.float32) + a.to(tl.float32), axis=0)
    tl.store(MEAN + b * d + cols, total / M, mask=col_ok)
    u = tl.load(SCALE).to(tl.float32) * total / M
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.load(TOK + b * stride_zb + rows[:, None] * stride_zt + cols[None, :], mask=ok, other=0.0)
        a = tl.load(ATT + b * stride_ab + rows[:, None] * stride_at + cols[None, :], mask=ok, other=0.0)
        selected = tl.load(SELECTED + b * T + rows, mask=row_ok, other=0) != 0
        h = z.to(tl.float32) + a.to(tl.float32) + tl.where(selected[:, None], u[None, :], 0.0)
        tl.store(OUT + b * stride_ob + rows[:, None] * stride_ot + cols[None, :],
                 h.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _ae_update_bwd_kernel(GRAD_OUT, MEAN, INDEX, SCALE, GRAD_H, GRAD_SCALE_PART,
                          T, d, num_prefix, M, K, first_patch, stride_gb, stride_gt,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    # dL/du = sum of the output gradient over the selected rows
    grad_u = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_T):
        j_ok = (j0 + tl.arange(0, BLOCK_T)) < K
        rows = tl.load(INDEX + b * K + j0 + tl.arange(0, BLOCK_T), mask=j_ok, other=0) + first_patch
        ok = j_ok[:, None] & col_ok[None, :]
        g = tl.load(GRAD_OUT + b * stride_gb + rows[:, None] * stride_gt + cols[None, :], mask=ok, other=0.0)
        grad_u += tl.sum(g.to(tl.float32), axis=0)
    mean = tl.load(MEAN + b * d + cols, mask=col_ok, other=0.0)
    # one partial per program, summed afterwards: deterministic
    tl.store(GRAD_SCALE_PART + b * tl.num_programs(0) + pid_d, tl.sum(grad_u * mean, axis=0))
    coef = tl.load(SCALE).to(tl.float32) / M * grad_u
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        ok = row_ok[:, None] & col_ok[None, :]
        is_prompt = (rows >= num_prefix) & (rows < num_prefix + M)
        g = tl.load(GRAD_OUT + b * stride_gb + rows[:, None] * stride_gt + cols[None, :], mask=ok, other=0.0)
        grad_h = g.to(tl.float32) + tl.where(is_prompt[:, None], coef[None, :], 0.0)
        tl.store(GRAD_H + b * stride_gb + rows[:, None] * stride_gt + cols[None, :],
                 grad_h.to(GRAD_H.dtype.element_ty), mask=ok)


def _blocks(d: int) -> tuple[int, int]:
    block_d = min(256, next_pow2(d))
    return max(1, 2048 // block_d), block_d


def _ae_update_fake(tokens, attn_out, index, scale, num_prefix, num_prompts):
    out = tokens.new_empty(tokens.shape, dtype=torch.promote_types(tokens.dtype, attn_out.dtype))
    return out, tokens.new_empty((tokens.shape[0], tokens.shape[2]), dtype=torch.float32)


@define_op("ae_update", _ae_update_fake)
def _ae_update_op(tokens: torch.Tensor, attn_out: torch.Tensor, index: torch.Tensor,
                  scale: torch.Tensor, num_prefix: int, num_prompts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # Returns the output and mean(h_prompt) [B, d] (fp32), which is all the backward needs.
    batch, length, width = tokens.shape
    first_patch = num_prefix + num_prompts
    selected = torch.zeros((batch, length), dtype=torch.int8, device=tokens.device)
    selected.scatter_(1, index + first_patch, 1)
    out = torch.empty(tokens.shape, dtype=torch.promote_types(tokens.dtype, attn_out.dtype),
                      device=tokens.device)
    mean = torch.empty((batch, width), dtype=torch.float32, device=tokens.device)
    block_t, block_d = _blocks(width)
    grid = (triton.cdiv(width, block_d), batch)
    launch(_ae_update_fwd_kernel)[grid](
        tokens, attn_out, selected, scale, out, mean, length, width, num_prefix, num_prompts,
        tokens.stride(0), tokens.stride(1), attn_out.stride(0), attn_out.stride(1),
        out.stride(0), out.stride(1), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return out, mean


def _ae_update_backward_fake(grad_out, mean, index, scale, num_prefix, num_prompts):
    return torch.empty_like(grad_out, memory_format=torch.contiguous_format), torch.empty_like(scale)


@define_op("ae_update_backward", _ae_update_backward_fake)
def _ae_update_backward_op(grad_out: torch.Tensor, mean: torch.Tensor, index: torch.Tensor,
                           scale: torch.Tensor, num_prefix: int,
                           num_prompts: int) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, length, width = grad_out.shape
    grad_out = grad_out.contiguous()
    grad_h = torch.empty_like(grad_out)
    block_t, block_d = _blocks(width)
    grid = (triton.cdiv(width, block_d), batch)
    grad_scale_part = torch.empty((batch, grid[0]), dtype=torch.float32, device=grad_out.device)
    launch(_ae_update_bwd_kernel)[grid](
        grad_out, mean, index, scale, grad_h, grad_scale_part,
        length, width, num_prefix, num_prompts, index.shape[1], num_prefix + num_prompts,
        grad_out.stride(0), grad_out.stride(1), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return grad_h, grad_scale_part.sum().to(scale.dtype)


class AeUpdateFunction(torch.autograd.Function):
    """Autograd of ae_update over ``svpt::ae_update`` / ``svpt::ae_update_backward``. Saves the
    top-k indices, the scale and mean(h_prompt) [B, d], never the [B, T, d] inputs."""

    @staticmethod
    def forward(ctx, tokens, attn_out, index, scale, num_prefix, num_prompts):
        out, mean = _ae_update_op(tokens, attn_out, index, scale, num_prefix, num_prompts)
        ctx.save_for_backward(mean, index, scale)
        ctx.num_prefix, ctx.num_prompts = num_prefix, num_prompts
        ctx.dtypes = tokens.dtype, attn_out.dtype
        ctx.mark_non_differentiable(mean)
        return out, mean

    @staticmethod
    def backward(ctx, grad_out, _grad_mean):
        mean, index, scale = ctx.saved_tensors
        grad_h, grad_scale = _ae_update_backward_op(grad_out, mean, index, scale, ctx.num_prefix, ctx.num_prompts)
        need = ctx.needs_input_grad
        tokens_dtype, attn_dtype = ctx.dtypes
        # h = tokens + attn_out: both get dL/dh, each in its own dtype (as autograd's add does)
        return (grad_h.to(tokens_dtype) if need[0] else None,
                grad_h.to(attn_dtype) if need[1] else None,
                None, grad_scale if need[3] else None, None, None)


def ae_update(tokens, attn_out, saliency, scale, num_prefix, num_prompts, k):
    """Triton ae_update; same contract as :func:`svpt.ops.ae_update`."""
    if tokens.shape != attn_out.shape or tokens.dim() != 3:
        raise ValueError(f"ae_update: tokens {tuple(tokens.shape)} and attn_out {tuple(attn_out.shape)} "
                         "must both be [B, T, d]")
    num_patches = tokens.shape[1] - num_prefix - num_prompts
    if tuple(saliency.shape) != (tokens.shape[0], num_patches) or not 1 <= k <= num_patches:
        raise ValueError(f"ae_update: saliency {tuple(saliency.shape)} must be [B, N={num_patches}] "
                         f"and k={k} in 1..N")
    if tokens.dtype not in _common.KERNEL_DTYPES or attn_out.dtype not in _common.KERNEL_DTYPES:
        from svpt import reference  # float64 and others: the kernels are written for fp32/fp16/bf16
        return reference.ae_update(tokens, attn_out, saliency, scale, num_prefix, num_prompts, k)
    index = saliency.detach().topk(k, dim=-1).indices.contiguous()
    return AeUpdateFunction.apply(tokens.contiguous(), attn_out.contiguous(), index,
                                  scale.reshape(()), num_prefix, num_prompts)[0]
