"""da_mix (SVPT's CDC + DA, in place on the prompt rows) on every backend that declares it.

Against the float64 reference (opcheck.check): the mixed rows and every input gradient. The
in-place contract (svpt/ops.py): only the M prompt rows change, forward and backward (the other
rows, partly NaN, are compared bit for bit and must not leak into the result), the op returns
the buffer it was given, and nothing of size [B, T, d] is saved for backward. Inputs exercise
every term: both halves of the gate's weight, its bias, shared (batch 1) and per-sample prompts,
no prefix / a class token / registers, M over one kernel block, odd widths.
"""
from __future__ import annotations

import math

import pytest
import torch

from svpt import reference

from numerics import rel_err
from opcheck import (Case, check, check_hand_over, check_row_locality, check_saves_no_buffer, execute, handed_over,
                     own_cases, layer_norm_tests, randn, value_cases, with_norm, with_residual)

OP = "da_mix"
# name: (batch, num_prefix, M, patches, width, prompt batch)
SHAPES = {
    "class-token-M3-shared-prompts": (2, 1, 3, 13, 40, 1),
    "registers-M5-per-sample-prompts": (2, 5, 5, 9, 24, 2),
    "no-prefix-M1": (2, 0, 1, 11, 48, 1),
    "M17-two-row-blocks-batch1": (1, 1, 17, 6, 40, 1),
}
LONG = {"vit-tiny-M10-N196": (2, 1, 10, 196, 192, 1)}  # ViT-Ti/16's rows: past the kernels' row tiles
# tests/gpu/test_ops_gpu.py: the op at ViT-B/16's sizes (d 768, 12 heads of 64, N 196)
VIT_B16 = {"vitb16-M50": (64, 1, 50, 196, 768, 1), "vitb16-M10-per-sample-prompts": (64, 1, 10, 196, 768, 64)}


def make(name: str, bias: float = 0.3, seed: int = 0, strided: bool = False) -> Case:
    batch, prefix, m, patches, width, prompt_batch = (SHAPES | LONG | VIT_B16)[name]
    gen = torch.Generator().manual_seed(seed + width)
    rows = (prefix, prefix + m)
    return Case(OP, {"tokens": randn(gen, batch, prefix + m + patches, width),
                     "prompts": randn(gen, prompt_batch, m, width),
                     "weight": randn(gen, 2, width, std=width ** -0.5),  # both halves: gate logits ~ N(0, 2)
                     "bias": torch.tensor(bias, dtype=torch.float64)},
                (prefix,), grads=("tokens", "prompts", "weight", "bias"), buffer="tokens",
                rows={"out": rows, "tokens": rows}, layouts={"tokens": "padded"} if strided else {})


@pytest.mark.parametrize("backend,device,dtype,shape", value_cases(OP, SHAPES, LONG))
def test_matches_float64_reference(backend, device, dtype, shape):
    check(make(shape), backend, device, dtype)


def residual_case(residual_dtype: torch.dtype | None = None, shape: str = "class-token-M3-shared-prompts") -> Case:
    case = with_residual(make(shape), residual_dtype)
    if residual_dtype is not None:  # as in the model: the gate's inputs in the residual stream's dtype
        case.inputs |= {name: case.inputs[name].to(residual_dtype) for name in ("prompts", "weight", "bias")}
        case.own_dtype += ("prompts", "weight", "bias")
    case.grads = ("tokens", "residual")  # the gate's own gradients: test_matches_float64_reference
    return case


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_on_a_residual_sum(backend, device, dtype):
    """With ``residual``: the op on ``residual + tokens``, a new buffer (writing either input, leaves
    that require grad, would raise); the result's every row and both inputs' gradients."""
    check(residual_case(), backend, device, dtype)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float16, torch.bfloat16)))
def test_on_a_float32_residual_next_to_a_16bit_branch(backend, device, dtype):
    """The model's case under autocast: the residual stream in float32, the branch 16-bit; the sum
    in float32, the branch's gradient in its own dtype."""
    check(residual_case(torch.float32), backend, device, dtype)


def norm_case(dtype: torch.dtype, residual_dtype: torch.dtype | None = None, shape: str = 'class-token-M3-shared-prompts',
              affine: bool = True) -> Case:
    """The op with ``norm``: on a residual sum, that sum's LayerNorm too; every gradient, except in 16-bit
    the bias's: a sum over every row of 16-bit row gradients that the LayerNorm's backward makes cancel
    (eager itself misses its own bound there by 10x); float32 checks it."""
    case = with_norm(residual_case(residual_dtype, shape), affine)
    case.grads = tuple(g for g in ("tokens", "prompts", "weight", "bias", "residual") if dtype == torch.float32 or g != "bias")
    return case


