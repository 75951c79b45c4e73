"""attention_saliency (AE's saliency: the source rows' attention probabilities to the patch columns,
averaged over heads and rows) on every backend that declares it.

Against the float64 reference (opcheck.check; the op has no gradient). The selection on its own:
in fp32 the top-k patches of every backend's saliency are exactly the float64 reference's (the
GPU test in tests/gpu reports the share that agrees in bf16 at ViT-B/16 scale). Inputs: the class
token and the M prompt rows as sources (M over one block of rows), no prefix / registers, keys of
batch 1, head dims that are not powers of two, T over one block of keys, q and k as strided views
(as the model passes them).
"""
from __future__ import annotations

import pytest
import torch

from svpt import reference

from opcheck import (Case, check, check_hand_over, check_sized_route, execute, handed_over, kernel_backends, own_cases,
                     randn, value_cases)

OP = "attention_saliency"
# name: (batch, num_prefix, M, patches, heads, head dim, source, key batch)
SHAPES = {
    "class-token-D24": (2, 1, 3, 13, 2, 24, "cls", 2),
    "prompt-rows-D40": (2, 1, 5, 13, 2, 40, "prompt", 2),
    "registers-M17-prompt-rows": (1, 5, 17, 9, 2, 32, "prompt", 1),
    "no-prefix-shared-keys-D64": (2, 0, 3, 14, 1, 64, "prompt", 1),
}
LONG = {"vit-M50-prompt-rows-T247": (2, 1, 50, 196, 2, 64, "prompt", 2),  # past the kernels' tiles
        "vit-M70-class-token-T267": (2, 1, 70, 196, 2, 64, "cls", 2)}
# tests/gpu/test_ops_gpu.py: the op at ViT-B/16's sizes (d 768, 12 heads of 64, N 196)
VIT_B16 = {"vitb16-M50-class-token": (32, 1, 50, 196, 12, 64, "cls", 32),
           "vitb16-M50-prompt-rows": (32, 1, 50, 196, 12, 64, "prompt", 32)}


def make(name: str, seed: int = 0, head_dim: int | None = None) -> Case:
    batch, prefix, m, patches, heads, dim, source, key_batch = (SHAPES | LONG | VIT_B16)[name]
    dim = head_dim or dim
    gen = torch.Generator().manual_seed(seed + dim)
    tokens = prefix + m + patches
    q, k = randn(gen, batch, tokens, heads, dim), randn(gen, key_batch, tokens, heads, dim)
    rows = (0, 1) if source == "cls" else (prefix, m)
    return Case(OP, {"q": q, "k": k}, (dim ** -0.5, rows, prefix + m),
                layouts=dict.fromkeys("qk" if key_batch == batch else "q", "padded"))  # the model's views


@pytest.mark.parametrize("backend,device,dtype,shape", value_cases(OP, SHAPES, LONG))
def test_matches_float64_reference(backend, device, dtype, shape):
    check(make(shape), backend, device, dtype)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_selection_is_the_float64_selection(backend, device, dtype, shape, ratio):
    """The rows AE adds to: in fp32 exactly the patches float64 selects (the inputs are random, the
    gaps between saliencies far above fp32's rounding)."""
    case = make(shape)
    want = execute(case, None, device, dtype).out
    got = execute(case, backend, device, dtype)
    assert got.log == [(OP, backend)] and got.out.dtype == torch.float32
    k = max(1, round(ratio * want.shape[1]))
    ranked = want.sort(dim=-1, descending=True).values
    assert (ranked[:, k - 1] - ranked[:, k]).min() > 1e-4 * ranked[:, 0].min()  # well-posed: no near tie
    chosen, expected = (s.topk(k, dim=-1).indices.sort(dim=-1).values.cpu() for s in (got.out, want))
    assert torch.equal(chosen, expected)


def test_reference_matches_the_definition():
    """The reference (eager float64): METHOD.md's saliency written out here, for the class token
    and for the M prompt rows (their probability rows averaged, not a softmax of an averaged
    query; not renormalised over the patch columns)."""
    for name in ("class-token-D24", "prompt-rows-D40"):
        case = make(name)
        q, k = case.inputs["q"], case.inputs["k"]
        scale, (start, count), first_patch = case.args
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(scale).softmax(-1)
        expected = probs[:, :, start:start + count, first_patch:].mean(dim=(1, 2))
        got = reference.attention_saliency(q, k, *case.args)
        assert got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=0)
        assert got.sum(-1).lt(1).all()  # prefix and prompt columns are left out


@pytest.mark.parametrize("row", handed_over(OP))
def test_hand_over(row):
    check_hand_over(make("class-token-D24"), row)


@pytest.mark.parametrize("backend", kernel_backends(OP))
def test_head_dim_past_a_declared_limit(backend):
    check_sized_route(make("class-token-D24", head_dim=320), backend, {"head_dim": 320})
