"""Does torch.compile fuse a gradient's dtype copy into the kernel that produced the gradient when
a custom op then rewrites a few rows of both in place? (issue 14: SVPT's compiled backward)

A residual block in miniature: ``h = x + a`` (``a`` 16-bit, ``x`` float32), a LayerNorm, a GEMM. Its
backward, as an autograd.Function would write it for an in-place row-local op given the residual apart
(ae_update / da_mix): ``branch = grad.to(a.dtype)`` first, then an op that rewrites rows 1..3 of
``grad`` and ``branch`` in place. Variants: ``floor`` (plain ``x + a``, what timm's blocks compile
to), ``custom_op`` (the row op opaque: torch.library.custom_op), ``slice_scatter`` (the row fix out of
place in PyTorch), ``gather_scatter`` (the same, the rows' change a sum over other rows of the gradient,
as ae_update's) and, on CUDA, ``triton_op`` (a Triton kernel through torch.library.triton_op /
wrap_triton, as svpt_kernels.triton registers its ops).
Prints, per variant, the kernels of the compiled backward in order: where the copy has a kernel of
its own (a ``_to_copy`` kernel apart from the LayerNorm backward's), it is one more pass over
[B, T, d] each block.

    PYTHONPATH=. python benchmarks/row_update_fusion.py            # CPU: floor, custom_op, ...
    PYTHONPATH=. python benchmarks/row_update_fusion.py --device cuda
    PYTHONPATH=. python benchmarks/row_update_fusion.py --svpt     # the same count on a compiled SVPT

``--svpt``: a small SVPT (3 blocks, M=4, bf16 autocast) on the Triton backend (on CPU through Triton's
interpreter, which it turns on), compiled: its backward's kernels counted by name, so that a full-sequence
pass of its own (a ``_to_copy`` or ``add`` kernel apart from a LayerNorm backward's) shows.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter

if "--svpt" in sys.argv and "cuda" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (torch._inductor imports it)

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

ROWS = (1, 4)


@torch.library.custom_op("svpt_bench::fix_rows", mutates_args=("grad", "branch"))
def fix_rows(grad: torch.Tensor, branch: torch.Tensor) -> None:
    rows = grad[:, ROWS[0]:ROWS[1]] + 1.0
    grad[:, ROWS[0]:ROWS[1]] = rows
    branch[:, ROWS[0]:ROWS[1]] = rows.to(branch.dtype)


def functional_fix_rows(grad: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same row fix out of place, as slice_scatter: what the compiler can fold into a pointwise kernel."""
    rows = grad[:, ROWS[0]:ROWS[1]] + 1.0
    return (grad.slice_scatter(rows, 1, *ROWS), branch.slice_scatter(rows.to(branch.dtype), 1, *ROWS))


def functional_gather_fix_rows(grad: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``functional_fix_rows`` with ae_update's dependency: the rows' change is a sum of the gradient
    over other (selected) rows, so it needs the whole gradient first."""
    index = torch.arange(8, 32, 3, device=grad.device).expand(grad.shape[0], -1)
    selected = grad.gather(1, index[:, :, None].expand(-1, -1, grad.shape[2])).sum(1, keepdim=True)
    rows = grad[:, ROWS[0]:ROWS[1]] + selected
    return (grad.slice_scatter(rows, 1, *ROWS), branch.slice_scatter(rows.to(branch.dtype), 1, *ROWS))


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
            fixed = fix(grad, branch)
            return (branch, grad) if fixed is None else fixed[::-1]
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


def svpt_backward_kernels(device: str) -> list[str]:
    """The compiled backward's kernels of a small SVPT on the Triton backend."""
    import timm

    import svpt
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                            depth=3)
    model = svpt.prompt(vit, "svpt", 4, ae_init=0.3).to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    compiled = torch.compile(model, fullgraph=True)

    def step():
        with svpt.backend("triton"), torch.autocast(device, dtype=torch.bfloat16):
            out = compiled(images)
        out.float().sum().backward()
    _, codes = run_and_get_code(step)
    body = codes[-1][codes[-1].index("def call("):]
    return re.findall(r"(cpp_fused\w*|triton_(?:per|red|poi)_\w+|extern_kernels\.\w+|torch\.ops\.svpt\.\w+)(?:\.default)?\(", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--svpt", action="store_true", help="count a compiled SVPT's backward kernels instead")
    args = parser.parse_args()
    if args.svpt:
        counts = Counter(svpt_backward_kernels(args.device))
        print(f"# torch {torch.__version__}, {args.device}: a compiled SVPT's backward kernels (3 blocks), by count")
        print("\n".join(f"{n:3d}  {name}" for name, n in counts.most_common()))
        return
    variants = {"floor": lambda a, x: x + a, "custom_op": residual(fix_rows),
                "slice_scatter": residual(functional_fix_rows), "gather_scatter": residual(functional_gather_fix_rows)}
    if args.device == "cuda":
        variants["triton_op"] = residual(triton_fix_rows())
    print(f"# torch {torch.__version__}, {args.device}: the compiled backward's kernels, in order")
    for name, add in variants.items():
        kernels = backward_kernels(add, args.device)
        norm = next(i for i, k in enumerate(kernels) if "layer_norm_backward" in k)
        # the GEMM's own cotangent copy comes first; the branch's copy is fused if nothing after the
        # LayerNorm backward converts
        separate = [k for k in kernels[norm + 1:] if "to_copy" in k]
        print(f"{name:<14} {'copy fused' if not separate else 'copy apart: ' + ', '.join(separate)}")
        print(f"{'':15}{' -> '.join(kernels)}")


if __name__ == "__main__":
    main()
