"""A provider, not a backend: ``prompt_attention`` through PyTorch's
``scaled_dot_product_attention`` (cuDNN or FlashAttention on CUDA). Backends name it in their
``PREFER`` declarations where it was measured faster than their own kernel (svpt.backends)."""
from __future__ import annotations

import torch.nn.functional as F

SUPPORTS = {"prompt_attention": {"devices": ("cpu", "cuda"), "dtypes": ()}}  # only by a PREFER rule


def prompt_attention(q, k, v, scale):
    # [B, T, H, D] views in, SDPA's [B, H, T, D] layout through transposes (no copies).
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
