"""Compiled and JIT kernels behind svpt's backends (``svpt_kernels.triton``: Triton,
``svpt_kernels.cpp``: the C++/CUDA extension)."""
from __future__ import annotations

import torch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def traced(*args) -> bool:
    """Whether a call with ``args`` is being traced (torch.compile, export, AOTAutograd: the arguments
    are then fake or functional tensor subclasses) and must go through its registered op; plain eager
    calls skip the op's dispatch, which costs host time (define_op in svpt_kernels.triton._common)."""
    return torch.compiler.is_compiling() or not all(
        type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))
