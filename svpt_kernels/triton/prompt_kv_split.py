"""prompt_kv_attention split in two (a provider, not the Triton backend's own kernel): ATen's fused
attention over the token keys (cuDNN's or FlashAttention's on CUDA, svpt_kernels.aten_attention)
and two Triton kernels for the prompt segment, merged by log-sum-exp.

VPT-deep's queries attend to [prompt keys; token keys]. The token part is plain self-attention,
which ATen's kernels run faster than a Triton kernel; the prompt part is M keys shared by the
batch. Forward: the merge kernel reads each query row block, its token-only output and
log-sum-exp, scores the M prompt keys, and writes the output and log-sum-exp of the whole softmax.
Backward: ATen's backward, given that merged output and log-sum-exp, computes exactly the token
keys' share of the gradients (it recomputes the probabilities as exp(s - lse) and the correction
term from dO and the output); the prompt kernel adds the prompt keys' share to dQ in place and
accumulates the prompt keys' and values' gradients, one program per (sample, head) looping over
the queries (per-sample fp32 sums, added over the batch afterwards: no atomics). No
concatenation exists, and nothing is kept for backward beyond the inputs, output and log-sum-exp.

Measured slower than the Triton backend's own kernels at VPT-deep's fast-path shape (ViT-B/16,
batch 128, M = 50, bf16, one H100): forward + backward 1.34 ms a call with cuDNN (1.23 with
FlashAttention) against 1.19 (benchmarks/results/prompt_kv_split_configs_h100.txt), and the compiled
training step 33.18 against 31.26 ms (token_floor_vpt_deep_split_h100.txt). So no backend prefers it;
token_floor.py's ``vpt-deep-split`` row hands it the op for the comparison.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from svpt_kernels import aten_attention

from . import _common
from ._common import define_op, launch, next_pow2
from .prompt_attention import _LOG2E, _dot, _kv_batch_stride, common_dtype

__all__ = ["SUPPORTS", "prompt_kv_attention"]

# Only where a backend's PREFER names it (svpt.backends): on CUDA in 16-bit (ATen's fused kernels),
# on CPU through Triton's interpreter and ATen's CPU flash kernel (tests).
SUPPORTS = {"prompt_kv_attention": {"devices": ("cpu", "cuda"), "dtypes": ()}}


@triton.jit
def _prompt_scores(q, pk_base, stride_pkt, offs_p, p_ok, offs_d, d_ok, qk_scale, IEEE: tl.constexpr):
    """q's scores against the prompt keys, log2 units, -inf past the M keys: [BLOCK_M, M_PAD]."""
    pkt = tl.load(pk_base + offs_p[None, :] * stride_pkt + offs_d[:, None], mask=p_ok[None, :] & d_ok[:, None],
                  other=0.0)
    s = _dot(q, pkt, IEEE) * qk_scale
    return tl.where(p_ok[None, :], s, float("-inf"))


@triton.jit
def _split_merge_kernel(
        Q, PK, PV, OUT_T, LSE_T, OUT, LSE, qk_scale, H, T, M,
        stride_qb, stride_qt, stride_qh, stride_pkb, stride_pkt, stride_pkh, stride_pvb, stride_pvt, stride_pvh,
        stride_ob, stride_ot, stride_oh,
        D: tl.constexpr, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qk_scale = tl.cast(qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_p = tl.arange(0, M_PAD)
    m_ok, d_ok, p_ok = offs_m < T, offs_d < D, offs_p < M
    rows = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows,
                other=0.0)
    s = _prompt_scores(q, PK + b * stride_pkb + h * stride_pkh, stride_pkt, offs_p, p_ok, offs_d, d_ok, qk_scale,
                       IEEE)
    lse_rows = pid_bh.to(tl.int64) * T + offs_m
    lse_t = tl.load(LSE_T + lse_rows, mask=m_ok, other=0.0) * 1.4426950408889634  # to log2 units
    top = tl.maximum(lse_t, tl.max(s, axis=1))
    lse = top + tl.math.log2(tl.math.exp2(lse_t - top) + tl.sum(tl.math.exp2(s - top[:, None]), axis=1))
    p = tl.math.exp2(s - lse[:, None])
    pv = tl.load(PV + b * stride_pvb + h * stride_pvh + offs_p[:, None] * stride_pvt + offs_d[None, :],
                 mask=p_ok[:, None] & d_ok[None, :], other=0.0)
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    out_t = tl.load(OUT_T + o_offs, mask=rows, other=0.0).to(tl.float32)
    out = out_t * tl.math.exp2(lse_t - lse)[:, None] + _dot(p.to(pv.dtype), pv, IEEE)
    tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=rows)
    tl.store(LSE + lse_rows, lse * 0.6931471805599453, mask=m_ok)  # back to natural-log units


