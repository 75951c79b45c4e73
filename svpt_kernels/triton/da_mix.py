"""da_mix: SVPT's CDC + DA gate and mix, in place on the M prompt rows of the token buffer.

The forward reads the prompt rows ``P_out`` and the prompts ``P``, writes
``g * P_out + (1 - g) * P`` (``g = sigmoid(P_out . w0 + P . w1 + b)``) over those rows and keeps
a copy of ``P_out`` [B, M, d] for backward; no other row is read or written. The backward reads
and rewrites the prompt rows of the incoming gradient only (the other rows' gradient passes
through unchanged) and recomputes the gate. With a residual (the op on ``residual + tokens``, the
block's ``h + mlp``), as ae_update's (ae_update.py): a new buffer forward; backward the gradient's
copy in the branch's dtype first, its prompt rows rewritten with the gradient's. With a residual and
the ``norm`` that reads the result (SVPT's blocks: block l+1's LayerNorm), the ``_da_mix_norm_*`` kernels
do add, mix and LayerNorm in one pass over the rows, forward and backward (_layer_norm.py).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _layer_norm as ln
from ._common import autocast_dtype, branch_gradient, define_op, launch, next_pow2, writable

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
def _da_mix_bwd_kernel(GRAD, BRANCH, PREV, PROMPT, W, BIAS, GRAD_PROMPT_ROWS, GRAD_PARAM_PART, d, num_prefix, M,
                       stride_gb, stride_gt, stride_bb, stride_bt, stride_pb, stride_pm, HAS_BRANCH: tl.constexpr,
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
    if HAS_BRANCH:  # the branch's copy of these rows, from the same float32 values
        branch = BRANCH + b * stride_bb + (num_prefix + m)[:, None] * stride_bt + cols[None, :]
        tl.store(branch, grad_x.to(BRANCH.dtype.element_ty), mask=ok)
    grad_p = (1.0 - gate[:, None]) * go + grad_logit[:, None] * w1[None, :]
    # Per-sample rows, summed over a broadcast prompt batch afterwards; the gate parameters'
    # gradients as one partial row [dw0, dw1, db] per program, summed afterwards: no atomics.
    tl.store(GRAD_PROMPT_ROWS + (b * M + m[:, None]) * d + cols[None, :], grad_p, mask=ok)
    part = GRAD_PARAM_PART + (b * tl.num_programs(0) + pid_m) * (2 * d + 1)
    tl.store(part + cols, tl.sum(grad_logit[:, None] * x, axis=0), mask=col_ok)
    tl.store(part + d + cols, tl.sum(grad_logit[:, None] * p, axis=0), mask=col_ok)
    tl.store(part + 2 * d, tl.sum(grad_logit, axis=0))


@triton.jit
def _prompt_rows(PROMPT, b, t, cols, col_ok, row_ok, num_prefix, M, stride_pb, stride_pm):
    """Which of these rows are prompt rows ([R] and [R, BLOCK_D]), their index m among the prompts, and
    the prompts P[m]."""
    m = t - num_prefix
    is_prompt = row_ok & (m >= 0) & (m < M)
    m = tl.where(is_prompt, m, 0)
    pok = is_prompt[:, None] & col_ok[None, :]
    p = tl.load(PROMPT + b[:, None] * stride_pb + m[:, None] * stride_pm + cols[None, :], mask=pok, other=0.0)
    return m, is_prompt, pok, p.to(tl.float32)


@triton.jit
def _da_mix_norm_fwd_kernel(RES, BR, PROMPT, W, BIAS, PREV, OUT, Y, MU, RSTD, NW, NB, n_rows, T, d, num_prefix, M,
                            eps, stride_rb, stride_rt, stride_bb, stride_bt, stride_pb, stride_pm,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, b, t, row_ok, cols, col_ok, ok = ln.row_block(tl.program_id(0), n_rows, T, d, BLOCK_R, BLOCK_D)
    x = ln.load_sum(RES, BR, b, t, cols, ok, stride_rb, stride_rt, stride_bb, stride_bt)
    x = x.to(OUT.dtype.element_ty).to(tl.float32)  # P_out as the unfused op stores it
    m, _is_prompt, pok, p = _prompt_rows(PROMPT, b, t, cols, col_ok, row_ok, num_prefix, M, stride_pb, stride_pm)
    tl.store(PREV + (b[:, None] * M + m[:, None]) * d + cols[None, :], x.to(PREV.dtype.element_ty), mask=pok)
    gate, _w0, _w1 = _gate(x, p, W, BIAS, cols, col_ok, d)
    mixed = tl.where(pok, gate[:, None] * x + (1.0 - gate[:, None]) * p, x)
    ln.store_and_normalise(mixed, OUT, Y, MU, RSTD, NW, NB, rows, row_ok, cols, col_ok, ok, d, eps, HAS_W, HAS_B)


@triton.jit
def _da_mix_norm_bwd_kernel(GY, GO, OUT, MU, RSTD, NW, PREV, PROMPT, W, BIAS, GRAD_RES, GRAD_BR, GRAD_PROMPT_ROWS,
                            GRAD_LOGIT, n_rows, T, d, num_prefix, M, stride_pb, stride_pm,
                            HAS_W: tl.constexpr, HAS_GO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, b, t, row_ok, cols, col_ok, ok = ln.row_block(tl.program_id(0), n_rows, T, d, BLOCK_R, BLOCK_D)
    go = ln.sum_gradient(GY, GO, OUT, MU, RSTD, NW, rows, row_ok, cols, col_ok, ok, d, HAS_W, HAS_GO)
    m, is_prompt, pok, p = _prompt_rows(PROMPT, b, t, cols, col_ok, row_ok, num_prefix, M, stride_pb, stride_pm)
    prompt_row = (b * M + m)[:, None] * d + cols[None, :]
    x = tl.load(PREV + prompt_row, mask=pok, other=0.0).to(tl.float32)
    gate, w0, w1 = _gate(x, p, W, BIAS, cols, col_ok, d)
    # as _da_mix_bwd_kernel, on the prompt rows of this block of rows (0 on the others: x = p = 0)
    grad_logit = tl.sum(go * (x - p), axis=1) * gate * (1.0 - gate)
    grad = tl.where(pok, gate[:, None] * go + grad_logit[:, None] * w0[None, :], go)
    tl.store(GRAD_PROMPT_ROWS + prompt_row, (1.0 - gate[:, None]) * go + grad_logit[:, None] * w1[None, :], mask=pok)
    tl.store(GRAD_LOGIT + b * M + m, grad_logit, mask=is_prompt)
    ln.store_gradients(grad, GRAD_RES, GRAD_BR, rows, cols, ok, d)


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


def _da_mix_backward_fake(grad, branch, prev, prompts, weight, bias, num_prefix):
    return torch.empty_like(prompts), torch.empty_like(weight), torch.empty_like(bias)


@define_op("da_mix_backward", _da_mix_backward_fake, mutates_args=("grad", "branch"))
def _da_mix_backward_op(grad: torch.Tensor, branch: torch.Tensor, prev: torch.Tensor, prompts: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor,
                        num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rewrites the prompt rows of ``grad`` (dL/dout -> dL/dtokens) in place, and of ``branch`` (the
    gradient's copy in the branch's dtype; empty when there is none); returns the gradients of
    prompts, weight and bias."""
    batch, _, width = grad.shape
    num_prompts = prompts.shape[1]
    grad_prompts = torch.empty((batch, num_prompts, width), dtype=torch.float32, device=grad.device)
    grid, meta = _grid(batch, num_prompts, width)
    part = torch.empty((grid[0] * batch, 2 * width + 1), dtype=torch.float32, device=grad.device)
    has_branch = branch.numel() > 0
    branch_strides = (branch.stride(0), branch.stride(1)) if has_branch else (0, 0)
    launch(_da_mix_bwd_kernel)[grid](
        grad, branch, prev, prompts, weight, bias, grad_prompts, part, width, num_prefix, num_prompts,
        grad.stride(0), grad.stride(1), *branch_strides, _prompt_batch_stride(prompts), prompts.stride(1),
        HAS_BRANCH=has_branch, **meta)
    if prompts.shape[0] == 1:
        grad_prompts = grad_prompts.sum(dim=0, keepdim=True)
    params = part.sum(dim=0)
    grad_weight = params[:2 * width].view(2, width).to(weight.dtype)
    # a copy: a custom op's outputs must not alias each other (grad_weight may be a view of params)
    grad_bias = params[2 * width].reshape(bias.shape).to(bias.dtype, copy=True)
    return grad_prompts.to(prompts.dtype), grad_weight, grad_bias


