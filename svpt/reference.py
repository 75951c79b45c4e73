"""Eager PyTorch implementation of every op in :mod:`svpt.ops`: the ground truth.

Written for clarity, not speed: attention materialises the full probability matrix, as
research code does. Docstrings of the ops live in :mod:`svpt.ops`.
"""
from __future__ import annotations

import torch


def da_mix(tokens, prompts, weight, bias, num_prefix):
    num_prompts = prompts.shape[-2]
    prev = tokens[:, num_prefix:num_prefix + num_prompts]
    gate = torch.sigmoid(prev @ weight[0] + prompts @ weight[1] + bias).unsqueeze(-1)
    mixed = gate * prev + (1 - gate) * prompts
    return torch.cat([tokens[:, :num_prefix], mixed, tokens[:, num_prefix + num_prompts:]], dim=1)


def prompt_attention(q, k, v, scale, saliency_rows=None, saliency_cols=0):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2)
    if saliency_rows is None:
        return out, None
    start, count = saliency_rows
    rows = probs.detach()[:, :, start:start + count, saliency_cols:]
    return out, rows.float().mean(dim=(1, 2))


def ae_update(tokens, attn_out, saliency, scale, num_prefix, num_prompts, k):
    h = tokens + attn_out
    first_patch = num_prefix + num_prompts
    rows = saliency.topk(k, dim=-1).indices + first_patch  # [B, k]
    u = scale * h[:, num_prefix:first_patch].mean(dim=1)  # [B, d]
    index = rows.unsqueeze(-1).expand(-1, -1, h.shape[-1])
    return h.scatter_add(1, index, u.unsqueeze(1).expand(-1, k, -1).to(h.dtype))
