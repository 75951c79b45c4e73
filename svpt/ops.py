"""The op interface every method is written in; each backend implements these ops.

Shapes: B batch, T tokens (prefix, prompts, patches), M prompts, H heads, D head dim,
d width. Every backend computes the same function (METHOD.md); :mod:`svpt.reference`
is the ground truth. Which implementation runs is decided by :mod:`svpt.backends`, never here.

``da_mix`` and ``ae_update`` work in place on the token buffer and touch only the rows they
change (the M prompt rows; the k selected patch rows), forward and backward: the buffer of
[prefix, prompts, patches] lives through all blocks without being copied. Their inputs must not
be leaf tensors that require grad (as for any in-place op). Given the sub-layer's ``residual`` apart
from its branch, they write a new buffer instead, and given also the ``norm`` that reads it (the
block's frozen LayerNorm), they return that LayerNorm too: what SVPT's blocks call, so that a backend
can fuse residual add, row update and LayerNorm (the Triton backend does).

``prompt_kv_attention`` and ``folded_cross_attention`` are the exact fast paths of VPT-deep
and CVPT (METHOD.md, "Fast path"). Every backend implements them (the reference too, for the
tests), but the methods call them only where the backend lists them in ``FAST_PATHS``.

These functions check their inputs (:mod:`svpt.checks`) and resolve the implementation on
every call: the API for users and tests. The methods instead check the model's input once and
call the kernels of :func:`svpt.backends.kernels` directly.
"""
from __future__ import annotations

import torch

from . import backends, checks

__all__ = ["ae_update", "attention_saliency", "da_mix", "folded_cross_attention", "prompt_attention",
           "prompt_kv_attention"]


Norm = tuple  # (weight [d] or None, bias [d] or None, eps): a frozen LayerNorm's F.layer_norm arguments


def _dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t is not None]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _run(op: str, device: torch.device, dtype: torch.dtype, sizes: dict, *args):
    return backends.implementation(op, device, dtype, sizes).fn(*args)


