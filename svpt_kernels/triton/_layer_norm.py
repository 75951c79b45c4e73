"""What da_mix's and ae_update's ``norm=`` variants share: a residual add and the LayerNorm that follows it,
row by row, around the op's own row update (the kernels live in da_mix.py and ae_update.py).

Fused, the add, the row update and the LayerNorm read the residual and the branch once and write the sum
and its normalised copy once; the backward reads the two incoming gradients once and writes the residual's
and the branch's (each in its own dtype) once. That is what torch.compile makes of timm's ``x + branch``
followed by a LayerNorm, which an in-place row update in between would split into more passes over
[B, T, d]. The LayerNorm is the frozen backbone's: its weight and bias get no gradient.
"""
import torch
import triton
import triton.language as tl

from ._common import next_pow2


@triton.jit
def row_block(pid, n_rows, T, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows of the flattened [B * T, d] buffers: flat row, sample, token, masks."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < d
    return rows, (rows // T).to(tl.int64), rows % T, row_ok, cols, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def load_sum(RES, BR, b, t, cols, ok, stride_rb, stride_rt, stride_bb, stride_bt):
    """``residual + branch`` on these rows, in float32 (0 outside ``ok``)."""
    res = tl.load(RES + b[:, None] * stride_rb + t[:, None] * stride_rt + cols[None, :], mask=ok, other=0.0)
    br = tl.load(BR + b[:, None] * stride_bb + t[:, None] * stride_bt + cols[None, :], mask=ok, other=0.0)
    return res.to(tl.float32) + br.to(tl.float32)


@triton.jit
def store_and_normalise(h, OUT, Y, MU, RSTD, NW, NB, rows, row_ok, cols, col_ok, ok, d, eps,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Writes the rows ``h`` (float32, 0 outside ``ok``) to OUT, their LayerNorm to Y and its mean and
    1/std to MU, RSTD; the LayerNorm is taken of the rows as stored (rounded to OUT's dtype)."""
    h = h.to(OUT.dtype.element_ty)
    tl.store(OUT + rows[:, None] * d + cols[None, :], h, mask=ok)
    h = h.to(tl.float32)
    mean = tl.sum(h, axis=1) / d
    centred = tl.where(col_ok[None, :], h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / d + eps)
    y = centred * rstd[:, None]
    if HAS_W:
        y = y * tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(NB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * d + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MU + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def sum_gradient(GY, GO, OUT, MU, RSTD, NW, rows, row_ok, cols, col_ok, ok, d,
                 HAS_W: tl.constexpr, HAS_GO: tl.constexpr):
    """dL/d(sum) on these rows (float32): the LayerNorm's backward of dL/dY plus dL/dOUT."""
    offset = rows[:, None] * d + cols[None, :]
    mean = tl.load(MU + rows, mask=row_ok, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    h = tl.load(OUT + offset, mask=ok, other=0.0).to(tl.float32)
    xhat = tl.where(col_ok[None, :], (h - mean[:, None]) * rstd[:, None], 0.0)
    wdy = tl.load(GY + offset, mask=ok, other=0.0).to(tl.float32)
    if HAS_W:
        wdy = wdy * tl.load(NW + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    c1 = tl.sum(xhat * wdy, axis=1) / d
    c2 = tl.sum(wdy, axis=1) / d
    grad = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_GO:
        grad += tl.load(GO + offset, mask=ok, other=0.0).to(tl.float32)
    return grad


@triton.jit
def store_gradients(grad, GRAD_RES, GRAD_BR, rows, cols, ok, d):
    """The sum's gradient is the residual's and the branch's, each written once in its own dtype."""
    offset = rows[:, None] * d + cols[None, :]
    tl.store(GRAD_RES + offset, grad.to(GRAD_RES.dtype.element_ty), mask=ok)
    tl.store(GRAD_BR + offset, grad.to(GRAD_BR.dtype.element_ty), mask=ok)


@triton.jit
def _residual_norm_bwd_kernel(GY, GO, OUT, MU, RSTD, NW, GRAD_RES, GRAD_BR, n_rows, T, d,
                              HAS_W: tl.constexpr, HAS_GO: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, _b, _t, row_ok, cols, col_ok, ok = row_block(tl.program_id(0), n_rows, T, d, BLOCK_R, BLOCK_D)
    grad = sum_gradient(GY, GO, OUT, MU, RSTD, NW, rows, row_ok, cols, col_ok, ok, d, HAS_W, HAS_GO)
    store_gradients(grad, GRAD_RES, GRAD_BR, rows, cols, ok, d)


def grid(batch: int, length: int, width: int) -> tuple[tuple[int], dict]:
    """Whole rows per program, about 4k elements each (16 per thread and tensor with 8 warps: the backward
    holds four such tensors)."""
    block_d = next_pow2(width)
    block_r = max(1, min(16, 4096 // block_d))
    meta = dict(BLOCK_R=block_r, BLOCK_D=block_d, num_warps=8 if block_r * block_d >= 4096 else 4)
    return (triton.cdiv(batch * length, block_r),), meta


def outputs(residual: torch.Tensor, branch: torch.Tensor, norm_dtype: torch.dtype):
    """The sum (in the promoted dtype), its LayerNorm (``norm_dtype``), and the per-row mean and 1/std."""
    dtype = torch.promote_types(residual.dtype, branch.dtype)
    out = torch.empty(residual.shape, dtype=dtype, device=residual.device)
    mean, rstd = (torch.empty(residual.shape[:2], dtype=torch.float32, device=residual.device) for _ in range(2))
    return out, torch.empty(residual.shape, dtype=norm_dtype, device=residual.device), mean, rstd


def gradient_buffers(out: torch.Tensor, residual_dtype: torch.dtype, branch_dtype: torch.dtype):
    return (torch.empty(out.shape, dtype=residual_dtype, device=out.device),
            torch.empty(out.shape, dtype=branch_dtype, device=out.device))


def optional(t: "torch.Tensor | None", like: torch.Tensor) -> torch.Tensor:
    """A kernel argument for an optional tensor (an empty one, never read, when absent)."""
    return like.new_empty(0) if t is None else t
