"""attention_saliency: AE's saliency from the source query rows alone, no gradient.

For each sample and head, the source rows' softmax over all Tk keys (log-sum-exp in a first pass
over the keys, probabilities in a second), summed over the rows, for the key columns from
``col_start`` on; the per-head partials [B, H, N] are averaged over heads afterwards (a
deterministic sum, no atomics). One program per (sample, head) computes each row's log-sum-exp
once; a program per column block would recompute it for every block, which at 512 px (1075
keys, 16 column blocks) cost 1.8 ms of a 30 ms step on an H200
(benchmarks/results/token_floor_512_h200_run1.txt). Only the source rows are read as queries (1 class token or the M
prompt rows), so the cost is a sliver of the attention's; the attention output itself comes
from prompt_attention (or SDPA).
"""
import torch
import triton
import triton.language as tl

from . import _common
from ._common import define_op, last_dim_contiguous, launch, next_pow2
from .prompt_attention import _LOG2E, _dot

__all__ = ["attention_saliency"]



@triton.jit
def _attention_saliency_kernel(Q, K, PART, qk_scale, H, Tk, row_start, row_count, col_start, inv_count,
                               stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                               D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    pid_bh = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b * stride_kb + h * stride_kh
    n_cols = Tk - col_start
    part = PART + pid_bh.to(tl.int64) * n_cols
    for r0 in range(0, row_count, BLOCK_R):
        r_ok = (r0 + tl.arange(0, BLOCK_R)) < row_count
        rows = row_start + r0 + tl.arange(0, BLOCK_R)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start_n in range(0, Tk, BLOCK_N):  # pass 1: each row's log-sum-exp over all keys
            offs_n = start_n + offs_n0
            n_ok = offs_n < Tk
            kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.where(n_ok[None, :], _dot(q, kt, IEEE) * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.math.log2(l_i)
        for start_n in range(col_start, Tk, BLOCK_N):  # pass 2: probabilities of the saliency columns
            offs_n = start_n + offs_n0
            n_ok = offs_n < Tk
            kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            p = tl.math.exp2(_dot(q, kt, IEEE) * qk_scale - lse[:, None])
            total = tl.sum(tl.where(r_ok[:, None] & n_ok[None, :], p, 0.0), axis=0) * inv_count
            ptr = part + offs_n - col_start
            if r0 > 0:
                total += tl.load(ptr, mask=n_ok, other=0.0)
            tl.store(ptr, total, mask=n_ok)


def _saliency_fake(q, k, scale, row_start, row_count, col_start):
    return q.new_empty((q.shape[0], k.shape[1] - col_start), dtype=torch.float32)


@define_op("attention_saliency", _saliency_fake)
def _attention_saliency_op(q: torch.Tensor, k: torch.Tensor, scale: float, row_start: int, row_count: int,
                           col_start: int) -> torch.Tensor:
    batch, _, heads, dim = q.shape
    tk = k.shape[1]
    part = torch.empty((batch, heads, tk - col_start), dtype=torch.float32, device=q.device)
    block_n = 16 if _common.INTERPRET else 64
    launch(_attention_saliency_kernel)[(batch * heads,)](
        q, k, part, scale * _LOG2E, heads, tk, row_start, row_count, col_start, 1.0 / (heads * row_count),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0) if k.shape[0] > 1 else 0, k.stride(1), k.stride(2),
        D=dim, D_PAD=max(16, next_pow2(dim)), BLOCK_R=16, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=1 if _common.INTERPRET else 4)
    return part.sum(dim=1)


def attention_saliency(q, k, scale, saliency_rows, saliency_cols):
    """Triton attention_saliency; same contract as :func:`svpt.ops.attention_saliency`."""
    dtype = torch.promote_types(q.dtype, k.dtype)
    q, k = (last_dim_contiguous(t.detach().to(dtype)) for t in (q, k))
    start, count = saliency_rows
    return _attention_saliency_op(q, k, float(scale), int(start), int(count), int(saliency_cols))
