"""A provider, not a backend: ``prompt_attention`` and ``prompt_kv_attention`` through PyTorch's
``scaled_dot_product_attention`` (cuDNN or FlashAttention on CUDA). Backends name it in their
``PREFER`` declarations where it was measured faster than their own kernel (svpt.backends)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

_ONLY_BY_PREFER = {"devices": ("cpu", "cuda"), "dtypes": ()}
SUPPORTS = {"prompt_attention": _ONLY_BY_PREFER, "prompt_kv_attention": _ONLY_BY_PREFER}


def prompt_attention(q, k, v, scale):
    # [B, T, H, D] views in, SDPA's [B, H, T, D] layout through transposes (no copies).
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    # One key/value sequence [prompts; tokens] per sample: the prompt rows are copied B times (M of
    # the M + T rows), which SDPA's fused kernels need; autograd sums their gradients over the batch.
    # No backend prefers it yet: benchmarks/token_floor.py's vpt-deep-sdpa-kv row measures it.
    batch = q.shape[0]
    keys = torch.cat([prompt_k.expand(batch, -1, -1, -1), k], 1)
    values = torch.cat([prompt_v.expand(batch, -1, -1, -1), v], 1)
    return prompt_attention(q, keys, values, scale)
