"""prompt_attention: FlashAttention-style softmax attention (forward and backward).

Layout [B, T, H, D] with arbitrary outer strides (the q/k/v views of the qkv projection are
read in place). The forward keeps a running max and sum per query row (online softmax) and
stores the output and the row log-sum-exp; the T x T matrix never exists. The backward
recomputes the probabilities block by block: one kernel per key block accumulates dK and dV
over all query blocks, one per query block accumulates dQ, so no reduction needs atomics. k/v
with batch 1 (CVPT's prompts) are broadcast over the batch; their gradients are written per
sample and summed afterwards. The forward and dQ kernels also take an optional leading
key/value segment read from separate tensors (VPT-deep's prompt keys/values, see
prompt_kv_attention.py); here it is empty.

Any T (rows and columns are masked), head dims up to 256 (padded to a power of two with
masked loads; the backend declares the limit), fp32 inputs use full-fp32 products
(``input_precision="ieee"``), and fp16/bf16 probabilities are cast explicitly to the value
dtype before the products that use them. AE's saliency is a separate op
(attention_saliency.py); where PyTorch's SDPA is faster (16-bit on CUDA) the backend hands
this op over to it (svpt_kernels/triton/__init__.py, PREFER).
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from . import _common
from ._common import define_op, last_dim_contiguous, launch, next_pow2

__all__ = ["prompt_attention", "PromptAttentionFunction"]

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, Tk, offs_d, d_ok, qk_scale,
            BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax: fold the Tk keys/values at k_base/v_base into (acc, m_i, l_i)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale  # log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prompt_attention_fwd_kernel(
        Q, K, V, KP, VP, OUT, LSE, qk_scale, H, Tq, Tk, Tp,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_kpb, stride_kpt, stride_kph,
        stride_vpb, stride_vpt, stride_vph, stride_ob, stride_ot, stride_oh,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr):
    # Keys/values: the Tp rows of KP/VP (prompt_kv_attention's prompt segment; Tp = 0 for
    # prompt_attention), then the Tk rows of K/V; softmax order does not matter.
    pid_m = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m < Tq)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, KP + b * stride_kpb + h * stride_kph,
                            VP + b * stride_vpb + h * stride_vph, stride_kpt, stride_vpt, Tp,
                            offs_d, d_ok, qk_scale, BLOCK_N, IEEE)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K + b * stride_kb + h * stride_kh,
                            V + b * stride_vb + h * stride_vh, stride_kt, stride_vt, Tk,
                            offs_d, d_ok, qk_scale, BLOCK_N, IEEE)
    out = acc / l_i[:, None]
    m_ok = offs_m < Tq
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)


@triton.jit
def _prompt_attention_bwd_delta_kernel(
        OUT, GRAD_OUT, DELTA, H, Tq, stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta = rowsum(dO * O), the softmax backward's correction term
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    ok = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(GRAD_OUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, axis=1), mask=offs_m < Tq)


@triton.jit
def _prompt_attention_bwd_dkdv_kernel(
        Q, K, V, GRAD_OUT, LSE, DELTA, DK, DV, sm_scale, qk_scale, H, Tq, Tk,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_gb, stride_gt, stride_gh,
        stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    n_ok = offs_n < Tk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    g_base = GRAD_OUT + b * stride_gb + h * stride_gh
    row_base = pid_bh.to(tl.int64) * Tq
    for start_m in range(0, Tq, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < Tq
        qm_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=qm_ok, other=0.0)
        do = tl.load(g_base + offs_m[:, None] * stride_gt + offs_d[None, :], mask=qm_ok, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # [BLOCK_N, BLOCK_M]
        pt = tl.where(n_ok[:, None] & m_ok[None, :], tl.math.exp2(st - lse[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, IEEE)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_accumulate(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, Tk, offs_d, d_ok,
                   qk_scale, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Add the Tk keys/values at k_base/v_base's share of dQ (unscaled) to dq."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(0, Tk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Tk
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def _prompt_attention_bwd_dq_kernel(
        Q, K, V, KP, VP, GRAD_OUT, LSE, DELTA, DQ, sm_scale, qk_scale, H, Tq, Tk, Tp,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh, stride_kpb, stride_kpt, stride_kph,
        stride_vpb, stride_vpt, stride_vph, stride_gb, stride_gt, stride_gh,
        stride_dqb, stride_dqt, stride_dqh,
        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    m_ok = offs_m < Tq
    qm_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=qm_ok, other=0.0)
    do = tl.load(GRAD_OUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :],
                 mask=qm_ok, other=0.0)
    row_base = pid_bh.to(tl.int64) * Tq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    dq = _dq_accumulate(dq, q, do, lse, delta, KP + b * stride_kpb + h * stride_kph,
                        VP + b * stride_vpb + h * stride_vph, stride_kpt, stride_vpt, Tp,
                        offs_d, d_ok, qk_scale, BLOCK_N, IEEE)
    dq = _dq_accumulate(dq, q, do, lse, delta, K + b * stride_kb + h * stride_kh,
                        V + b * stride_vb + h * stride_vh, stride_kt, stride_vt, Tk,
                        offs_d, d_ok, qk_scale, BLOCK_N, IEEE)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qm_ok)


def _config(d_pad: int, dtype: torch.dtype) -> dict:
    """Block sizes. The interpreter runs programs one by one in numpy: smallest tiles.
    On GPU: 16-bit inputs take FlashAttention's usual 128x64 forward tile; fp32 (ieee
    products, twice the registers per element) takes smaller ones."""
    if _common.INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if d_pad <= 64 else 8, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if d_pad <= 64 else 8, num_stages=3)


def _bwd_configs(d_pad: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """Block sizes of the dK/dV and the dQ kernels. In 16-bit with head dims up to 64, dK/dV
    loops over 128 queries at a time: at VPT-deep's ViT-B/16 shape on an H200 the backward took
    0.484 ms against 0.554 ms with 64 (benchmarks/results/prompt_attention_configs_h200.txt; the
    other kernels' current blocks were the best of that sweep within its noise)."""
    if _common.INTERPRET:
        tiny = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        return tiny, dict(tiny)
    if dtype == torch.float32:
        small = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
        return small, dict(small)
    tile = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if d_pad <= 64 else 8, num_stages=2)
    return (dict(tile, BLOCK_M=128) if d_pad <= 64 else dict(tile)), tile


