"""ae_update: SVPT's attentive enhancement, in place on the k selected rows of the residual ``h``.

``u = scale * mean(h[:, n_p : n_p+M])``; the top-k patch rows by saliency get ``u`` added.
Selection is ``torch.topk`` (indices carry no gradient). The forward reads the M prompt rows and
reads and writes the k selected rows; it keeps ``mean(h_prompt)`` [B, d] and the indices for
backward. The backward reads the gradient at the k selected rows (dL/du) and adds
``scale / M * dL/du`` to the gradient's M prompt rows in place; every other row's gradient
passes through untouched.

With a residual (the op on ``residual + h``, the block's ``x + attn``), the forward adds the two into
a new buffer first; the backward converts the incoming gradient to the branch's dtype before
anything else, so that a compiled backward computes that copy in the kernel that produced the
gradient (as for timm's own residual add), and the kernel then updates the prompt rows of both.
With a residual and the ``norm`` that reads the result (SVPT's blocks: the block's second LayerNorm),
the ``_ae_update_norm_*`` kernels do add, update and LayerNorm in one pass over the rows (after a small
pass over the M prompt rows for their mean); the backward does the LayerNorm's backward over every row
in one pass, then adds the u-path's share to the M prompt rows of both gradients (_layer_norm.py).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _layer_norm as ln
from ._common import autocast_dtype, branch_gradient, define_op, launch, next_pow2, writable

__all__ = ["ae_update", "AeUpdateFunction"]


@triton.jit
def _ae_update_fwd_kernel(H, INDEX, SCALE, MEAN, d, num_prefix, M, K, first_patch, stride_hb, stride_ht,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    base = H + b * stride_hb + cols[None, :]
    mean = _prompt_mean(H, H, H, b, cols, col_ok, num_prefix, M, stride_hb, stride_ht, 0, 0, False, BLOCK_T, BLOCK_D)
    tl.store(MEAN + b * d + cols, mean, mask=col_ok)
    u = tl.load(SCALE).to(tl.float32) * mean
    # The selected rows are patch rows: disjoint from the prompt rows read above.
    for j0 in range(0, K, BLOCK_T):
        j_ok = (j0 + tl.arange(0, BLOCK_T)) < K
        rows = tl.load(INDEX + b * K + j0 + tl.arange(0, BLOCK_T), mask=j_ok, other=0) + first_patch
        ok = j_ok[:, None] & col_ok[None, :]
        ptr = base + rows[:, None] * stride_ht
        h = tl.load(ptr, mask=ok, other=0.0)
        tl.store(ptr, (h.to(tl.float32) + u[None, :]).to(H.dtype.element_ty), mask=ok)


@triton.jit
def _ae_update_bwd_kernel(GRAD, BRANCH, MEAN, INDEX, SCALE, GRAD_SCALE_PART, d, num_prefix, M, K, first_patch,
                          stride_gb, stride_gt, stride_bb, stride_bt, HAS_BRANCH: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    base = GRAD + b * stride_gb + cols[None, :]
    # dL/du = sum of the output gradient over the selected rows
    grad_u = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_T):
        j_ok = (j0 + tl.arange(0, BLOCK_T)) < K
        rows = tl.load(INDEX + b * K + j0 + tl.arange(0, BLOCK_T), mask=j_ok, other=0) + first_patch
        g = tl.load(base + rows[:, None] * stride_gt, mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        grad_u += tl.sum(g.to(tl.float32), axis=0)
    mean = tl.load(MEAN + b * d + cols, mask=col_ok, other=0.0)
    # one partial per program, summed afterwards: deterministic
    tl.store(GRAD_SCALE_PART + b * tl.num_programs(0) + pid_d, tl.sum(grad_u * mean, axis=0))
    coef = tl.load(SCALE).to(tl.float32) / M * grad_u
    for t0 in range(0, M, BLOCK_T):
        t_ok = (t0 + tl.arange(0, BLOCK_T)) < M
        rows = num_prefix + t0 + tl.arange(0, BLOCK_T)
        ok = t_ok[:, None] & col_ok[None, :]
        ptr = base + rows[:, None] * stride_gt
        g = tl.load(ptr, mask=ok, other=0.0).to(tl.float32) + coef[None, :]
        tl.store(ptr, g.to(GRAD.dtype.element_ty), mask=ok)
        if HAS_BRANCH:  # the branch's copy of these rows, from the same float32 values
            branch = BRANCH + b * stride_bb + rows[:, None] * stride_bt + cols[None, :]
            tl.store(branch, g.to(BRANCH.dtype.element_ty), mask=ok)


@triton.jit
def _prompt_mean(H, BR, OUT_DTYPE_REF, b, cols, col_ok, num_prefix, M, stride_hb, stride_ht, stride_bb, stride_bt,
                 HAS_BR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """mean(h_prompt) [BLOCK_D] of sample ``b``: of ``H``, or with ``HAS_BR`` of ``H + BR`` as stored (rounded to
    OUT_DTYPE_REF's dtype)."""
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, M, BLOCK_T):
        t_ok = (t0 + tl.arange(0, BLOCK_T)) < M
        t = num_prefix + t0 + tl.arange(0, BLOCK_T)
        ok = t_ok[:, None] & col_ok[None, :]
        h = tl.load(H + b * stride_hb + t[:, None] * stride_ht + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BR:
            h += tl.load(BR + b * stride_bb + t[:, None] * stride_bt + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            h = h.to(OUT_DTYPE_REF.dtype.element_ty).to(tl.float32)
        total += tl.sum(h, axis=0)
    return total / M


@triton.jit
def _prompt_mean_kernel(RES, BR, OUT_DTYPE_REF, MEAN, d, num_prefix, M, stride_rb, stride_rt, stride_bb, stride_bt,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """mean(h_prompt) [B, d] of ``h = residual + branch``."""
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    mean = _prompt_mean(RES, BR, OUT_DTYPE_REF, b, cols, col_ok, num_prefix, M, stride_rb, stride_rt, stride_bb,
                        stride_bt, True, BLOCK_T, BLOCK_D)
    tl.store(MEAN + b * d + cols, mean, mask=col_ok)


@triton.jit
def _ae_update_norm_fwd_kernel(RES, BR, SELECTED, MEAN, SCALE, OUT, Y, MU, RSTD, NW, NB, n_rows, T, d, eps,
                               stride_rb, stride_rt, stride_bb, stride_bt,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, b, t, row_ok, cols, col_ok, ok = ln.row_block(tl.program_id(0), n_rows, T, d, BLOCK_R, BLOCK_D)
    h = ln.load_sum(RES, BR, b, t, cols, ok, stride_rb, stride_rt, stride_bb, stride_bt)
    h = h.to(OUT.dtype.element_ty).to(tl.float32)
    selected = tl.load(SELECTED + rows, mask=row_ok, other=0) != 0
    mean = tl.load(MEAN + b[:, None] * d + cols[None, :], mask=selected[:, None] & col_ok[None, :], other=0.0)
    u = (tl.load(SCALE).to(tl.float32) * mean).to(OUT.dtype.element_ty).to(tl.float32)  # u in h's dtype, as added
    ln.store_and_normalise(h + u, OUT, Y, MU, RSTD, NW, NB, rows, row_ok, cols, col_ok, ok, d, eps, HAS_W, HAS_B)


def _grid(batch: int, width: int) -> tuple[tuple[int, int], dict]:
    block_d = min(256, next_pow2(width))
    return (triton.cdiv(width, block_d), batch), dict(BLOCK_T=max(1, 2048 // block_d), BLOCK_D=block_d, num_warps=4)


def _ae_update_fake(h, index, scale, num_prefix, num_prompts):
    return h.new_empty((h.shape[0], h.shape[2]), dtype=torch.float32)


@define_op("ae_update", _ae_update_fake, mutates_args=("h",))
def _ae_update_op(h: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, num_prefix: int,
                  num_prompts: int) -> torch.Tensor:
    """Adds u to the selected rows of ``h`` in place; returns mean(h_prompt) [B, d] (fp32)."""
    batch, _, width = h.shape
    mean = torch.empty((batch, width), dtype=torch.float32, device=h.device)
    grid, meta = _grid(batch, width)
    launch(_ae_update_fwd_kernel)[grid](
        h, index, scale, mean, width, num_prefix, num_prompts, index.shape[1], num_prefix + num_prompts,
        h.stride(0), h.stride(1), **meta)
    return mean


def _ae_update_backward_fake(grad, branch, mean, index, scale, num_prefix, num_prompts):
    return torch.empty_like(scale)


@define_op("ae_update_backward", _ae_update_backward_fake, mutates_args=("grad", "branch"))
def _ae_update_backward_op(grad: torch.Tensor, branch: torch.Tensor, mean: torch.Tensor, index: torch.Tensor,
                           scale: torch.Tensor, num_prefix: int, num_prompts: int) -> torch.Tensor:
    """Adds the u-path's gradient to the prompt rows of ``grad`` in place, and of ``branch`` (the
    gradient's copy in the branch's dtype; empty when there is none); returns dL/dscale."""
    batch, _, width = grad.shape
    grid, meta = _grid(batch, width)
    grad_scale_part = torch.empty((batch, grid[0]), dtype=torch.float32, device=grad.device)
    has_branch = branch.numel() > 0
    branch_strides = (branch.stride(0), branch.stride(1)) if has_branch else (0, 0)
    launch(_ae_update_bwd_kernel)[grid](
        grad, branch, mean, index, scale, grad_scale_part, width, num_prefix, num_prompts, index.shape[1],
        num_prefix + num_prompts, grad.stride(0), grad.stride(1), *branch_strides, HAS_BRANCH=has_branch, **meta)
    return grad_scale_part.sum().to(scale.dtype)


class AeUpdateFunction(torch.autograd.Function):
    """Autograd of ae_update over ``svpt::ae_update`` / ``svpt::ae_update_backward``: in place on
    ``h``, or on ``residual + h`` when a residual is given. Saves the top-k indices, the scale and
    mean(h_prompt) [B, d], never the [B, T, d] buffer."""

    @staticmethod
    def forward(ctx, h, index, scale, num_prefix, num_prompts, residual):
        buf = h if residual is None else residual + h
        mean = _ae_update_op(buf, index, scale, num_prefix, num_prompts)
        if residual is None:
            ctx.mark_dirty(h)
        ctx.save_for_backward(mean, index, scale)
        ctx.num_prefix, ctx.num_prompts = num_prefix, num_prompts
        ctx.branch_dtype = None if residual is None else h.dtype
        return buf

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mean, index, scale = ctx.saved_tensors
        branch = branch_gradient(grad, ctx.branch_dtype)
        grad = writable(grad)
        grad_scale = _ae_update_backward_op(grad, grad.new_empty(0) if branch is None else branch, mean, index,
                                            scale, ctx.num_prefix, ctx.num_prompts)
        grad_residual = None if ctx.branch_dtype is None else grad
        return (grad if branch is None else branch, None, grad_scale if ctx.needs_input_grad[2] else None, None, None,
                grad_residual)


def _ae_update_norm_fake(h, index, scale, num_prefix, num_prompts, residual, norm_weight, norm_bias, eps,
                         norm_dtype):
    return *ln.outputs(residual, h, norm_dtype), h.new_empty((h.shape[0], h.shape[2]), dtype=torch.float32)


@define_op("ae_update_norm", _ae_update_norm_fake)
def _ae_update_norm_op(h: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, num_prefix: int, num_prompts: int,
                       residual: torch.Tensor, norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                       eps: float, norm_dtype: torch.dtype
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``residual + h`` with u added to its selected rows, and its LayerNorm; returns those two, the
    LayerNorm's per-row mean and 1/std, and mean(h_prompt) [B, d] (fp32)."""
    batch, length, width = h.shape
    out, y, norm_mean, rstd = ln.outputs(residual, h, norm_dtype)
    mean = torch.empty((batch, width), dtype=torch.float32, device=h.device)
    grid, meta = _grid(batch, width)
    strides = (residual.stride(0), residual.stride(1), h.stride(0), h.stride(1))
    launch(_prompt_mean_kernel)[grid](residual, h, out, mean, width, num_prefix, num_prompts, *strides, **meta)
    selected = torch.zeros((batch, length), dtype=torch.int8, device=h.device)
    selected.scatter_(1, index + (num_prefix + num_prompts), 1)
    grid, meta = ln.grid(batch, length, width)
    launch(_ae_update_norm_fwd_kernel)[grid](
        residual, h, selected, mean, scale, out, y, norm_mean, rstd, ln.optional(norm_weight, out),
        ln.optional(norm_bias, out), batch * length, length, width, eps, *strides,
        HAS_W=norm_weight is not None, HAS_B=norm_bias is not None, **meta)
    return out, y, norm_mean, rstd, mean


def _ae_update_norm_backward_fake(grad_y, grad_out, out, norm_mean, rstd, norm_weight, mean, index, scale, num_prefix,
                                  num_prompts, residual_dtype, branch_dtype):
    return *ln.gradient_buffers(out, residual_dtype, branch_dtype), torch.empty_like(scale)


@define_op("ae_update_norm_backward", _ae_update_norm_backward_fake)
def _ae_update_norm_backward_op(grad_y: torch.Tensor, grad_out: Optional[torch.Tensor], out: torch.Tensor,
                                norm_mean: torch.Tensor, rstd: torch.Tensor, norm_weight: Optional[torch.Tensor],
                                mean: torch.Tensor, index: torch.Tensor, scale: torch.Tensor, num_prefix: int,
                                num_prompts: int, residual_dtype: torch.dtype, branch_dtype: torch.dtype
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the residual and the branch (each in its dtype) and of the scale: the LayerNorm's
    backward over every row, then the u-path's share added to the prompt rows of both."""
    batch, length, width = out.shape
    # the residual's gradient in float32 until the u-path's share is in (a 16-bit residual's is rounded after)
    grad_residual, grad_branch = ln.gradient_buffers(out, torch.float32, branch_dtype)
    grid, meta = ln.grid(batch, length, width)
    launch(ln._residual_norm_bwd_kernel)[grid](
        grad_y, ln.optional(grad_out, out), out, norm_mean, rstd, ln.optional(norm_weight, out), grad_residual,
        grad_branch, batch * length, length, width, HAS_W=norm_weight is not None, HAS_GO=grad_out is not None,
        **meta)
    grid, meta = _grid(batch, width)
    grad_scale_part = torch.empty((batch, grid[0]), dtype=torch.float32, device=out.device)
    launch(_ae_update_bwd_kernel)[grid](
        grad_residual, grad_branch, mean, index, scale, grad_scale_part, width, num_prefix, num_prompts,
        index.shape[1], num_prefix + num_prompts, grad_residual.stride(0), grad_residual.stride(1),
        grad_branch.stride(0), grad_branch.stride(1), HAS_BRANCH=True, **meta)
    return grad_residual.to(residual_dtype), grad_branch, grad_scale_part.sum().to(scale.dtype)


class AeUpdateNormFunction(torch.autograd.Function):
    """Autograd of ae_update with ``norm``: (``residual + h`` updated, its LayerNorm), over
    ``svpt::ae_update_norm`` / ``svpt::ae_update_norm_backward``. Saves the sum (the LayerNorm's input,
    as F.layer_norm does), its per-row statistics, the top-k indices, the scale and mean(h_prompt)."""

    @staticmethod
    def forward(ctx, h, index, scale, num_prefix, num_prompts, residual, norm_weight, norm_bias, eps, norm_dtype):
        out, y, norm_mean, rstd, mean = _ae_update_norm_op(h, index, scale, num_prefix, num_prompts, residual,
                                                           norm_weight, norm_bias, eps, norm_dtype)
        ctx.save_for_backward(out, norm_mean, rstd, norm_weight, mean, index, scale)
        ctx.num_prefix, ctx.num_prompts, ctx.dtypes = num_prefix, num_prompts, (residual.dtype, h.dtype)
        return out, y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_y):
        out, norm_mean, rstd, norm_weight, mean, index, scale = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(out)
        grad_residual, grad_h, grad_scale = _ae_update_norm_backward_op(
            grad_y.contiguous(), None if grad_out is None else grad_out.contiguous(), out, norm_mean, rstd,
            norm_weight, mean, index, scale, ctx.num_prefix, ctx.num_prompts, *ctx.dtypes)
        return (grad_h, None, grad_scale if ctx.needs_input_grad[2] else None, None, None, grad_residual,
                None, None, None, None)


def ae_update(h, saliency, scale, num_prefix, num_prompts, k, residual=None, norm=None):
    """Triton ae_update; same contract as :func:`svpt.ops.ae_update` (in place on ``h`` without a residual)."""
    index = saliency.detach().topk(k, dim=-1).indices.contiguous()
    if norm is None:
        return AeUpdateFunction.apply(h, index, scale.reshape(()), num_prefix, num_prompts, residual)
    norm_dtype = autocast_dtype(h.device) or torch.promote_types(residual.dtype, h.dtype)
    return AeUpdateNormFunction.apply(h, index, scale.reshape(()), num_prefix, num_prompts, residual, *norm, norm_dtype)
