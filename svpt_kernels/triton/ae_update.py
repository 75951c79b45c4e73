"""ae_update: SVPT's attentive enhancement, in place on the k selected rows of the residual ``h``.

``u = scale * mean(h[:, n_p : n_p+M])``; the top-k patch rows by saliency get ``u`` added.
Selection is ``torch.topk`` (indices carry no gradient). The forward reads the M prompt rows and
reads and writes the k selected rows; it keeps ``mean(h_prompt)`` [B, d] and the indices for
backward. The backward reads the gradient at the k selected rows (dL/du) and adds
``scale / M * dL/du`` to the gradient's M prompt rows in place; every other row's gradient
passes through untouched.
"""
import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import define_op, launch, next_pow2, writable

__all__ = ["ae_update", "AeUpdateFunction"]


@triton.jit
def _ae_update_fwd_kernel(H, INDEX, SCALE, MEAN, d, num_prefix, M, K, first_patch, stride_hb, stride_ht,
                          BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    base = H + b * stride_hb + cols[None, :]
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, M, BLOCK_T):
        t_ok = (t0 + tl.arange(0, BLOCK_T)) < M
        rows = num_prefix + t0 + tl.arange(0, BLOCK_T)
        h = tl.load(base + rows[:, None] * stride_ht, mask=t_ok[:, None] & col_ok[None, :], other=0.0)
        total += tl.sum(h.to(tl.float32), axis=0)
    mean = total / M
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
def _ae_update_bwd_kernel(GRAD, MEAN, INDEX, SCALE, GRAD_SCALE_PART, d, num_prefix, M, K, first_patch,
                          stride_gb, stride_gt, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
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
        g = tl.load(ptr, mask=ok, other=0.0)
        tl.store(ptr, (g.to(tl.float32) + coef[None, :]).to(GRAD.dtype.element_ty), mask=ok)


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


def _ae_update_backward_fake(grad, mean, index, scale, num_prefix, num_prompts):
    return torch.empty_like(scale)


@define_op("ae_update_backward", _ae_update_backward_fake, mutates_args=("grad",))
def _ae_update_backward_op(grad: torch.Tensor, mean: torch.Tensor, index: torch.Tensor, scale: torch.Tensor,
                           num_prefix: int, num_prompts: int) -> torch.Tensor:
    """Adds the u-path's gradient to the prompt rows of ``grad`` in place; returns dL/dscale."""
    batch, _, width = grad.shape
    grid, meta = _grid(batch, width)
    grad_scale_part = torch.empty((batch, grid[0]), dtype=torch.float32, device=grad.device)
    launch(_ae_update_bwd_kernel)[grid](
        grad, mean, index, scale, grad_scale_part, width, num_prefix, num_prompts, index.shape[1],
        num_prefix + num_prompts, grad.stride(0), grad.stride(1), **meta)
    return grad_scale_part.sum().to(scale.dtype)


class AeUpdateFunction(torch.autograd.Function):
    """Autograd of the in-place ae_update over ``svpt::ae_update`` / ``svpt::ae_update_backward``.
    Saves the top-k indices, the scale and mean(h_prompt) [B, d], never the [B, T, d] buffer."""

    @staticmethod
    def forward(ctx, h, index, scale, num_prefix, num_prompts):
        mean = _ae_update_op(h, index, scale, num_prefix, num_prompts)
        ctx.mark_dirty(h)
        ctx.save_for_backward(mean, index, scale)
        ctx.num_prefix, ctx.num_prompts = num_prefix, num_prompts
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        mean, index, scale = ctx.saved_tensors
        grad = writable(grad)
        grad_scale = _ae_update_backward_op(grad, mean, index, scale, ctx.num_prefix, ctx.num_prompts)
        return grad, None, grad_scale if ctx.needs_input_grad[2] else None, None, None


def ae_update(h, saliency, scale, num_prefix, num_prompts, k):
    """Triton ae_update; same contract as :func:`svpt.ops.ae_update` (in place on ``h``)."""
    index = saliency.detach().topk(k, dim=-1).indices.contiguous()
    return AeUpdateFunction.apply(h, index, scale.reshape(()), num_prefix, num_prompts)