class DaMixFunction(torch.autograd.Function):
    """Autograd of da_mix over ``svpt::da_mix`` / ``svpt::da_mix_backward``: in place on ``tokens``,
    or on ``residual + tokens`` when a residual is given. Saves the prompts, the gate's parameters
    and the M old prompt rows, never the [B, T, d] buffer."""

    @staticmethod
    def forward(ctx, tokens, prompts, weight, bias, num_prefix, residual):
        buf = tokens if residual is None else residual + tokens
        prev = _da_mix_op(buf, prompts, weight, bias, num_prefix)
        if residual is None:
            ctx.mark_dirty(tokens)
        ctx.save_for_backward(prev, prompts, weight, bias)
        ctx.num_prefix = num_prefix
        ctx.branch_dtype = None if residual is None else tokens.dtype
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        prev, prompts, weight, bias = ctx.saved_tensors
        branch = branch_gradient(grad, ctx.branch_dtype)
        grad = writable(grad)
        grads = _da_mix_backward_op(grad, grad.new_empty(0) if branch is None else branch, prev, prompts, weight,
                                    bias, ctx.num_prefix)
        need = ctx.needs_input_grad
        grad_residual = None if ctx.branch_dtype is None else grad
        return (grad if branch is None else branch, *(g if n else None for g, n in zip(grads, need[1:4])), None,
                grad_residual)


