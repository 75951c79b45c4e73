"""METHOD.md's error measure and bounds ("What each backend must match"), shared by the tests.

* float32: relative error ``||got - ref|| / ||ref||`` <= 1e-4 against float64, nothing else;
* float64 (a backend that computes it): <= 1e-10;
* float16 / bfloat16: at most twice the eager backend's error in the same dtype, both against
  float64 on the same rounded inputs, plus only ``flash_delta_moves``' floor where the op is a
  FlashAttention-style backward (the one rounding such a backward makes by design).
"""
from __future__ import annotations

import torch

FP32_BOUND = 1e-4
FP64_BOUND = 1e-10
LOW_PRECISION = (torch.float16, torch.bfloat16)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (``b``: the reference)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bound(precision: torch.dtype, eager_err: float | None, floor: float = 0.0) -> float:
    """The largest relative error METHOD.md accepts for a result computed in ``precision``;
    ``eager_err``: eager's own error in that precision (16-bit only)."""
    if precision == torch.float64:
        return FP64_BOUND
    if precision == torch.float32:
        return FP32_BOUND
    return 2 * eager_err + floor


def within(got: torch.Tensor, want: torch.Tensor, eager: torch.Tensor | None, precision: torch.dtype,
           floor: float = 0.0) -> tuple[bool, float, float | None]:
    """(within METHOD.md's bound, error, eager's error or None) of ``got`` against ``want``."""
    err = rel_err(got, want)
    eager_err = None if eager is None else rel_err(eager, want)
    return err <= bound(precision, eager_err, floor), err, eager_err


def cotangent(shape, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """A random cotangent drawn in float64 and rounded to ``dtype`` (float64 values): the float64
    reference sees exactly the values the tested run gets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype).double()


def flash_delta_moves(q: torch.Tensor, segments: list[tuple[torch.Tensor, torch.Tensor]], scale: float,
                      out: torch.Tensor, grad_out: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """How far a FlashAttention-style backward moves each gradient by design: ``[dq, dk_1, dv_1, ...]``
    (one key/value pair per segment: prompt_kv_attention's prompt segment, then the tokens').

    Its softmax correction D_i = rowsum(dO_i * O_i) is taken from the output rounded to ``dtype``;
    eager's softmax backward sums P * dP instead. The D error dD moves dq_i by
    -scale dD_i sum_j P_ij k_j and dk_j by -scale sum_i P_ij dD_i q_i (dv not at all); it dominates
    when a query sees few keys (2 keys: ds_prompt = -ds_token, so a small dD is a large relative
    error of the smaller one). All tensors float64 on the rounded values; ``out`` is the exact
    (float64) output, ``grad_out`` the cotangent; batch-1 segments get the batch's sum."""
    batch = q.shape[0]
    keys = torch.cat([k.expand(batch, -1, -1, -1) for k, _ in segments], dim=1)
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, keys) * scale, dim=-1)
    d_delta = (grad_out * (out.to(dtype).double() - out)).sum(-1)  # [B, Tq, H]
    moves = [-scale * d_delta[..., None] * torch.einsum("bhqk,bkhd->bqhd", probs, keys)]
    d_keys = -scale * torch.einsum("bhqk,bqh,bqhd->bkhd", probs, d_delta, q)
    start = 0
    for k, v in segments:
        part = d_keys[:, start:start + k.shape[1]]
        moves += [part.sum(0, keepdim=True) if k.shape[0] == 1 else part, torch.zeros_like(v)]
        start += k.shape[1]
    return moves
