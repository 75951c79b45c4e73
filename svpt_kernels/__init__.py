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


def with_layer_norm(out: torch.Tensor, norm: "tuple | None"):
    """``out``, or with ``norm`` = (weight, bias, eps) the pair (``out``, its LayerNorm in autocast's
    dtype where autocast is on): the ``norm=`` variant of da_mix and ae_update composed from the op
    and F.layer_norm, for the implementations that do not fuse the two."""
    if norm is None:
        return out
    y = torch.nn.functional.layer_norm(out, out.shape[-1:], *norm)
    if torch.is_autocast_enabled(out.device.type) and out.dtype != torch.float64:
        y = y.to(torch.get_autocast_dtype(out.device.type))
    return out, y
