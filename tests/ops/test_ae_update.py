"""ae_update (SVPT's attentive enhancement, in place on the k selected patch rows) on every backend
that declares it.

Against the float64 reference (opcheck.check): the patch rows and every input gradient (the
prompt rows' gradient carries the u path). The saliency is an input, so every implementation
ranks the very same tensor: the selected rows are fixed and the gradients are held to the
normal bound (the selection of attention_saliency itself is tested in test_attention_saliency.py).
The in-place contract: only the prompt rows are read and only the selected rows written, forward
and backward; the op returns its buffer; nothing of size [B, T, d] is saved for backward. Inputs:
non-zero scale, no prefix / a class token / registers, k = 1 and k = N, M over one block of rows,
a width over one block of columns.
"""
from __future__ import annotations

import pytest
import torch

from svpt import reference

from numerics import rel_err
from opcheck import (Case, check, check_hand_over, check_row_locality, check_saves_no_buffer, handed_over, own_cases,
                     layer_norm_tests, randn, value_cases, with_norm, with_residual)

OP = "ae_update"
# name: (batch, num_prefix, M, patches, width, k)
SHAPES = {
    "class-token-M3-k3": (2, 1, 3, 13, 40, 3),
    "registers-M5-k1": (2, 5, 5, 9, 24, 1),
    "no-prefix-every-patch": (2, 0, 2, 11, 48, 11),
    "width-300-M17": (1, 1, 17, 10, 300, 5),
}
LONG = {"vit-tiny-M10-k49": (2, 1, 10, 196, 192, 49)}  # ViT-Ti/16's rows: past the kernels' row tiles
# tests/gpu/test_ops_gpu.py: the op at ViT-B/16's sizes (d 768, 12 heads of 64, N 196)
VIT_B16 = {"vitb16-M50-k49": (64, 1, 50, 196, 768, 49), "vitb16-M10-k49": (64, 1, 10, 196, 768, 49)}


def make(name: str, scale: float = 0.7, seed: int = 0, strided: bool = False) -> Case:
    batch, prefix, m, patches, width, k = (SHAPES | LONG | VIT_B16)[name]
    gen = torch.Generator().manual_seed(seed + width)
    first_patch = prefix + m
    return Case(OP, {"h": randn(gen, batch, first_patch + patches, width),
                     "saliency": torch.rand(batch, patches, generator=gen, dtype=torch.float64).float(),
                     "scale": torch.tensor(scale, dtype=torch.float64)},
                (prefix, m, k), grads=("h", "scale"), own_dtype=("saliency",), buffer="h",
                rows={"out": (first_patch, first_patch + patches), "h": (prefix, first_patch)},
                layouts={"h": "padded"} if strided else {})


def selected_rows(case: Case) -> torch.Tensor:
    """[B, T] bool: the rows METHOD.md's AE writes, the top-k patches by saliency."""
    prefix, m, k = case.args
    h, saliency = case.inputs["h"], case.inputs["saliency"]
    rows = torch.zeros(h.shape[:2], dtype=torch.bool)
    rows.scatter_(1, saliency.topk(k, dim=-1).indices + prefix + m, True)
    return rows


@pytest.mark.parametrize("backend,device,dtype,shape", value_cases(OP, SHAPES, LONG))
def test_matches_float64_reference(backend, device, dtype, shape):
    check(make(shape), backend, device, dtype)


@pytest.mark.parametrize("scale_dtype", [torch.float64, torch.float16], ids=["float64-scale", "float16-scale"])
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_a_scale_of_another_dtype_promotes_like_the_reference(backend, device, dtype, scale_dtype):
    """ae.scale in another dtype than h: u is added in h's dtype, the scale's gradient has its own."""
    case = make("class-token-M3-k3")
    case.inputs["scale"] = case.inputs["scale"].to(scale_dtype)
    case.own_dtype = ("saliency", "scale")
    check(case, backend, device, dtype)


def residual_case(residual_dtype: torch.dtype | None = None, shape: str = "class-token-M3-k3") -> Case:
    return with_residual(make(shape), residual_dtype)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_on_a_residual_sum(backend, device, dtype):
    """With ``residual``: the op on ``residual + h``, a new buffer (writing either input, leaves
    that require grad, would raise); the result's every row and both inputs' gradients."""
    check(residual_case(), backend, device, dtype)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float16, torch.bfloat16)))
def test_on_a_float32_residual_next_to_a_16bit_branch(backend, device, dtype):
    """The model's case under autocast: the residual stream in float32, the branch 16-bit; the sum
    in float32, the branch's gradient in its own dtype."""
    check(residual_case(torch.float32), backend, device, dtype)


def norm_case(dtype: torch.dtype, residual_dtype: torch.dtype | None = None, shape: str = 'class-token-M3-k3',
              affine: bool = True) -> Case:
    """The op with ``norm``: on a residual sum, that sum's LayerNorm too; every gradient, except in 16-bit
    the scale's: a sum over every row of 16-bit row gradients that the LayerNorm's backward makes cancel
    (eager itself misses its own bound there by 10x); float32 checks it."""
    case = with_norm(residual_case(residual_dtype, shape), affine)
    case.grads = tuple(g for g in ("h", "scale", "residual") if dtype == torch.float32 or g != "scale")
    return case


(test_with_the_layer_norm_of_the_sum,
 test_with_the_layer_norm_on_a_float32_residual_next_to_a_16bit_branch) = layer_norm_tests(OP, SHAPES, norm_case)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_buffer_with_padded_rows(backend, device, dtype):
    """The buffer as a view with unit last stride but padded outer strides."""
    check(make("class-token-M3-k3", strided=True), backend, device, dtype)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_reads_the_prompt_rows_and_writes_only_the_selected_rows(backend, device, dtype):
    case = make("class-token-M3-k3")
    touched = selected_rows(case)
    touched[:, 1:4] = True  # the prompt rows: u's mean, and the u path's gradient
    check_row_locality(case, backend, device, dtype, touched)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_saves_no_sequence_for_backward(backend, device, dtype):
    check_saves_no_buffer(make("class-token-M3-k3"), backend, device, dtype)


@pytest.mark.parametrize("needed", ["h", "scale"])
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_only_some_inputs_need_grad(backend, device, dtype, needed):
    case = make("registers-M5-k1")
    case.grads = (needed,)
    check(case, backend, device, dtype)


def test_reference_matches_the_definition():
    """The reference (eager float64): METHOD.md's AE written out here (u from h before the update,
    added to the top-k patch rows), and its gradients by finite differences."""
    case = make("class-token-M3-k3")
    h, saliency, scale = (case.inputs[n] for n in ("h", "saliency", "scale"))
    out = reference.ae_update(h.clone(), saliency, scale, *case.args)
    u = scale * h[:, 1:4].mean(dim=1)
    expected = h + selected_rows(case)[..., None] * u[:, None, :]
    assert rel_err(out, expected) < 1e-13
    leaves = [h[:, :10, :6].clone().requires_grad_(), scale.clone().requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda t, s: reference.ae_update(t.clone(), saliency[:, :6], s, 1, 3, 2), leaves)


@pytest.mark.parametrize("row", handed_over(OP))
def test_hand_over(row):
    check_hand_over(make("class-token-M3-k3"), row)