@triton.jit
def _split_prompt_bwd_kernel(
        Q, PK, PV, OUT, LSE, GRAD_OUT, DQ, DPK, DPV, sm_scale, qk_scale, B, H, T, M,
        stride_qb, stride_qt, stride_qh, stride_pkb, stride_pkt, stride_pkh, stride_pvb, stride_pvt, stride_pvh,
        stride_ob, stride_ot, stride_oh, stride_gb, stride_gt, stride_gh, stride_dqb, stride_dqt, stride_dqh,
        D: tl.constexpr, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_M: tl.constexpr, SAMPLES: tl.constexpr,
        HAS_DQ: tl.constexpr, IEEE: tl.constexpr):
    # One program per (group of SAMPLES samples, head): the prompt keys' share of dQ, added in place,
    # and the group's summed gradients of the prompt keys and values, [M, D] each, written once.
    # (SAMPLES > 1 only for prompts shared by the batch: fewer partial sums to write and add.)
    pid_g = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)
    offs_d = tl.arange(0, D_PAD)
    offs_p = tl.arange(0, M_PAD)
    d_ok, p_ok = offs_d < D, offs_p < M
    prompt_rows = p_ok[:, None] & d_ok[None, :]
    b0 = (pid_g * SAMPLES).to(tl.int64)
    pk_base = PK + b0 * stride_pkb + h * stride_pkh
    pk = tl.load(pk_base + offs_p[:, None] * stride_pkt + offs_d[None, :], mask=prompt_rows, other=0.0)
    pvt = tl.load(PV + b0 * stride_pvb + h * stride_pvh + offs_p[None, :] * stride_pvt + offs_d[:, None],
                  mask=p_ok[None, :] & d_ok[:, None], other=0.0)
    dpk = tl.zeros([M_PAD, D_PAD], dtype=tl.float32)
    dpv = tl.zeros([M_PAD, D_PAD], dtype=tl.float32)
    for i in range(SAMPLES):
        b = b0 + i
        if b < B:
            for start_m in range(0, T, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                m_ok = offs_m < T
                rows = m_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                            mask=rows, other=0.0)
                do = tl.load(GRAD_OUT + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :],
                             mask=rows, other=0.0).to(Q.dtype.element_ty)
                o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                            mask=rows, other=0.0)
                delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
                lse = tl.load(LSE + (b * H + h) * T + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
                s = _prompt_scores(q, pk_base, stride_pkt, offs_p, p_ok, offs_d, d_ok, qk_scale, IEEE)
                p = tl.where(m_ok[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
                ds = p * (_dot(do, pvt, IEEE) - delta[:, None])
                if HAS_DQ:
                    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
                    dq = (tl.load(dq_ptrs, mask=rows, other=0.0).to(tl.float32)
                          + _dot(ds.to(pk.dtype), pk, IEEE) * sm_scale)
                    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows)
                dpk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
                dpv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
    grad_offs = (pid_g * H + h) * M * D + offs_p[:, None] * D + offs_d[None, :]
    tl.store(DPK + grad_offs, dpk * sm_scale, mask=prompt_rows)
    tl.store(DPV + grad_offs, dpv, mask=prompt_rows)


def _sizes(q, prompt_k) -> dict:
    d_pad, m_pad = max(16, next_pow2(q.shape[-1])), max(16, next_pow2(prompt_k.shape[1]))
    return dict(D=q.shape[-1], D_PAD=d_pad, M_PAD=m_pad, IEEE=q.dtype == torch.float32)


def _strides(t: torch.Tensor) -> tuple:
    """Outer strides of a [B, T, H, D] tensor; batch stride 0 for a batch-1 prompt segment."""
    return _kv_batch_stride(t), t.stride(1), t.stride(2)


def _merge_fake(q, prompt_k, prompt_v, out_t, lse_t, scale):
    return torch.empty_like(out_t), torch.empty_like(lse_t)


@define_op("prompt_kv_split_merge", _merge_fake)
def _merge_op(q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor, out_t: torch.Tensor,
              lse_t: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole softmax's output (laid out as ``out_t``) and log-sum-exp from the token keys' ones.
    ``out_t`` is [B, T, H, D] (any outer strides), ``lse_t`` [B, H, T] or [B, H, T, 1], natural log."""
    batch, tokens, heads, _ = q.shape
    lse_t = lse_t.contiguous()  # the kernels index it as [B, H, T]
    out, lse = torch.empty_like(out_t), torch.empty_like(lse_t)
    cfg = _merge_config()
    launch(_split_merge_kernel)[(triton.cdiv(tokens, cfg["BLOCK_M"]), batch * heads)](
        q, prompt_k, prompt_v, out_t, lse_t, out, lse, scale * _LOG2E, heads, tokens, prompt_k.shape[1],
        *_strides(q), *_strides(prompt_k), *_strides(prompt_v), *_strides(out_t), **cfg, **_sizes(q, prompt_k))
    return out, lse


def _merge_config() -> dict:
    """Query rows per program and warps of the merge kernel. Not yet timed on a GPU."""
    if _common.INTERPRET:
        return dict(BLOCK_M=16, num_warps=1)
    return dict(BLOCK_M=64, num_warps=4)


def _bwd_config(shared: bool, batch: int) -> dict:
    """Rows per step, samples per program (prompts shared by the batch: 2, so that fewer partial
    sums are written), warps, stages: the fastest of the sweep at ViT-B/16's sizes in bf16 on an H100
    (prompt_kv_split_configs_h100.txt: 0.205 ms a call against 0.326 for 32 rows, 4 samples, 8 warps,
    2 stages)."""
    if _common.INTERPRET:
        return dict(BLOCK_M=16, SAMPLES=2 if shared else 1, num_warps=1, num_stages=1)
    return dict(BLOCK_M=64, SAMPLES=min(2, batch) if shared else 1, num_warps=4, num_stages=1)


def _prompt_grads(grad_out, q, prompt_k, prompt_v, out, lse, dq, scale):
    batch, tokens, heads, dim = q.shape
    prompts = prompt_k.shape[1]
    cfg = _bwd_config(prompt_k.shape[0] == 1 and batch > 1, batch)
    groups = triton.cdiv(batch, cfg["SAMPLES"])
    grads = torch.empty((2, groups, heads, prompts, dim), dtype=torch.float32, device=q.device)
    target = q if dq is None else dq  # unread without HAS_DQ
    launch(_split_prompt_bwd_kernel)[(groups, heads)](
        q, prompt_k, prompt_v, out, lse, grad_out, target, grads[0], grads[1], scale, scale * _LOG2E,
        batch, heads, tokens, prompts, *_strides(q), *_strides(prompt_k), *_strides(prompt_v), *_strides(out),
        *_strides(grad_out), *_strides(target), HAS_DQ=dq is not None, **cfg, **_sizes(q, prompt_k))
    # [groups, H, M, D] -> prompt_k's [1 or B, M, H, D]; two separate dense tensors (op outputs share no storage)
    if prompt_k.shape[0] == 1:
        return tuple(g.sum(0, keepdim=True).transpose(1, 2).to(prompt_k.dtype).contiguous() for g in grads)
    return tuple(g.transpose(1, 2).to(prompt_k.dtype).contiguous() for g in grads)


def _grads_fake(grad_out, q, prompt_k, prompt_v, out, lse, scale):
    return torch.empty_like(prompt_k), torch.empty_like(prompt_v)


def _grads_into_fake(grad_out, q, prompt_k, prompt_v, out, lse, dq, scale):
    return _grads_fake(grad_out, q, prompt_k, prompt_v, out, lse, scale)


@define_op("prompt_kv_split_prompt_grads", _grads_fake)
def _prompt_grads_op(grad_out: torch.Tensor, q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The prompt keys' and values' gradients (no dQ: VPT-deep's first block)."""
    return _prompt_grads(grad_out, q, prompt_k, prompt_v, out, lse, None, scale)


@define_op("prompt_kv_split_prompt_grads_into", _grads_into_fake, mutates_args=("dq",))
def _prompt_grads_into_op(grad_out: torch.Tensor, q: torch.Tensor, prompt_k: torch.Tensor, prompt_v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor,
                          scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_prompt_grads_op`, and the prompt keys' share of dQ added to ``dq`` in place."""
    return _prompt_grads(grad_out, q, prompt_k, prompt_v, out, lse, dq, scale)


class PromptKVSplitFunction(torch.autograd.Function):
    """Saves the inputs, the merged output and log-sum-exp (and ATen's seed/offset), never the
    probabilities or a concatenation."""

    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, scale, kernel):
        out_t, lse_t, seed, offset = aten_attention.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            scale, kernel)
        out, lse = _merge_op(q, prompt_k, prompt_v, out_t.transpose(1, 2), lse_t, scale)
        ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, seed, offset)
        ctx.scale, ctx.kernel = scale, kernel
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, prompt_k, prompt_v, out, lse, seed, offset = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        if not any(ctx.needs_input_grad[:3]):  # VPT-deep's first block: only its prompts need a gradient
            return None, None, None, *_prompt_grads_op(grad_out, q, prompt_k, prompt_v, out, lse, ctx.scale), None, None
        dq, dk, dv = (g.transpose(1, 2) for g in aten_attention.backward(
            grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), out.transpose(1, 2),
            lse, seed, offset, ctx.scale, ctx.kernel))
        dpk, dpv = _prompt_grads_into_op(grad_out, q, prompt_k, prompt_v, out, lse, dq, ctx.scale)
        return dq, dk, dv, dpk, dpv, None, None


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    """Same contract as :func:`svpt.ops.prompt_kv_attention`; inputs ATen's kernels cannot take
    (a dtype or head dim, svpt_kernels.aten_attention.kernel_for) raise, naming them."""
    dtype = common_dtype(q, k, v, prompt_k, prompt_v)
    kernel = aten_attention.kernel_for(q.device, dtype, q.shape[-1])
    if kernel is None:
        raise ValueError(f"split prompt_kv_attention: ATen's fused attention takes no {dtype} heads of "
                         f"{q.shape[-1]} on {q.device.type} (CUDA: float16/bfloat16, head dims multiples of 8)")
    tensors = [_common.last_dim_contiguous(t.to(dtype)) for t in (q, k, v, prompt_k, prompt_v)]
    return PromptKVSplitFunction.apply(*tensors, float(scale), kernel)
