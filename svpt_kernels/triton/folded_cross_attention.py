"""folded_cross_attention: CVPT's cross-attention with the frozen projections folded in.

Per token row x (width d) and head h: logits ``x Wl[h]^T + bl[h]`` over the M prompts, a softmax
per head, then ``sum_h p_h Wv[h]`` (+ the output bias, + a residual). Wl [H*M, d] and Wv [H*M, d]
are batch-independent (computed once per step by the method), so one program per block of rows
does everything in registers: a [rows x d] x [d x H*M] product (K-loop over d), the per-head
softmax over column groups of M (H masked reductions), and a [rows x H*M] x [H*M x d] product
written out in column chunks. Nothing of size rows x d besides the input and output is touched.

The backward (one kernel per row block) recomputes p, forms dp = g Wv^T, the softmax backward
ds = p (dp - sum_head p dp), and dx = ds Wl (+ g when the residual is x itself); it writes p and
ds ([rows, H*M], small), and the weight gradients Wv: p^T g, Wl: ds^T x, bl: sum ds are then
single deterministic GEMMs/reductions over all rows (no atomics).

Under autocast the products run in the autocast dtype (as F.linear would), with fp32 inputs
(the residual stream) cast tile by tile inside the kernels; fp32 runs full-fp32 ("ieee") products.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _common
from ._common import define_op, launch, next_pow2
from .prompt_attention import _dot

__all__ = ["folded_cross_attention", "FoldedCrossAttentionFunction"]

# The kernels keep a row block's [rows, H*M] logits in registers and take each head's softmax
# by H masked passes over them (work ~ H * H*M per row): fast up to 128 padded columns (ViT-B/16,
# M=10: 1.050x the floor's step), slow beyond (M=20: 1.289x, where the same fold as two cuBLAS
# products and a softmax takes 1.081x; benchmarks/results/cvpt_fold_variants_h200.txt). Wider
# folds therefore run as that composition.
FUSED_MAX_COLUMNS = 128


@triton.jit
def _probabilities(X, WL, BL, XC, rows, row_ok, cols, col_ok, head, d, H, stride_xr, stride_xcr,
                   HAS_BL: tl.constexpr, WRITE_XC: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, HM_PAD: tl.constexpr, IEEE: tl.constexpr):
    """Per-head softmax probabilities (fp32, [BLOCK_R, HM_PAD], 0 in padding columns) of the
    rows' logits x WL^T + BL; with WRITE_XC, x cast to the compute dtype is stored to XC."""
    s = tl.zeros([BLOCK_R, HM_PAD], dtype=tl.float32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, d, BLOCK_K):
        offs_k = k0 + offs_k0
        k_ok = offs_k < d
        x = tl.load(X + rows[:, None] * stride_xr + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(WL.dtype.element_ty)
        if WRITE_XC:
            tl.store(XC + rows[:, None] * stride_xcr + offs_k[None, :], x, mask=row_ok[:, None] & k_ok[None, :])
        w = tl.load(WL + cols[None, :] * d + offs_k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        s += _dot(x, w, IEEE)
    if HAS_BL:
        s += tl.load(BL + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.where(col_ok[None, :], s, float("-inf"))
    # Heads are consecutive groups of M columns: per-head max and sum by H masked reductions.
    mx = tl.zeros([BLOCK_R, HM_PAD], dtype=tl.float32)
    for h in range(0, H):
        in_h = (head == h)[None, :]
        mx = tl.where(in_h, tl.max(tl.where(in_h, s, float("-inf")), axis=1)[:, None], mx)
    e = tl.where(col_ok[None, :], tl.exp(s - mx), 0.0)
    den = tl.full([BLOCK_R, HM_PAD], 1.0, dtype=tl.float32)
    for h in range(0, H):
        in_h = (head == h)[None, :]
        den = tl.where(in_h, tl.sum(tl.where(in_h, e, 0.0), axis=1)[:, None], den)
    return e / den


@triton.jit
def _folded_ca_fwd_kernel(
        X, WL, BL, WV, BIAS, RES, OUT, R, d, H, M, stride_xr, stride_rr, stride_or,
        HAS_BL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HM_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = tl.arange(0, HM_PAD)
    col_ok = cols < H * M
    head = cols // M
    p = _probabilities(X, WL, BL, X, rows, row_ok, cols, col_ok, head, d, H, stride_xr, stride_xr,
                       HAS_BL, False, BLOCK_R, BLOCK_K, HM_PAD, IEEE).to(WV.dtype.element_ty)
    for n0 in range(0, d, BLOCK_D):
        offs_n = n0 + tl.arange(0, BLOCK_D)
        n_ok = offs_n < d
        wv = tl.load(WV + cols[:, None] * d + offs_n[None, :], mask=col_ok[:, None] & n_ok[None, :], other=0.0)
        o = _dot(p, wv, IEEE)
        if HAS_BIAS:
            o += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tile_ok = row_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            o += tl.load(RES + rows[:, None] * stride_rr + offs_n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * stride_or + offs_n[None, :], o.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _folded_ca_bwd_kernel(
        X, WL, BL, WV, GRAD, DX, P_OUT, DS_OUT, XC, GC, R, d, H, M,
        stride_xr, stride_gr, stride_dxr, stride_xcr, stride_gcr,
        HAS_BL: tl.constexpr, ADD_GRAD: tl.constexpr, WRITE_XC: tl.constexpr, WRITE_GC: tl.constexpr,
        HM_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = tl.arange(0, HM_PAD)
    col_ok = cols < H * M
    head = cols // M
    p = _probabilities(X, WL, BL, XC, rows, row_ok, cols, col_ok, head, d, H, stride_xr, stride_xcr,
                       HAS_BL, WRITE_XC, BLOCK_R, BLOCK_K, HM_PAD, IEEE)
    dp = tl.zeros([BLOCK_R, HM_PAD], dtype=tl.float32)
    for n0 in range(0, d, BLOCK_D):
        offs_n = n0 + tl.arange(0, BLOCK_D)
        n_ok = offs_n < d
        tile_ok = row_ok[:, None] & n_ok[None, :]
        g = tl.load(GRAD + rows[:, None] * stride_gr + offs_n[None, :], mask=tile_ok,
                    other=0.0).to(WV.dtype.element_ty)
        if WRITE_GC:
            tl.store(GC + rows[:, None] * stride_gcr + offs_n[None, :], g, mask=tile_ok)
        wvt = tl.load(WV + cols[None, :] * d + offs_n[:, None], mask=col_ok[None, :] & n_ok[:, None], other=0.0)
        dp += _dot(g, wvt, IEEE)
    # softmax backward within each head: ds = p (dp - sum over the head's columns of p dp)
    pdp = p * dp
    t = tl.zeros([BLOCK_R, HM_PAD], dtype=tl.float32)
    for h in range(0, H):
        in_h = (head == h)[None, :]
        t = tl.where(in_h, tl.sum(tl.where(in_h, pdp, 0.0), axis=1)[:, None], t)
    ds = (p * (dp - t)).to(WL.dtype.element_ty)
    hm = H * M
    pd_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(P_OUT + rows[:, None] * hm + cols[None, :], p.to(P_OUT.dtype.element_ty), mask=pd_ok)
    tl.store(DS_OUT + rows[:, None] * hm + cols[None, :], ds, mask=pd_ok)
    for n0 in range(0, d, BLOCK_D):
        offs_n = n0 + tl.arange(0, BLOCK_D)
        n_ok = offs_n < d
        tile_ok = row_ok[:, None] & n_ok[None, :]
        wl = tl.load(WL + cols[:, None] * d + offs_n[None, :], mask=col_ok[:, None] & n_ok[None, :], other=0.0)
        dx = _dot(ds, wl, IEEE)
        if ADD_GRAD:  # the residual was x itself: its gradient joins here, not in a separate add
            dx += tl.load(GRAD + rows[:, None] * stride_gr + offs_n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dxr + offs_n[None, :], dx.to(DX.dtype.element_ty), mask=tile_ok)


def _config(dtype: torch.dtype, backward: bool) -> dict:
    """Block sizes for up to FUSED_MAX_COLUMNS logit columns: in fp16/bf16 the best of a sweep on
    an H200 (benchmarks/results/fold_kernel_configs_h200.txt: fwd 0.18 ms, bwd 0.44 ms at
    ViT-B/16 shapes, against 0.24 / 0.61 ms for the 8-warp defaults)."""
    if _common.INTERPRET:
        return dict(BLOCK_R=16, BLOCK_K=32, BLOCK_D=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_R=32, BLOCK_K=32, BLOCK_D=32, num_warps=8, num_stages=2)
    return (dict(BLOCK_R=64, BLOCK_K=32, BLOCK_D=32, num_warps=4, num_stages=3) if backward else
            dict(BLOCK_R=64, BLOCK_K=128, BLOCK_D=128, num_warps=8, num_stages=3))


def _out_dtype(x, w_logits, residual, add_x):
    source = x if add_x else residual
    return w_logits.dtype if source is None else torch.promote_types(source.dtype, w_logits.dtype)


def _launch_args(x, w_logits, backward=False):
    heads, num_prompts, width = w_logits.shape
    hm_pad = max(16, next_pow2(heads * num_prompts))
    cfg = _config(w_logits.dtype, backward)
    grid = (triton.cdiv(x.shape[0], cfg["BLOCK_R"]),)
    return grid, (x.shape[0], width, heads, num_prompts), dict(HM_PAD=hm_pad, IEEE=w_logits.dtype == torch.float32, **cfg)


def _fwd_fake(x, w_logits, b_logits, w_values, bias, residual, add_x):
    return x.new_empty(x.shape, dtype=_out_dtype(x, w_logits, residual, add_x))


@define_op("folded_cross_attention", _fwd_fake)
def _folded_ca_op(x: torch.Tensor, w_logits: torch.Tensor, b_logits: Optional[torch.Tensor],
                  w_values: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  add_x: bool) -> torch.Tensor:
    # x, residual: [R, d] (unit last stride); w_logits, w_values: [H, M, d] contiguous, in the
    # compute dtype; b_logits [H, M], bias [d].
    out = torch.empty(x.shape, dtype=_out_dtype(x, w_logits, residual, add_x), device=x.device)
    res = x if add_x else residual
    grid, sizes, meta = _launch_args(x, w_logits)
    launch(_folded_ca_fwd_kernel)[grid](
        x, w_logits, w_logits if b_logits is None else b_logits, w_values, out if bias is None else bias,
        out if res is None else res, out, *sizes, x.stride(0), 0 if res is None else res.stride(0), out.stride(0),
        HAS_BL=b_logits is not None, HAS_BIAS=bias is not None, HAS_RES=res is not None, **meta)
    return out


def _bwd_fake(grad, x, w_logits, b_logits, w_values, bias_grad, add_x):
    return (torch.empty_like(x), torch.empty_like(w_logits),
            w_logits.new_empty(w_logits.shape[:2] if b_logits is not None else (0,), dtype=torch.float32),
            torch.empty_like(w_values), grad.new_empty((x.shape[1],) if bias_grad else (0,), dtype=torch.float32))


@define_op("folded_cross_attention_backward", _bwd_fake)
def _folded_ca_backward_op(grad: torch.Tensor, x: torch.Tensor, w_logits: torch.Tensor,
                           b_logits: Optional[torch.Tensor], w_values: torch.Tensor, bias_grad: bool,
                           add_x: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, num_prompts, width = w_logits.shape
    rows = x.shape[0]
    dtype = w_logits.dtype
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    dx = torch.empty_like(x)
    probs = torch.empty((rows, heads * num_prompts), dtype=dtype, device=x.device)
    dlogits = torch.empty((rows, heads * num_prompts), dtype=dtype, device=x.device)
    # The weight-gradient GEMMs need x and grad in the compute dtype: the kernel writes those
    # casts while it reads them anyway (autocast: the fp32 residual stream and its gradient).
    write_xc, write_gc = x.dtype != dtype, grad.dtype != dtype
    xc = torch.empty((rows, width), dtype=dtype, device=x.device) if write_xc else x
    gc = torch.empty((rows, width), dtype=dtype, device=x.device) if write_gc else grad
    grid, sizes, meta = _launch_args(x, w_logits, backward=True)
    launch(_folded_ca_bwd_kernel)[grid](
        x, w_logits, w_logits if b_logits is None else b_logits, w_values, grad, dx, probs, dlogits,
        xc, gc, *sizes, x.stride(0), grad.stride(0), dx.stride(0), xc.stride(0), gc.stride(0),
        HAS_BL=b_logits is not None, ADD_GRAD=add_x, WRITE_XC=write_xc, WRITE_GC=write_gc, **meta)
    grad_w_logits = (dlogits.t() @ xc).reshape(w_logits.shape)
    grad_w_values = (probs.t() @ gc).reshape(w_values.shape)
    grad_b_logits = (dlogits.sum(0, dtype=torch.float32).reshape(heads, num_prompts) if b_logits is not None
                     else dlogits.new_empty((0,), dtype=torch.float32))
    grad_bias = grad.sum(0, dtype=torch.float32) if bias_grad else grad.new_empty((0,), dtype=torch.float32)
    return dx, grad_w_logits, grad_b_logits, grad_w_values, grad_bias


class FoldedCrossAttentionFunction(torch.autograd.Function):
    """Autograd over ``svpt::folded_cross_attention`` / ``svpt::folded_cross_attention_backward``;
    saves only the inputs (the backward recomputes the probabilities)."""

    @staticmethod
    def forward(ctx, x, w_logits, b_logits, w_values, bias, residual, add_x):
        ctx.save_for_backward(x, w_logits, b_logits, w_values)
        ctx.has_bias, ctx.add_x = bias is not None, add_x
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (b_logits, bias, residual))
        return _folded_ca_op(x, w_logits, b_logits, w_values, bias, residual, add_x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, w_logits, b_logits, w_values = ctx.saved_tensors
        need = ctx.needs_input_grad
        # In CVPT the output bias is a frozen projection's: its gradient (a sum over every row) only when asked.
        dx, dwl, dbl, dwv, dbias = _folded_ca_backward_op(grad, x, w_logits, b_logits, w_values,
                                                          ctx.has_bias and need[4], ctx.add_x)
        bl_dtype, bias_dtype, res_dtype = ctx.dtypes
        return (dx if need[0] else None, dwl if need[1] else None,
                dbl.to(bl_dtype) if need[2] else None, dwv if need[3] else None,
                dbias.to(bias_dtype) if need[4] else None, grad.to(res_dtype) if need[5] else None, None)


def _compute_dtype(*tensors):
    """The dtype of the products: autocast's when it is on (as F.linear would run them), else
    the promotion of the inputs."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    autocast = _common.autocast_dtype(tensors[0].device)
    return autocast if autocast is not None and dtype in _common.KERNEL_DTYPES else dtype


def folded_cross_attention(x, w_logits, b_logits, w_values, bias=None, residual=None):
    """Triton folded_cross_attention; same contract as :func:`svpt.ops.folded_cross_attention`."""
    dtype = _compute_dtype(x, w_logits, w_values)
    shape, width = x.shape, x.shape[-1]
    add_x = residual is x  # the kernel adds x itself and folds its gradient into dx
    flat = x.reshape(-1, width)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    res = None if residual is None or add_x else residual.reshape(-1, width)
    if res is not None and res.stride(-1) != 1:
        res = res.contiguous()
    out = FoldedCrossAttentionFunction.apply(
        flat, w_logits.to(dtype).contiguous(), None if b_logits is None else b_logits.contiguous(),
        w_values.to(dtype).contiguous(), None if bias is None else bias.contiguous(), res, add_x)
    return out.reshape(shape)