def _kv_batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def _segment_args(k: torch.Tensor, v: torch.Tensor) -> tuple:
    return (_kv_batch_stride(k), k.stride(1), k.stride(2), _kv_batch_stride(v), v.stride(1), v.stride(2))


def attention_forward(q, k, v, scale, prompt_k=None, prompt_v=None):
    """Launch the forward kernel: ``out`` [B, Tq, H, D] and the row log-sum-exp [B, H, Tq]
    (log2 units) over the keys/values ``prompt_k/v`` (optional, [1 or B, Tp, H, D]) and
    ``k/v``, each read in place. Shared by prompt_attention and prompt_kv_attention."""
    batch, tq, heads, dim = q.shape
    d_pad = max(16, next_pow2(dim))
    out = torch.empty((batch, tq, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, tq), dtype=torch.float32, device=q.device)
    # No prompt segment: a zero-length one (the kernel's loop over it does not run).
    kp, vp, tp = (k, v, 0) if prompt_k is None else (prompt_k, prompt_v, prompt_k.shape[1])
    cfg = _config(d_pad, q.dtype)
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    launch(_prompt_attention_fwd_kernel)[(triton.cdiv(tq, block_m), batch * heads)](
        q, k, v, kp, vp, out, lse, scale * _LOG2E, heads, tq, k.shape[1], tp,
        q.stride(0), q.stride(1), q.stride(2), *_segment_args(k, v), *_segment_args(kp, vp),
        out.stride(0), out.stride(1), out.stride(2),
        D=dim, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32, **cfg)
    return out, lse


def _fwd_fake(q, k, v, scale):
    batch, tq, heads, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty((batch, heads, tq), dtype=torch.float32))


@define_op("prompt_attention", _fwd_fake)
def _prompt_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, scale)


