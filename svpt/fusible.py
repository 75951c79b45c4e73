"""A provider, not a backend: ops written as plain PyTorch for torch.compile to fuse. Backends name it
in their ``PREFER`` declarations for what runs while torch.compile traces (``"compiling": True``,
svpt.backends), where it was measured faster than their own kernels in a compiled step: the Triton
backend's CVPT fold on CUDA. The row-local ops are measured by benchmarks/token_floor.py's
``svpt-fusible`` row before any backend declares them.

svpt's kernels are opaque to Inductor: a row-local op between the residual add and the next LayerNorm
makes Inductor write the [B, T, d] sum and read it back (one more pass over the sequence per op and
block). Written here as a full-width ``where`` that touches, in value, only the rows the op changes,
the update fuses into that add and LayerNorm, so it costs no pass of its own. The CVPT fold is the
reference's two products and a softmax, which Inductor fuses with its neighbours too.
"""
from __future__ import annotations

import torch

from .reference import da_mix, folded_cross_attention

__all__ = ["SUPPORTS", "ae_update", "da_mix", "folded_cross_attention"]

_ONLY_BY_PREFER = {"devices": ("cpu", "cuda"), "dtypes": ()}
SUPPORTS = {op: _ONLY_BY_PREFER for op in __all__[1:]}

# da_mix is the reference's: its write of the M prompt rows (``tokens[:, rows] = ...``) becomes a
# slice_scatter under torch.compile, which Inductor lowers to the same kind of pointwise select.


def ae_update(h, saliency, scale, num_prefix, num_prompts, k):
    """The reference's update (``u`` added to the top-k patch rows), as ``h += where(selected, u, 0)``
    over every row: the same values (adding 0 leaves a row unchanged), in a form Inductor fuses."""
    first_patch = num_prefix + num_prompts
    rows = saliency.topk(k, dim=-1).indices + first_patch  # [B, k]
    u = scale * h[:, num_prefix:first_patch].mean(dim=1)  # [B, d], from h before the update
    selected = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device).scatter_(1, rows, True)
    return h.add_(torch.where(selected.unsqueeze(-1), u.unsqueeze(1).to(h.dtype), 0.0))
