"""Does torch.compile fuse a gradient's dtype copy into the kernel that produced the gradient when
a custom op then rewrites a few rows of both in place? (issue 14: SVPT's compiled backward)

A residual block in miniature: ``h = x + a`` (``a`` 16-bit, ``x`` float32), a LayerNorm, a GEMM. Its
backward, as an autograd.Function would write it for an in-place row-local op given the residual apart
(ae_update / da_mix): ``branch = grad.to(a.dtype)`` first, then an op that rewrites rows 1..3 of
``grad`` and ``branch`` in place. Variants: ``floor`` (plain ``x + a``, what timm's blocks compile
to), ``custom_op`` (the row op opaque: torch.library.custom_op) and, on CUDA, ``triton_op`` (a Triton
kernel through torch.library.triton_op / wrap_triton, as svpt_kernels.triton registers its ops).
Prints, per variant, the kernels of the compiled backward in order: where the copy has a kernel of
its own (a ``_to_copy`` kernel apart from the LayerNorm backward's), it is one more pass over
[B, T, d] each block.

    PYTHONPATH=. python benchmarks/row_update_fusion.py            # CPU: floor, custom_op
    PYTHONPATH=. python benchmarks/row_update_fusion.py --device cuda
"""
from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

ROWS = (1, 4)


@torch.library.custom_op("svpt_bench::fix_rows", mutates_args=("grad", "branch"))
def fix_rows(grad: torch.Tensor, branch: torch.Tensor) -> None:
    rows = grad[:, ROWS[0]:ROWS[1]] + 1.0
    grad[:, ROWS[0]:ROWS[1]] = rows
    branch[:, ROWS[0]:ROWS[1]] = rows.to(branch.dtype)


def triton_fix_rows():
    import triton
    import triton.language as tl

    @triton.jit
    def _fix_rows_kernel(GRAD, BRANCH, stride_b, stride_t, d, first, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        row = first + tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < d
        offset = b * stride_b + row * stride_t + cols
        g = tl.load(GRAD + offset, mask=ok).to(tl.float32) + 1.0
        tl.store(GRAD + offset, g, mask=ok)
        tl.store(BRANCH + offset, g.to(BRANCH.dtype.element_ty), mask=ok)

    @torch.library.triton_op("svpt_bench::triton_fix_rows", mutates_args=("grad", "branch"))
    def op(grad: torch.Tensor, branch: torch.Tensor) -> None:
        torch.library.wrap_triton(_fix_rows_kernel)[(grad.shape[0], ROWS[1] - ROWS[0])](
            grad, branch, grad.stride(0), grad.stride(1), grad.shape[2], ROWS[0],
            BLOCK_D=triton.next_power_of_2(grad.shape[2]))
    return op


def residual(fix):
    class Residual(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, x):
            ctx.dtype = a.dtype
            return x + a

        @staticmethod
        def backward(ctx, grad):
            branch = grad.to(ctx.dtype)  # before the row update: the copy the compiler may fuse
            grad = grad.contiguous()
            fix(grad, branch)
            return branch, grad
    return Residual.apply


def block(add, x, a, norm_weight, proj):
    h = add(a, x)
    y = F.layer_norm(h, h.shape[-1:], norm_weight)
    return h + (y.to(proj.dtype) @ proj).float()


def backward_kernels(add, device: str) -> list[str]:
    torch._dynamo.reset()
    x = torch.randn(8, 32, 256, device=device, requires_grad=True)
    a = torch.randn(8, 32, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    norm_weight = torch.ones(256, device=device)
    proj = torch.randn(256, 256, device=device, dtype=torch.bfloat16) / 16
    compiled = torch.compile(lambda *t: block(add, *t))
    _, codes = run_and_get_code(lambda: compiled(x, a, norm_weight, proj).sum().backward())
    code = codes[-1]  # the backward graph's
    body = code[code.index("def call("):]
    calls = re.findall(r"(cpp_fused\w*|triton_\w+|_fix_rows_kernel\w*|extern_kernels\.\w+|torch\.ops\.[\w.]+)[.(]", body)
    return [c for c in calls if not c.startswith("triton_kernel_wrapper")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    variants = {"floor": lambda a, x: x + a, "custom_op": residual(fix_rows)}
    if args.device == "cuda":
        variants["triton_op"] = residual(triton_fix_rows())
    print(f"# torch {torch.__version__}, {args.device}: the compiled backward's kernels, in order")
    for name, add in variants.items():
        kernels = backward_kernels(add, args.device)
        norm = next(i for i, k in enumerate(kernels) if "layer_norm_backward" in k)
        # the GEMM's own cotangent copy comes first; the branch's copy is fused if nothing after the
        # LayerNorm backward converts
        separate = [k for k in kernels[norm + 1:] if "to_copy" in k]
        print(f"{name:<10} {'copy fused' if not separate else 'copy apart: ' + ', '.join(separate)}")
        print(f"           {' -> '.join(kernels)}")


if __name__ == "__main__":
    main()