(test_with_the_layer_norm_of_the_sum,
 test_with_the_layer_norm_on_a_float32_residual_next_to_a_16bit_branch) = layer_norm_tests(OP, SHAPES, norm_case)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_buffer_with_padded_rows(backend, device, dtype):
    """The buffer as a view with unit last stride but padded outer strides."""
    check(make("class-token-M3-shared-prompts", strided=True), backend, device, dtype)


@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_under_autocast_as_the_model_calls_it(backend, device, dtype, autocast):
    """fp32 residual stream and parameters under autocast: the reference's gate products run in the
    autocast dtype; a backend is held to 2x that error (or does better)."""
    case = make("class-token-M3-shared-prompts")
    case.autocast = autocast
    check(case, backend, device, dtype)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_a_float64_bias_promotes_like_the_reference(backend, device, dtype):
    """The bias is not multiplied: any float dtype is accepted, and the result has the tokens' dtype."""
    case = make("class-token-M3-shared-prompts")
    case.own_dtype = ("bias",)
    check(case, backend, device, dtype)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_minus_infinite_bias_gives_the_prompts(backend, device, dtype):
    case = make("registers-M5-per-sample-prompts", bias=-math.inf)
    prefix, m = 5, 5
    run = execute(case, backend, device, dtype)
    assert run.log == [(OP, backend)]
    assert torch.equal(run.out[:, prefix:prefix + m].cpu(), case.inputs["prompts"].to(dtype))
    for name in ("weight", "bias"):  # the gate is exactly 0 and saturated
        assert torch.equal(run.grads[name], torch.zeros_like(run.grads[name])), name


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_reads_and_writes_only_the_prompt_rows(backend, device, dtype):
    case = make("class-token-M3-shared-prompts")
    touched = torch.zeros(case.inputs["tokens"].shape[:2], dtype=torch.bool)
    touched[:, 1:4] = True
    check_row_locality(case, backend, device, dtype, touched)


@pytest.mark.parametrize("backend,device,dtype", own_cases(OP))
def test_saves_no_sequence_for_backward(backend, device, dtype):
    """The buffer is the previous block's output, which nothing else keeps: saving it (or a view
    of it) cost ~1 GB at ViT-B/16, batch 128 (benchmarks/results/bench_h200.md)."""
    check_saves_no_buffer(make("class-token-M3-shared-prompts"), backend, device, dtype)


@pytest.mark.parametrize("needed", ["tokens", "prompts", "weight", "bias"])
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_only_some_inputs_need_grad(backend, device, dtype, needed):
    case = make("registers-M5-per-sample-prompts")
    case.grads = (needed,)
    check(case, backend, device, dtype)


@pytest.mark.parametrize("prompt_batch", [1, 2])
def test_reference_matches_the_definition(prompt_batch):
    """The reference (eager float64), the ground truth of every other case: METHOD.md's formula
    written out here, and its gradients by finite differences."""
    gen = torch.Generator().manual_seed(prompt_batch)
    tokens, prompts = randn(gen, 2, 9, 6), randn(gen, prompt_batch, 3, 6)
    weight, bias = randn(gen, 2, 6), randn(gen)
    out = reference.da_mix(tokens.clone(), prompts, weight, bias, 2)
    p_out = tokens[:, 2:5]
    gate = torch.sigmoid(torch.einsum("bmd,d->bm", p_out, weight[0])
                         + torch.einsum("bmd,d->bm", prompts.expand(2, -1, -1), weight[1]) + bias)[..., None]
    expected = torch.cat([tokens[:, :2], gate * p_out + (1 - gate) * prompts, tokens[:, 5:]], dim=1)
    assert rel_err(out, expected) < 1e-13
    leaves = [t.requires_grad_() for t in (tokens, prompts, weight, bias)]
    assert torch.autograd.gradcheck(lambda t, *a: reference.da_mix(t.clone(), *a, 2), leaves)


@pytest.mark.parametrize("row", handed_over(OP))
def test_hand_over(row):
    check_hand_over(make("class-token-M3-shared-prompts"), row)
