"""A provider, not a backend: ops written as plain PyTorch for torch.compile to fuse. Backends name it
in their ``PREFER`` declarations for what runs while torch.compile traces (``"compiling": True``,
svpt.backends), where it was measured faster than their own kernels in a compiled step.

svpt's kernels are opaque to Inductor, which fuses a plain PyTorch op with its neighbours (the block's
residual add and LayerNorm). CVPT's fold is here the reference's two products and a softmax: on CUDA
the Triton backend hands it over while torch.compile traces (its PREFER says what was measured).
SVPT's row-local ops were measured in this form too (the AE update as a masked add over every row,
which Inductor can fuse): slower, and with more memory, than the Triton kernels in a compiled step
(benchmarks/results/token_floor_compiled_fusible_h100.txt), so they are not here.
"""
from __future__ import annotations

from .reference import folded_cross_attention

__all__ = ["SUPPORTS", "folded_cross_attention"]

SUPPORTS = {"folded_cross_attention": {"devices": ("cpu", "cuda"), "dtypes": ()}}  # only where a PREFER names it
