"""folded_cross_attention (CVPT's fast path: cross-attention with the frozen projections folded into
the prompts' keys and values) on every backend that declares it.

Against the float64 reference (opcheck.check): the output and every input gradient, including a
residual that is ``x`` itself (its gradient joins x's). Under autocast the products run in the
autocast dtype, as the reference's F.linear do: held to 2x eager's error under the same autocast.
Inputs: with and without the logit and output biases, no / another / the same residual, one head,
rows that are not a multiple of any block, exactly the fused kernels' widest fold
(128 logit columns), and wider folds, which a backend with that limit hands over.
"""
from __future__ import annotations

import pytest
import torch

from svpt import reference

from numerics import rel_err
from opcheck import (Case, check, check_hand_over, check_sized_route, declared, execute, handed_over, kernel_backends,
                     own_cases, randn, value_cases)

OP = "folded_cross_attention"
NAMES = ("x", "w_logits", "b_logits", "w_values", "bias", "residual")
# name: (leading shape, width, heads, M, with b_logits, with bias, residual: None / "x" / "other")
SHAPES = {
    "residual-is-x": ((2, 9), 40, 2, 3, True, True, "x"),
    "other-residual": ((2, 9), 24, 3, 5, True, True, "other"),
    "no-residual-no-biases": ((2, 7), 48, 2, 7, False, False, None),
    "one-head-flat-rows": ((37,), 32, 1, 2, True, False, "x"),
    "128-logit-columns": ((2, 5), 32, 4, 32, False, True, "other"),
}
LONG = {"vit-tiny-394-rows": ((2, 197), 192, 3, 10, True, True, "x")}  # past the kernels' row blocks
# tests/gpu/test_ops_gpu.py: the op at ViT-B/16's sizes (d 768, 12 heads of 64, N 196)
VIT_B16 = {"vitb16-M10-residual-x": ((32, 197), 768, 12, 10, True, True, "x"),
           "vitb16-M10-other-residual": ((32, 197), 768, 12, 10, True, True, "other")}


def make(name: str, seed: int = 0, shape: tuple | None = None) -> Case:
    lead, width, heads, m, with_bl, with_bias, residual = shape or (SHAPES | LONG | VIT_B16)[name]
    gen = torch.Generator().manual_seed(seed + width + m)
    values = {"x": randn(gen, *lead, width),
              "w_logits": randn(gen, heads, m, width, std=width ** -0.5),  # logits ~ N(0, 1)
              "b_logits": randn(gen, heads, m, std=0.3) if with_bl else None,
              "w_values": randn(gen, heads, m, width, std=0.5),
              "bias": randn(gen, width, std=0.2) if with_bias else None,
              "residual": randn(gen, *lead, width) if residual == "other" else None}
    return Case(OP, values, grads=tuple(n for n in NAMES if values[n] is not None),
                same={"residual": "x"} if residual == "x" else {})


@pytest.mark.parametrize("backend,device,dtype,shape", value_cases(OP, SHAPES, LONG))
def test_matches_float64_reference(backend, device, dtype, shape):
    check(make(shape), backend, device, dtype)


def autocast_cases() -> list:
    """(backend, device, autocast dtype) for the backends computing the op in that dtype."""
    return [pytest.param(*p.values[:2], p.values[2], id=p.id)
            for p in own_cases(OP, dtypes=(torch.float16, torch.bfloat16))]


@pytest.mark.parametrize("shape", ["residual-is-x", "no-residual-no-biases"])
@pytest.mark.parametrize("backend,device,autocast", autocast_cases())
def test_under_autocast_like_linear(backend, device, autocast, shape):
    """fp32 inputs (the residual stream, the folded weights) under autocast: products in the
    autocast dtype; the result in the reference's dtype (fp32 with an fp32 residual)."""
    case = make(shape)
    case.autocast = autocast
    check(case, backend, device, torch.float32)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_a_float64_residual_promotes_like_the_reference(backend, device, dtype):
    """The residual is added, not multiplied: a float64 one makes the result float64, as ``residual + ca``."""
    case = make("other-residual")
    case.own_dtype = ("residual",)
    check(case, backend, device, dtype)


@pytest.mark.parametrize("needed", ["x", "w_logits", "b_logits", "w_values", "bias"])
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_only_some_inputs_need_grad(backend, device, dtype, needed):
    case = make("other-residual")
    case.grads = (needed,)
    check(case, backend, device, dtype)


@pytest.mark.parametrize("backend", kernel_backends(OP))
def test_wider_folds_run_where_declared(backend):
    """129 logit columns: past the Triton kernels' fused limit (a backend that declares it hands over)."""
    check_sized_route(make("", shape=((2, 3), 32, 3, 43, True, True, "x")), backend, {"logit_columns": 129})


def test_reference_matches_the_definition():
    """The reference (eager float64): METHOD.md's folded CA written out per head, and its
    gradients by finite differences."""
    case = make("other-residual")
    x, wl, bl, wv, bias, res = (case.inputs[n] for n in NAMES)
    out = reference.folded_cross_attention(x, wl, bl, wv, bias, res)
    probs = (torch.einsum("btd,hmd->bthm", x, wl) + bl).softmax(-1)
    expected = res + torch.einsum("bthm,hmd->btd", probs, wv) + bias
    assert rel_err(out, expected) < 1e-13
    small = [t.clone().requires_grad_() for t in (x[:1, :2], wl[:2, :2], bl[:2, :2], wv[:2, :2], bias, res[:1, :2])]
    assert torch.autograd.gradcheck(lambda *t: reference.folded_cross_attention(*t), small)


@pytest.mark.parametrize("row", handed_over(OP))
def test_hand_over(row):
    check_hand_over(make("residual-is-x"), row)


def autocast_routes() -> list:
    """(backend, device, autocast dtype, the implementation declared for that dtype) for every kernel
    backend: the fold's products run in the autocast dtype, so that dtype's declaration decides."""
    runs = {(r["backend"], r["device"], r["dtype"]): r["runs"] for r in declared(OP)}
    return [pytest.param(backend, device, getattr(torch, dtype), name, id=f"{backend}-{device}-{dtype}")
            for (backend, device, dtype), name in runs.items()
            if backend != "eager" and dtype in ("float16", "bfloat16") and name != "-"]


@pytest.mark.parametrize("backend,device,autocast,declared_name", autocast_routes())
def test_per_call_under_autocast_runs_what_is_declared_for_the_autocast_dtype(backend, device, autocast,
                                                                              declared_name):
    case = make("residual-is-x")
    case.autocast = autocast
    assert execute(case, backend, device, torch.float32).log == [(OP, declared_name)]