def da_mix(tokens: torch.Tensor, prompts: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_prefix: int,
           residual: torch.Tensor | None = None, norm: Norm | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SVPT's cross-layer connection with dynamic aggregation (CDC + DA), in place.

    ``tokens`` [B, T, d] is block l-1's output, whose rows ``num_prefix : num_prefix+M``
    hold ``P_out[l-1]``; ``prompts`` [B or 1, M, d] is ``P[l]`` (after prompt dropout);
    ``weight`` [2, d] and ``bias`` [] are ``da.weight[l-1]`` and ``da.bias[l-1]``.
    Overwrites those rows with ``g * P_out + (1 - g) * P``, ``g = sigmoid(P_out . weight[0] +
    P . weight[1] + bias)`` per token, and returns ``tokens``; the other rows are not touched.
    With ``residual`` [B, T, d], the same on ``residual + tokens`` (a new buffer; neither input is
    written), and with ``norm`` also that buffer's LayerNorm: see :func:`ae_update`.
    """
    checks.check_da_mix(tokens, prompts, weight, bias, num_prefix, residual, norm)
    return _run("da_mix", tokens.device, _dtype(tokens, prompts, residual), {},
                tokens, prompts, weight, bias, num_prefix, residual, norm)


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale) v`` per head: ``q`` [B, Tq, H, D]; ``k``, ``v``
    [B or 1, Tk, H, D] (batch 1: CVPT's prompts, broadcast; their gradients summed over B).
    Returns [B, Tq, H, D]."""
    checks.check_prompt_attention(q, k, v, scale)
    sizes = {"head_dim": q.shape[-1], "broadcast_kv": int(k.shape[0] != q.shape[0])}
    return _run("prompt_attention", q.device, _dtype(q, k, v), sizes, q, k, v, scale)


def attention_saliency(q: torch.Tensor, k: torch.Tensor, scale: float, saliency_rows: tuple[int, int],
                       saliency_cols: int) -> torch.Tensor:
    """AE's saliency: the softmax attention probabilities (over all Tk keys) of query rows
    ``start : start+count`` (``saliency_rows = (start, count)``) to key columns
    ``saliency_cols :``, averaged over heads and over those rows, not renormalised. ``q``
    [B, Tq, H, D], ``k`` [B or 1, Tk, H, D]; returns float32 [B, Tk - saliency_cols], no gradient."""
    checks.check_attention_saliency(q, k, scale, saliency_rows, saliency_cols)
    return _run("attention_saliency", q.device, _dtype(q, k), {"head_dim": q.shape[-1]},
                q, k, scale, tuple(saliency_rows), saliency_cols)


def ae_update(h: torch.Tensor, saliency: torch.Tensor, scale: torch.Tensor, num_prefix: int, num_prompts: int, k: int,
              residual: torch.Tensor | None = None, norm: Norm | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SVPT's attentive enhancement, in place on the attention residual ``h`` [B, T, d]: the ``k``
    patch rows with the highest ``saliency`` [B, N] (N = T - num_prefix - num_prompts) get
    ``u = scale * mean(h[:, num_prefix : num_prefix+num_prompts])`` (taken before the update)
    added; returns ``h``. The top-k indices carry no gradient; ``u`` does (to ``scale`` and
    through ``h``'s prompt rows).

    With ``residual`` [B, T, d], the same on ``residual + h`` (a new buffer in the promoted dtype;
    neither input is written), as the block's ``x + attn`` when the branch ``h`` is in autocast's
    dtype and the residual stream in float32. Passing the two apart lets a backend hand the branch
    its gradient in the branch's dtype directly: under torch.compile that conversion then joins the
    kernel that computed the gradient, where after an in-place update of the sum's gradient it would
    be one more pass over [B, T, d].

    With ``norm`` = (weight, bias, eps) of the LayerNorm that reads the result (timm's ``norm2``; the
    frozen backbone's, so its parameters get no gradient), returns ``(out, layer_norm(out))``, the latter
    in autocast's dtype where autocast is on (what the next Linear would cast it to). A backend may then
    compute residual add, row update and LayerNorm in one pass over the rows, forward and backward (the
    Triton backend does), as torch.compile fuses timm's ``x + branch`` with the LayerNorm after it.
    """
    checks.check_ae_update(h, saliency, scale, num_prefix, num_prompts, k, residual, norm)
    return _run("ae_update", h.device, _dtype(h, residual), {}, h, saliency, scale, num_prefix, num_prompts, k,
                residual, norm)


def prompt_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prompt_k: torch.Tensor,
                        prompt_v: torch.Tensor, scale: float) -> torch.Tensor:
    """VPT-deep's KV-only attention: softmax attention of the queries ``q`` [B, Tq, H, D] over the
    keys/values ``[prompt_k; k]``, ``[prompt_v; v]``, the prompt segment ``prompt_k``/``prompt_v``
    [1 or B, M, H, D] (batch 1: computed once per step) read separately from ``k``, ``v``
    [B, Tk, H, D]. Returns ``out`` [B, Tq, H, D]; gradients reach all five inputs (the prompt
    segment's summed over the batch when it has batch 1).
    """
    checks.check_prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale)
    return _run("prompt_kv_attention", q.device, _dtype(q, k, v, prompt_k, prompt_v), {"head_dim": q.shape[-1]},
                q, k, v, prompt_k, prompt_v, scale)


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
    sizes = {"logit_columns": w_logits.shape[0] * w_logits.shape[1]}
    dtype = _dtype(x, w_logits)
    if dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):  # its products run in autocast's dtype
        dtype = torch.get_autocast_dtype(x.device.type)
    return _run("folded_cross_attention", x.device, dtype, sizes,
                x, w_logits, b_logits, w_values, bias, residual)
