"""The op interface every method is written in; each backend implements these ops.

Shapes: B batch, T tokens (prefix, prompts, patches), M prompts, H heads, D head dim,
d width. Every backend computes the same function (METHOD.md); :mod:`svpt.reference`
is the ground truth. The backend is chosen by :mod:`svpt.backends`, never here.

``prompt_kv_attention`` and ``folded_cross_attention`` are the exact fast paths of VPT-deep
and CVPT (METHOD.md, "Fast path"). Every backend implements them (the reference too, for the
tests), but the methods call them only where :func:`fast_path` says the backend in use
offers them; otherwise they run the plain path, which on the eager reference is always.

Every op checks its inputs (:mod:`svpt.checks`: device, dtype, shapes, arguments) before a
backend is chosen, so bad input fails the same way, with the same message, on every backend.
"""
from __future__ import annotations

import torch

from . import backends, checks

__all__ = ["ae_update", "da_mix", "fast_path", "folded_cross_attention", "prompt_attention",
           "prompt_kv_attention"]


def _impl(op: str, device: torch.device):
    """The selected backend's implementation of ``op`` for tensors on ``device`` (every backend
    implements every op: tests/test_api.py checks it)."""
    return getattr(backends.resolve(device), op)


def da_mix(tokens: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """SVPT's cross-layer connection with dynamic aggregation (CDC + DA).

    ``tokens`` [B, T, d] is block l-1's output, whose rows ``num_prefix : num_prefix+M``
    hold ``P_out[l-1]``; ``prompts`` [B or 1, M, d] is ``P[l]`` (after prompt dropout);
    ``weight`` [2, d] and ``bias`` [] are ``da.weight[l-1]`` and ``da.bias[l-1]``.
    Returns ``tokens`` with those rows replaced by ``g * P_out + (1 - g) * P`` where
    ``g = sigmoid(P_out . weight[0] + P . weight[1] + bias)`` per token.
    """
    checks.check_da_mix(tokens, prompts, weight, bias, num_prefix)
    return _impl("da_mix", tokens.device)(tokens, prompts, weight, bias, num_prefix)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     saliency_rows: tuple[int, int] | None = None,
                     saliency_cols: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention, optionally with AE's saliency from the same probabilities.

    ``q`` [B, Tq, H, D]; ``k``, ``v`` [B or 1, Tk, H, D]. Returns ``out`` [B, Tq, H, D] and,
    when ``saliency_rows = (start, count)`` is given, ``saliency`` [B, Tk - saliency_cols]
    (float32, no gradient): the attention probabilities of query rows
    ``start : start+count`` to key columns ``saliency_cols :``, averaged over heads and
    over those rows (not renormalised). Otherwise ``saliency`` is ``None``.
    """
    checks.check_prompt_attention(q, k, v, scale, saliency_rows, saliency_cols)
    return _impl("prompt_attention", q.device)(q, k, v, scale, saliency_rows, saliency_cols)


def ae_update(tokens: torch.Tensor, attn_out: torch.Tensor, saliency: torch.Tensor,
              scale: torch.Tensor, num_prefix: int, num_prompts: int, k: int) -> torch.Tensor:
    """SVPT's attentive enhancement fused with the attention residual add.

    ``h = tokens + attn_out`` [B, T, d]; the ``k`` patch tokens with the highest
    ``saliency`` [B, N] (N = T - num_prefix - num_prompts) get
    ``u = scale * mean(h[:, num_prefix : num_prefix+num_prompts])`` added. The top-k
    indices carry no gradient; ``u`` does (to ``scale`` and through ``h``).
    """
    checks.check_ae_update(tokens, attn_out, saliency, scale, num_prefix, num_prompts, k)
    return _impl("ae_update", tokens.device)(tokens, attn_out, saliency, scale, num_prefix, num_prompts, k)


def fast_path(op: str, device: torch.device) -> bool:
    """Whether the backend running ops on ``device`` offers the fast-path op ``op``
    (``"prompt_kv_attention"`` or ``"folded_cross_attention"``) and fast paths are enabled."""
    return backends.has_fast_path(op, device)


def prompt_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
                        prompt_v: torch.Tensor, scale: float) -> torch.Tensor:
    """VPT-deep's KV-only attention: softmax attention of the queries ``q`` [B, Tq, H, D] over the
    keys/values ``[prompt_k; k]``, ``[prompt_v; v]``, the prompt segment ``prompt_k``/``prompt_v``
    [1 or B, M, H, D] (batch 1: computed once per step) read separately from ``k``, ``v``
    [B, Tk, H, D]. Returns ``out`` [B, Tq, H, D]; gradients reach all five inputs (the prompt
    segment's summed over the batch when it has batch 1).
    """
    checks.check_prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale)
    return _impl("prompt_kv_attention", q.device)(q, k, v, prompt_k, prompt_v, scale)


def folded_cross_attention(x: torch.Tensor, w_logits: torch.Tensor, b_logits: torch.Tensor | None,
                           w_values: torch.Tensor, bias: torch.Tensor | None = None,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
    """CVPT's cross-attention with the frozen projections folded into the prompts' keys and values.

    ``x`` [..., d]; ``w_logits`` [H, M, d] (head h: ``scale * k_h W_q,h``), ``b_logits`` [H, M]
    (``scale * k_h b_q,h``) or ``None``; ``w_values`` [H, M, d] (``v_h W_o,h``); ``bias`` [d] (the
    output projection's) or ``None``. Returns
    ``residual + sum_h softmax_M(x w_logits[h]^T + b_logits[h]) w_values[h] + bias``
    (``residual`` [..., d] or ``None``; passing ``x`` itself lets a backend fuse the add).
    Under autocast the products run in the autocast dtype, as F.linear's would.
    """
    checks.check_folded_cross_attention(x, w_logits, b_logits, w_values, bias, residual)
    return _impl("folded_cross_attention", x.device)(x, w_logits, b_logits, w_values, bias, residual)