def _key_value_grads(q, k, v, grad_out, lse, delta, scale, cfg):
    """dK, dV of one key/value segment: one program per key block and (sample, head), looping
    over all query blocks. Batch-1 (broadcast) k/v: per-sample fp32 gradients, summed over the
    batch afterwards (deterministic, no atomics)."""
    batch, tq, heads, dim = q.shape
    tk = k.shape[1]
    broadcast = k.shape[0] == 1 and batch > 1
    grad_dtype = torch.float32 if broadcast else k.dtype
    dk = torch.empty((batch, tk, heads, dim), dtype=grad_dtype, device=q.device)
    dv = torch.empty((batch, tk, heads, dim), dtype=grad_dtype, device=q.device)
    launch(_prompt_attention_bwd_dkdv_kernel)[(triton.cdiv(tk, cfg["BLOCK_N"]), batch * heads)](
        q, k, v, grad_out, lse, delta, dk, dv, scale, scale * _LOG2E, heads, tq, tk,
        q.stride(0), q.stride(1), q.stride(2), *_segment_args(k, v),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        D=dim, D_PAD=max(16, next_pow2(dim)), IEEE=q.dtype == torch.float32, **cfg)
    if broadcast:
        return dk.sum(dim=0, keepdim=True).to(k.dtype), dv.sum(dim=0, keepdim=True).to(v.dtype)
    return dk, dv


def attention_backward(grad_out, q, k, v, out, lse, scale, prompt_k=None, prompt_v=None, token_grads=True):
    """Gradients of :func:`attention_forward`: ``(dq, dk, dv, dprompt_k, dprompt_v)``, the last
    two ``None`` without a prompt segment, the first three ``None`` without ``token_grads``
    (VPT-deep's first block: only its prompts need a gradient)."""
    batch, tq, heads, dim = q.shape
    d_pad = max(16, next_pow2(dim))
    grad_out = last_dim_contiguous(grad_out)
    delta = torch.empty((batch, heads, tq), dtype=torch.float32, device=q.device)
    block_delta = 16 if _common.INTERPRET else 64
    launch(_prompt_attention_bwd_delta_kernel)[(triton.cdiv(tq, block_delta), batch * heads)](
        out, grad_out, delta, heads, tq, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        D=dim, D_PAD=d_pad, BLOCK_M=block_delta, num_warps=1 if _common.INTERPRET else 4)
    cfg, dq_cfg = _bwd_configs(d_pad, q.dtype)
    dkp = dvp = None
    kp, vp, tp = (k, v, 0) if prompt_k is None else (prompt_k, prompt_v, prompt_k.shape[1])
    if prompt_k is not None:
        dkp, dvp = _key_value_grads(q, prompt_k, prompt_v, grad_out, lse, delta, scale, cfg)
    if not token_grads:
        return None, None, None, dkp, dvp
    dk, dv = _key_value_grads(q, k, v, grad_out, lse, delta, scale, cfg)
    dq = torch.empty((batch, tq, heads, dim), dtype=q.dtype, device=q.device)
    block_m = dq_cfg.pop("BLOCK_M")
    launch(_prompt_attention_bwd_dq_kernel)[(triton.cdiv(tq, block_m), batch * heads)](
        q, k, v, kp, vp, grad_out, lse, delta, dq, scale, scale * _LOG2E, heads, tq, k.shape[1], tp,
        q.stride(0), q.stride(1), q.stride(2), *_segment_args(k, v), *_segment_args(kp, vp),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        D=dim, D_PAD=d_pad, BLOCK_M=block_m, IEEE=q.dtype == torch.float32, **dq_cfg)
    return dq, dk, dv, dkp, dvp


def _bwd_fake(grad_out, q, k, v, out, lse, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


@define_op("prompt_attention_backward", _bwd_fake)
def _prompt_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(grad_out, q, k, v, out, lse, scale)[:3]


class PromptAttentionFunction(torch.autograd.Function):
    """Autograd of prompt_attention over ``svpt::prompt_attention`` and
    ``svpt::prompt_attention_backward``. Saves q, k, v, the output and the row log-sum-exp
    (O(T) per row), never the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _prompt_attention_op(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _prompt_attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale)
        need = ctx.needs_input_grad
        return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def prompt_attention(q, k, v, scale):
    """Triton prompt_attention; same contract as :func:`svpt.ops.prompt_attention`."""
    dtype = common_dtype(q, k, v)
    q, k, v = (last_dim_contiguous(t.to(dtype)) for t in (q, k, v))
    return PromptAttentionFunction.apply(q, k, v, float(scale))[0]
