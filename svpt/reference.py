"""Eager PyTorch implementation of every op in :mod:`svpt.ops`: the ground truth.

Written for clarity, not speed: attention materialises the full probability matrix, as
research code does. Docstrings of the ops live in :mod:`svpt.ops`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from svpt_kernels import with_layer_norm


def da_mix(tokens, prompts, weight, bias, num_prefix, residual=None, norm=None):
    if residual is not None:
        tokens = residual + tokens
    rows = slice(num_prefix, num_prefix + prompts.shape[-2])
    prev = tokens[:, rows].clone()  # P_out[l-1]: the write below overwrites these rows
    gate = torch.sigmoid(prev @ weight[0] + prompts @ weight[1] + bias).unsqueeze(-1)
    tokens[:, rows] = gate * prev + (1 - gate) * prompts
    return with_layer_norm(tokens, norm)


def _probabilities(q, k, scale):
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def prompt_attention(q, k, v, scale):
    return (_probabilities(q, k, scale) @ v.transpose(1, 2)).transpose(1, 2)


def attention_saliency(q, k, scale, saliency_rows, saliency_cols):
    start, count = saliency_rows
    with torch.no_grad():
        probs = _probabilities(q[:, start:start + count], k, scale)  # [B, H, rows, Tk]
        return probs[..., saliency_cols:].float().mean(dim=(1, 2))


def ae_update(h, saliency, scale, num_prefix, num_prompts, k, residual=None, norm=None):
    if residual is not None:
        h = residual + h
    first_patch = num_prefix + num_prompts
    rows = saliency.topk(k, dim=-1).indices + first_patch  # [B, k]
    u = scale * h[:, num_prefix:first_patch].mean(dim=1)  # [B, d], from h before the update
    index = rows.unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return with_layer_norm(h.scatter_add_(1, index, u.unsqueeze(1).expand(-1, k, -1).to(h.dtype)), norm)


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    batch = q.shape[0]
    k = torch.cat([prompt_k.expand(batch, -1, -1, -1), k], dim=1)
    v = torch.cat([prompt_v.expand(batch, -1, -1, -1), v], dim=1)
    return prompt_attention(q, k, v, scale)


def folded_cross_attention(x, w_logits, b_logits, w_values, bias=None, residual=None):
    heads, num_prompts, width = w_logits.shape
    logits = F.linear(x, w_logits.reshape(-1, width), None if b_logits is None else b_logits.reshape(-1))
    probs = logits.unflatten(-1, (heads, num_prompts)).softmax(dim=-1).flatten(-2)
    out = F.linear(probs, w_values.reshape(-1, width).t(), bias)
    return out if residual is None else residual + out