def _da_mix_norm_fake(tokens, prompts, weight, bias, num_prefix, residual, norm_weight, norm_bias, eps, norm_dtype):
    out, y, mean, rstd = ln.outputs(residual, tokens, norm_dtype)
    return out, y, mean, rstd, out.new_empty((tokens.shape[0], prompts.shape[1], tokens.shape[2]))


@define_op("da_mix_norm", _da_mix_norm_fake)
def _da_mix_norm_op(tokens: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    num_prefix: int, residual: torch.Tensor, norm_weight: Optional[torch.Tensor],
                    norm_bias: Optional[torch.Tensor], eps: float, norm_dtype: torch.dtype
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + tokens`` with its prompt rows mixed, and its LayerNorm; returns those two, the
    LayerNorm's per-row mean and 1/std, and P_out [B, M, d]."""
    batch, length, width = tokens.shape
    out, y, mean, rstd = ln.outputs(residual, tokens, norm_dtype)
    prev = out.new_empty((batch, prompts.shape[1], width))
    grid, meta = ln.grid(batch, length, width)
    launch(_da_mix_norm_fwd_kernel)[grid](
        residual, tokens, prompts, weight, bias, prev, out, y, mean, rstd, ln.optional(norm_weight, out),
        ln.optional(norm_bias, out), batch * length, length, width, num_prefix, prompts.shape[1], eps,
        residual.stride(0), residual.stride(1), tokens.stride(0), tokens.stride(1), _prompt_batch_stride(prompts),
        prompts.stride(1), HAS_W=norm_weight is not None, HAS_B=norm_bias is not None, **meta)
    return out, y, mean, rstd, prev


def _da_mix_norm_backward_fake(grad_y, grad_out, out, mean, rstd, norm_weight, prev, prompts, weight, bias,
                               num_prefix, residual_dtype, branch_dtype):
    grad_residual, grad_branch = ln.gradient_buffers(out, residual_dtype, branch_dtype)
    return grad_residual, grad_branch, torch.empty_like(prompts), torch.empty_like(weight), torch.empty_like(bias)


@define_op("da_mix_norm_backward", _da_mix_norm_backward_fake)
def _da_mix_norm_backward_op(grad_y: torch.Tensor, grad_out: Optional[torch.Tensor], out: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor, norm_weight: Optional[torch.Tensor],
                             prev: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             num_prefix: int, residual_dtype: torch.dtype, branch_dtype: torch.dtype
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the residual, the branch (each in its dtype), the prompts, weight and bias."""
    batch, length, width = out.shape
    num_prompts = prompts.shape[1]
    grad_residual, grad_branch = ln.gradient_buffers(out, residual_dtype, branch_dtype)
    grad_prompts = torch.empty((batch, num_prompts, width), dtype=torch.float32, device=out.device)
    grad_logit = torch.empty((batch, num_prompts), dtype=torch.float32, device=out.device)
    grid, meta = ln.grid(batch, length, width)
    launch(_da_mix_norm_bwd_kernel)[grid](
        grad_y, ln.optional(grad_out, out), out, mean, rstd, ln.optional(norm_weight, out), prev, prompts, weight,
        bias, grad_residual, grad_branch, grad_prompts, grad_logit, batch * length, length, width, num_prefix,
        num_prompts, _prompt_batch_stride(prompts), prompts.stride(1), HAS_W=norm_weight is not None,
        HAS_GO=grad_out is not None, **meta)
    if prompts.shape[0] == 1:
        grad_prompts = grad_prompts.sum(dim=0, keepdim=True)
    # the gate's parameters from the [B, M] logit gradients: small products, no [B, T, d] pass
    grad_weight = torch.stack([torch.einsum("bm,bmd->d", grad_logit, prev.float()),
                               torch.einsum("bm,bmd->d", grad_logit, prompts.float().expand_as(prev))])
    return (grad_residual, grad_branch, grad_prompts.to(prompts.dtype), grad_weight.to(weight.dtype),
            grad_logit.sum().reshape(bias.shape).to(bias.dtype))


class DaMixNormFunction(torch.autograd.Function):
    """Autograd of da_mix with ``norm``: (``residual + tokens`` mixed, its LayerNorm), over
    ``svpt::da_mix_norm`` / ``svpt::da_mix_norm_backward``. Saves the sum (the LayerNorm's input, as
    F.layer_norm does), its per-row statistics, the prompts, the gate's parameters and P_out."""

    @staticmethod
    def forward(ctx, tokens, prompts, weight, bias, num_prefix, residual, norm_weight, norm_bias, eps, norm_dtype):
        out, y, mean, rstd, prev = _da_mix_norm_op(tokens, prompts, weight, bias, num_prefix, residual,
                                                   norm_weight, norm_bias, eps, norm_dtype)
        ctx.save_for_backward(out, mean, rstd, norm_weight, prev, prompts, weight, bias)
        ctx.num_prefix, ctx.dtypes = num_prefix, (residual.dtype, tokens.dtype)
        return out, y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_y):
        out, mean, rstd, norm_weight, prev, prompts, weight, bias = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(out)
        grads = _da_mix_norm_backward_op(grad_y.contiguous(), None if grad_out is None else grad_out.contiguous(),
                                         out, mean, rstd, norm_weight, prev, prompts, weight, bias, ctx.num_prefix,
                                         *ctx.dtypes)
        need = ctx.needs_input_grad
        grad_residual, grad_tokens, *params = grads
        return (grad_tokens, *(g if n else None for g, n in zip(params, need[1:4])), None, grad_residual,
                None, None, None, None)


def da_mix(tokens, prompts, weight, bias, num_prefix, residual=None, norm=None):
    """Triton da_mix; same contract as :func:`svpt.ops.da_mix` (in place on ``tokens`` without a residual)."""
    dtype = tokens.dtype if residual is None else torch.promote_types(residual.dtype, tokens.dtype)
    prompts, weight, bias = prompts.to(dtype).contiguous(), weight.contiguous(), bias.reshape(())
    if norm is None:
        return DaMixFunction.apply(tokens, prompts, weight, bias, num_prefix, residual)
    return DaMixNormFunction.apply(tokens, prompts, weight, bias, num_prefix, residual, *norm,
                                   autocast_dtype(tokens.device) or dtype)
