"""ATen's fused attention kernels called directly, with their row log-sum-exp: cuDNN's and
FlashAttention's on CUDA, ATen's flash kernel on CPU. Two VPT-deep implementations build on them:
the C++ backend's 16-bit attention over the concatenated [prompt; token] keys (svpt_kernels.cpp)
and the split attention (svpt_kernels.triton.prompt_kv_split), which runs them over the token keys
alone and merges the prompt segment in by log-sum-exp.

Layout: SDPA's [B, H, T, D] (views of [B, T, H, D] tensors through transposes). The log-sum-exp is
in natural-log units, [B, H, T] (cuDNN: [B, H, T, 1]); the backward takes any (out, lse) pair whose
softmax covers these keys and more (the split's merged ones): it recomputes the probabilities as
exp(s - lse) and the correction term from dO and out.
"""
from __future__ import annotations

import torch

__all__ = ["backward", "forward", "kernel_for", "kernels"]

# The head dims each kernel takes (multiples of 8).
MAX_HEAD_DIM = {"cudnn": 128, "flash": 256, "cpu": 1 << 30}
_KERNELS: dict[int | None, tuple[str, ...]] = {}  # per GPU index


def has_cudnn_ops() -> bool:
    """Whether this torch has ATen's cuDNN attention ops with the signatures called here (torch >= 2.5;
    older releases had others)."""
    ops = [getattr(torch.ops.aten, name, None) for name in
           ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward")]
    return all(op is not None and "attn_bias" in [a.name for a in op.default._schema.arguments] for op in ops)


@torch.compiler.assume_constant_result  # asked by each traced call: a fact of the process
def kernels(index: int | None) -> tuple[str, ...]:
    """ATen's fused attention kernels usable in 16-bit on GPU ``index``, preferred first: ``"cudnn"``
    on Hopper and newer where torch has cuDNN's attention enabled (torch's own SDPA picks it first
    there), then ``"flash"`` on sm80 and newer where torch was built with FlashAttention."""
    if index not in _KERNELS:
        capability = torch.cuda.get_device_capability(index)
        cudnn = (capability >= (9, 0) and torch.backends.cudnn.is_available() and has_cudnn_ops()
                 and getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)())
        flash = (getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
                 and capability >= (8, 0))
        _KERNELS[index] = ("cudnn",) * cudnn + ("flash",) * flash
    return _KERNELS[index]


def kernel_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """The kernel that runs attention of ``dtype`` with heads of ``head_dim`` on ``device``, or
    None where none does: on CUDA the first of :func:`kernels` (16-bit only), on CPU ATen's flash
    kernel (any float type)."""
    if head_dim % 8:
        return None
    if device.type == "cpu":
        return "cpu" if dtype.is_floating_point else None
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    return next((k for k in kernels(device.index) if head_dim <= MAX_HEAD_DIM[k]), None)


def forward(q, k, v, scale: float, kernel: str):
    """(out, lse, seed, offset): ``out`` in the kernel's [B, H, T, D] view, ``lse`` natural-log;
    seed and offset are what its backward takes back (empty on CPU)."""
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse, q.new_empty(0), q.new_empty(0)
    if kernel == "cudnn":
        out, lse, *_, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)
    else:
        out, lse, *_, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)
    return out, lse, seed, offset


def backward(grad_out, q, k, v, out, lse, seed, offset, scale: float, kernel: str):
    """(dq, dk, dv) in the kernel's [B, H, T, D] views, for ``(out, lse)`` as :func:`forward`
    returns them or merged over more keys."""
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, scale=scale)
    rows_q, rows_k = q.shape[2], k.shape[2]
    if kernel == "cudnn":  # cuDNN wants the output gradient laid out as the output
        grad = grad_out if grad_out.stride() == out.stride() else torch.empty_like(out).copy_(grad_out)
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse, seed, offset, None, None, None, rows_q, rows_k, 0.0, False, scale=scale)
    grad = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        grad, q, k, v, out, lse, None, None, rows_q, rows_k, 0.0, False, seed, offset, scale=scale)
