"""The op interface every method is written in; each backend implements these ops.

Shapes: B batch, T tokens (prefix, prompts, patches), M prompts, H heads, D head dim,
d width. Every backend computes the same function (METHOD.md); :mod:`svpt.reference`
is the ground truth. The backend is chosen by :mod:`svpt.backends`, never here.
"""
from __future__ import annotations

import torch

from . import backends

__all__ = ["ae_update", "da_mix", "prompt_attention"]


def da_mix(tokens: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """SVPT's cross-layer connection with dynamic aggregation (CDC + DA).

    ``tokens`` [B, T, d] is block l-1's output, whose rows ``num_prefix : num_prefix+M``
    hold ``P_out[l-1]``; ``prompts`` [B or 1, M, d] is ``P[l]`` (after prompt dropout);
    ``weight`` [2, d] and ``bias`` [] are ``da.weight[l-1]`` and ``da.bias[l-1]``.
    Returns ``tokens`` with those rows replaced by ``g * P_out + (1 - g) * P`` where
    ``g = sigmoid(P_out . weight[0] + P . weight[1] + bias)`` per token.
    """
    return backends.resolve(tokens.device).da_mix(tokens, prompts, weight, bias, num_prefix)


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
    return backends.resolve(q.device).prompt_attention(q, k, v, scale, saliency_rows, saliency_cols)


def ae_update(tokens: torch.Tensor, attn_out: torch.Tensor, saliency: torch.Tensor,
              scale: torch.Tensor, num_prefix: int, num_prompts: int, k: int) -> torch.Tensor:
    """SVPT's attentive enhancement fused with the attention residual add.

    ``h = tokens + attn_out`` [B, T, d]; the ``k`` patch tokens with the highest
    ``saliency`` [B, N] (N = T - num_prefix - num_prompts) get
    ``u = scale * mean(h[:, num_prefix : num_prefix+num_prompts])`` added. The top-k
    indices carry no gradient; ``u`` does (to ``scale`` and through ``h``).
    """
    return backends.resolve(tokens.device).ae_update(tokens, attn_out, saliency, scale,
                                                     num_prefix, num_prompts, k)
