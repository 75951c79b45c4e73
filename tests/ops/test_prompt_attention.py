"""prompt_attention (softmax attention; CVPT's cross-attention with prompts of batch 1) on every
backend that declares it, and on the SDPA provider the backends may prefer.

Against the float64 reference (opcheck.check): the output and the q/k/v gradients. In 16-bit the
only allowance beyond 2x eager's error is FlashAttention's D rounding (numerics.flash_delta_moves,
shown tight in test_prompt_kv_attention.py). Inputs: q/k/v as the strided views of one projection,
T over one and over two blocks, head dims that are not powers of two (padded), keys/values of
batch 1 broadcast over the batch (their gradients summed), more prompts than one key block.
"""
from __future__ import annotations

import pytest
import torch

import svpt.sdpa
from svpt import reference

from numerics import rel_err
from opcheck import (Case, DEVICES, DTYPES, check, check_hand_over, check_sized_route, flash_floors, handed_over,
                     kernel_backends, own_cases, randn, value_cases)

OP = "prompt_attention"
FLASH = flash_floors("q", [("k", "v")])
# name: (batch, queries, heads, head dim, key batch, keys); key batch None: self-attention views
SHAPES = {
    "self-attention-T19-D24": (2, 19, 2, 24, None, None),
    "self-attention-T37-D80": (1, 37, 2, 80, None, None),
    "cvpt-prompts-batch1-M5": (2, 17, 2, 32, 1, 5),
    "cvpt-prompts-batch1-M17-D40": (2, 9, 2, 40, 1, 17),
}
LONG = {"self-attention-T267-D64": (2, 267, 2, 64, None, None),  # past the kernels' 256-row tiles
        "cvpt-prompts-batch1-M50-T197": (2, 197, 2, 64, 1, 50)}
# tests/gpu/test_ops_gpu.py: the op at ViT-B/16's sizes (d 768, 12 heads of 64, N 196)
VIT_B16 = {"vitb16-self-attention-M50": (32, 247, 12, 64, None, None),
           "vitb16-cvpt-prompts-M50": (32, 197, 12, 64, 1, 50)}


def make(name: str, seed: int = 0, head_dim: int | None = None) -> Case:
    batch, queries, heads, dim, key_batch, keys = (SHAPES | LONG | VIT_B16)[name]
    dim = head_dim or dim
    gen = torch.Generator().manual_seed(seed + dim)
    q = randn(gen, batch, queries, heads, dim)
    k, v = (randn(gen, key_batch or batch, keys or queries, heads, dim) for _ in range(2))
    return Case(OP, {"q": q, "k": k, "v": v}, (dim ** -0.5,), grads=("q", "k", "v"),
                layouts=dict.fromkeys("qkv" if key_batch is None else "q", "padded"))


@pytest.mark.parametrize("backend,device,dtype,shape", value_cases(OP, SHAPES, LONG))
def test_matches_float64_reference(backend, device, dtype, shape):
    check(make(shape), backend, device, dtype, floors=FLASH)


@pytest.mark.parametrize("needed", ["q", "k", "v"])
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_only_some_inputs_need_grad(backend, device, dtype, needed):
    case = make("cvpt-prompts-batch1-M5")
    case.grads = (needed,)
    check(case, backend, device, dtype)


@pytest.mark.parametrize("shape", ["self-attention-T19-D24", "cvpt-prompts-batch1-M5"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_provider_matches_float64_reference(device, dtype, shape):
    """PyTorch's SDPA, which backends name in PREFER (16-bit attention on CUDA), called directly."""
    check(make(shape), "sdpa", device, dtype, floors=FLASH, provider=svpt.sdpa.prompt_attention)


def test_reference_matches_the_definition():
    """The reference (eager float64): softmax(q k^T scale) v per head written out here, a batch-1
    key/value broadcast, and its gradients by finite differences."""
    case = make("cvpt-prompts-batch1-M5")
    q, k, v = (case.inputs[n] for n in "qkv")
    scale = case.args[0]
    out = reference.prompt_attention(q, k, v, scale)
    probs = torch.einsum("bqhd,bkhd->bhqk", q, k.expand(2, -1, -1, -1)).mul(scale).softmax(-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v.expand(2, -1, -1, -1))
    assert rel_err(out, expected) < 1e-13
    small = [t[:, :4, :, :6].clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: reference.prompt_attention(*t, 0.5), small)


@pytest.mark.parametrize("row", handed_over(OP))
def test_hand_over(row):
    check_hand_over(make("self-attention-T19-D24"), row)


@pytest.mark.parametrize("backend", kernel_backends(OP))
def test_head_dim_past_a_declared_limit(backend):
    check_sized_route(make("cvpt-prompts-batch1-M5", head_dim=320), backend, {"head_dim": 320})
