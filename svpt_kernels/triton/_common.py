"""What the Triton op modules share: interpreter detection, op registration, dtypes."""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable

import torch
import triton
import triton.language as tl

from svpt_kernels import traced

# Read once, like @triton.jit does: kernels decorated before the variable is set stay compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# torch >= 2.6 has triton_op/wrap_triton: torch.compile sees the kernels themselves. Older torch
# (2.4, 2.5), and the interpreter (whose kernels wrap_triton cannot trace with fake tensors),
# get an opaque custom_op with a fake implementation, which also traces without graph breaks.
USE_TRITON_OP = (hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
                 and not INTERPRET)

# Set while define_op's eager path runs an op body (thread-local: autograd's device threads).
_eager = threading.local()

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def define_op(name: str, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as the torch.library op ``svpt::name``; returns a callable
    that runs the registered op when torch.compile/export trace it (or when given tensor
    subclasses: fake, functional), and ``fn`` itself in plain eager mode. The custom-op
    dispatch cost ~0.35 ms of host time per call (torch 2.11, H200 host; 23 ms of an SVPT step:
    benchmarks/results/host_cprofile_h200_before.txt, gone in host_cprofile_h200.txt).
    ``mutates_args`` names the arguments the op writes in place (the row-local ops)."""
    def wrap(fn):
        if USE_TRITON_OP:
            op = torch.library.triton_op(f"svpt::{name}", fn, mutates_args=mutates_args)
        else:
            op = torch.library.custom_op(f"svpt::{name}", fn, mutates_args=mutates_args)
            op.register_fake(fake)

        @functools.wraps(fn)
        def call(*args):
            if traced(*args):
                return op(*args)
            previous, _eager.direct = getattr(_eager, "direct", False), True
            try:
                return fn(*args)
            finally:
                _eager.direct = previous
        call.op = op
        return call
    return wrap


def launch(kernel):
    """The kernel as called inside an op body: wrapped so torch.compile can trace it, except
    when ``define_op``'s eager path runs the body on real tensors (no tracing to serve)."""
    return torch.library.wrap_triton(kernel) if USE_TRITON_OP and not getattr(_eager, "direct", False) else kernel


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def writable(grad: torch.Tensor) -> torch.Tensor:
    """The incoming gradient, to be updated in place on the few rows an op changes: it is the
    gradient of a buffer the op itself wrote in place (nothing else reads it after this backward);
    an expanded or strided one (e.g. from ``sum().backward()``) is made dense first."""
    return grad if grad.is_contiguous() else grad.contiguous()


def branch_gradient(grad: torch.Tensor, dtype: "torch.dtype | None") -> "torch.Tensor | None":
    """For an op on ``residual + branch`` (the row-local ops given a residual): the incoming gradient
    in the branch's dtype, made before the op's backward updates its few rows of ``grad`` (and then
    those rows of this copy), so that torch.compile computes it in the kernel that produced ``grad``;
    ``None`` without a branch or where the dtypes agree (the branch's gradient is ``grad`` itself)."""
    return None if dtype is None or dtype == grad.dtype else grad.to(dtype)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take arbitrary outer strides (qkv views) but need unit stride on the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def autocast_dtype(device: torch.device) -> "torch.dtype | None":
    """The dtype autocast runs matmuls in on ``device``'s type, or ``None`` when it is off there
    (ops whose products the wrapper, not the dispatcher, casts need to follow it like F.linear)."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)
