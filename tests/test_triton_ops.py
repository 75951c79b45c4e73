"""Each Triton op against svpt.reference (float64 ground truth), forward and backward.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
tiny shapes, fp32 and fp16 (the interpreter's bf16 dot is wrong; bf16 runs in tests/gpu).
fp32: METHOD.md's bound, relative error < 1e-4 against float64. fp16: FlashAttention's rule,
error against float64 at most twice the eager fp16 error (plus a small floor), the float64
reference running on the same rounded inputs. On a CUDA machine the same tests run on the GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

import svpt
from svpt import reference
from numerics import rel_err

triton_backend = pytest.importorskip("svpt_kernels.triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_BOUND = 1e-4


def leaves(*tensors, dtype):
    return [t.to(DEVICE, dtype).requires_grad_(t.is_floating_point()) for t in tensors]


def run(fn, inputs, args, round_to=torch.float32, grad_seed=0):
    """Output(s) and the gradients of every differentiable input for a fixed random cotangent
    (drawn in float64, rounded to ``round_to``)."""
    out = fn(*inputs, *args)
    main = out[0] if isinstance(out, tuple) else out
    gen = torch.Generator().manual_seed(grad_seed)
    cotangent = torch.randn(main.shape, generator=gen, dtype=torch.float64).to(round_to).to(main)
    diff = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(main, diff, cotangent)
    return out, grads


def check(fn_name, make_inputs, args, dtype, extra_outputs=lambda out: []):
    """Compare backend vs float64 reference; in fp16 against 2x eager fp16's own error."""
    # inputs (and, in run, the cotangent) rounded to the tested dtype first: the float64
    # reference then sees the same values, so each backend's own error is what is measured
    base = [t.to(dtype).double() if t.is_floating_point() else t for t in make_inputs()]
    ref_out, ref_grads = run(getattr(reference, fn_name), leaves(*base, dtype=torch.float64), args, dtype)
    tri_out, tri_grads = run(getattr(triton_backend, fn_name), leaves(*base, dtype=dtype), args, dtype)
    pairs = [(tri_out[0] if isinstance(tri_out, tuple) else tri_out,
              ref_out[0] if isinstance(ref_out, tuple) else ref_out, "out")]
    pairs += [(a, b, "extra") for a, b in zip(extra_outputs(tri_out), extra_outputs(ref_out))]
    pairs += [(a, b, f"grad{i}") for i, (a, b) in enumerate(zip(tri_grads, ref_grads))]
    if dtype == torch.float32:
        eager = [None] * len(pairs)
    else:
        eager_out, eager_grads = run(getattr(reference, fn_name), leaves(*base, dtype=dtype), args, dtype)
        eager = ([eager_out[0] if isinstance(eager_out, tuple) else eager_out]
                 + list(extra_outputs(eager_out)) + list(eager_grads))
    for (got, want, name), eager_value in zip(pairs, eager):
        assert got.shape == want.shape, name
        assert torch.isfinite(got).all(), name
        if want.abs().max() == 0:  # e.g. dq with a single key: softmax is constant
            assert got.abs().max() < 100 * torch.finfo(dtype).eps, name
            continue
        err = rel_err(got, want)
        if eager_value is None:
            assert err < FP32_BOUND, (name, err)
        else:
            assert err <= 2 * rel_err(eager_value, want) + 2e-3, (name, err, rel_err(eager_value, want))


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ prompt_attention
def qkv_views(batch, tokens, heads, dim, seed, kv_batch=None, kv_tokens=None):
    """q from a strided [B, T, 3, H, D] qkv buffer (as the model's projection gives), k/v
    separately when their batch or length differ (CVPT's prompts)."""
    g = gen(seed)
    if kv_batch is None and kv_tokens is None:
        qkv = torch.randn(batch, tokens, 3, heads, dim, generator=g, dtype=torch.float64)
        return qkv.unbind(2)
    q = torch.randn(batch, tokens, heads, dim, generator=g, dtype=torch.float64)
    k = torch.randn(kv_batch, kv_tokens, heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(kv_batch, kv_tokens, heads, dim, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("dim", [32, 64, 80, 128])
def test_prompt_attention_forward_head_dims(dim):
    # T = 1 + 5 + 13 = 19 tokens: not a multiple of the block, saliency from the class token
    q, k, v = qkv_views(2, 19, 2, dim, seed=dim)
    scale = dim ** -0.5
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    out, sal = triton_backend.prompt_attention(q.float(), k.float(), v.float(), scale, (0, 1), 6)
    ref_out, ref_sal = reference.prompt_attention(q, k, v, scale, (0, 1), 6)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert sal.dtype == torch.float32 and sal.shape == (2, 13) and not sal.requires_grad
    assert rel_err(out, ref_out) < FP32_BOUND
    assert rel_err(sal, ref_sal) < FP32_BOUND


ATTENTION_CASES = {
    # name: (batch, Tq, heads, dim, kv_batch, Tk, saliency_rows, saliency_cols)
    "cls-saliency-M1": (2, 18, 2, 32, None, None, (0, 1), 2),          # 1 + M=1 + 16
    "prompt-saliency-M7": (2, 24, 2, 32, None, None, (1, 7), 8),       # 1 + M=7 + 16
    "two-prefix-M3": (1, 21, 2, 64, None, None, (2, 3), 5),            # n_p=2 (DeiT), M=3
    "cvpt-broadcast-kv": (3, 17, 2, 32, 1, 5, None, 0),                # k/v batch 1, Tk=M=5
    "cvpt-broadcast-kv-M1": (2, 17, 2, 32, 1, 1, None, 0),             # Tk = 1
    "long-T": (1, 37, 1, 80, None, None, (0, 1), 5),                   # > 2 blocks, D padded
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_prompt_attention_matches_reference(case, dtype):
    batch, tq, heads, dim, kv_batch, tk, rows, cols = ATTENTION_CASES[case]
    base = qkv_views(batch, tq, heads, dim, seed=len(case), kv_batch=kv_batch, kv_tokens=tk)
    check("prompt_attention", lambda: base, (dim ** -0.5, rows, cols), dtype,
          extra_outputs=lambda out: [] if rows is None else [out[1]])


def test_prompt_attention_saliency_is_head_and_row_mean_of_probabilities():
    q, k, v = (t.to(DEVICE) for t in qkv_views(2, 20, 3, 32, seed=9))
    _, sal = triton_backend.prompt_attention(q.float(), k.float(), v.float(), 0.3, (1, 4), 5)
    probs = ((q.transpose(1, 2) * 0.3) @ k.transpose(1, 2).transpose(-2, -1)).softmax(-1)
    expected = probs[:, :, 1:5, 5:].mean(dim=(1, 2))
    assert rel_err(sal, expected) < FP32_BOUND
    assert sal.sum(-1).lt(1).all()  # not renormalised: prefix and prompt columns are left out


def test_sdpa_route_matches_reference():
    """The fp16/bf16 GPU route without saliency (PyTorch SDPA), checked here in float64 on CPU
    against the reference: output and q/k/v gradients."""
    from svpt_kernels.triton.prompt_attention import _sdpa
    q, k, v = (t.double().requires_grad_() for t in qkv_views(2, 13, 3, 16, seed=4))
    got, sal = _sdpa(q, k, v, 0.4)
    want = reference.prompt_attention(q, k, v, 0.4)[0]
    assert sal is None and rel_err(got, want) < 1e-12
    grad = torch.randn_like(want)
    pairs = zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad))
    assert all(rel_err(g, w) < 1e-12 for g, w in pairs)


def test_prompt_attention_without_saliency_returns_none():
    q, k, v = (t.to(DEVICE) for t in qkv_views(1, 5, 1, 32, seed=1))
    out, sal = triton_backend.prompt_attention(q.float(), k.float(), v.float(), 1.0)
    assert sal is None and out.shape == (1, 5, 1, 32)


# ------------------------------------------------------------------ da_mix
def da_mix_inputs(batch, tokens, width, prompt_batch, num_prompts, bias, seed):
    g = gen(seed)
    return (torch.randn(batch, tokens, width, generator=g, dtype=torch.float64),
            torch.randn(prompt_batch, num_prompts, width, generator=g, dtype=torch.float64),
            0.2 * torch.randn(2, width, generator=g, dtype=torch.float64),
            torch.tensor(bias, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("prompt_batch,num_prompts,num_prefix,width", [
    (1, 5, 1, 64),   # shared prompts (gradient summed over the batch)
    (3, 1, 1, 48),   # per-sample prompts (prompt dropout), M = 1, width not a power of two
    (1, 7, 2, 40),   # two prefix tokens, M = 7
])
def test_da_mix_matches_reference(prompt_batch, num_prompts, num_prefix, width, dtype):
    base = da_mix_inputs(3, num_prefix + num_prompts + 9, width, prompt_batch, num_prompts, -0.5, seed=width)
    check("da_mix", lambda: base, (num_prefix,), dtype)


def test_da_mix_minus_infinite_bias_gives_the_prompts():
    tokens, prompts, weight, _ = (t.to(DEVICE) for t in da_mix_inputs(2, 12, 32, 1, 3, 0.0, seed=2))
    out = triton_backend.da_mix(tokens.float(), prompts.float(), weight.float(),
                                torch.tensor(-math.inf, device=DEVICE), 1)
    assert torch.equal(out[:, 1:4], prompts.float().expand(2, -1, -1))
    assert torch.equal(out[:, :1], tokens.float()[:, :1]) and torch.equal(out[:, 4:], tokens.float()[:, 4:])


def test_da_mix_mixed_dtypes_follow_the_reference():
    # under autocast the residual stream is fp32 while prompts may be cast: output promotes
    tokens, prompts, weight, bias = (t.to(DEVICE) for t in da_mix_inputs(2, 10, 32, 1, 2, 0.1, seed=3))
    out = triton_backend.da_mix(tokens.float(), prompts.half(), weight.float(), bias.float(), 1)
    assert out.dtype == torch.float32
    want = reference.da_mix(tokens, prompts.half().double(), weight, bias, 1)
    assert rel_err(out, want) < FP32_BOUND


# ------------------------------------------------------------------ ae_update
def ae_inputs(batch, tokens, width, num_patches, seed):
    g = gen(seed)
    return (torch.randn(batch, tokens, width, generator=g, dtype=torch.float64),
            torch.randn(batch, tokens, width, generator=g, dtype=torch.float64),
            torch.rand(batch, num_patches, generator=g, dtype=torch.float64).float(),
            torch.tensor(0.7, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_prefix,num_prompts,num_patches,k,width", [
    (1, 5, 16, 4, 64),
    (1, 1, 13, 1, 48),     # M = 1, k = 1
    (2, 7, 16, 16, 40),    # every patch selected
])
def test_ae_update_matches_reference(num_prefix, num_prompts, num_patches, k, width, dtype):
    tokens, attn_out, saliency, scale = ae_inputs(2, num_prefix + num_prompts + num_patches, width,
                                                  num_patches, seed=width + k)

    def op(backend):
        def fn(z, a, s):
            return getattr(backend, "ae_update")(z, a, saliency.to(DEVICE), s, num_prefix, num_prompts, k)
        return fn

    tokens, attn_out, scale = (t.to(dtype).double() for t in (tokens, attn_out, scale))
    ref_out, ref_grads = run(op(reference), leaves(tokens, attn_out, scale, dtype=torch.float64), (), dtype)
    tri_out, tri_grads = run(op(triton_backend), leaves(tokens, attn_out, scale, dtype=dtype), (), dtype)
    eager_out, eager_grads = run(op(reference), leaves(tokens, attn_out, scale, dtype=dtype), (), dtype)
    assert tri_out.dtype == dtype
    for got, want, eager in zip((tri_out, *tri_grads), (ref_out, *ref_grads), (eager_out, *eager_grads)):
        assert want.abs().max() > 0
        bound = FP32_BOUND if dtype == torch.float32 else 2 * rel_err(eager, want) + 2e-3
        assert rel_err(got, want) < bound


def test_ae_update_mixed_dtypes_promote_like_the_reference():
    # autocast: fp32 residual stream + fp16 attention output -> fp32 h; grads in each input's dtype
    tokens, attn_out, saliency, scale = (t.to(DEVICE) for t in ae_inputs(2, 20, 32, 14, seed=4))
    z, a, s = (tokens.float().requires_grad_(), attn_out.half().requires_grad_(),
               scale.float().requires_grad_())
    out = triton_backend.ae_update(z, a, saliency, s, 1, 5, 4)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert z.grad.dtype == torch.float32 and a.grad.dtype == torch.float16 and s.grad.dtype == torch.float32
    zr, ar, sr = (tokens.requires_grad_(), attn_out.half().double().requires_grad_(), scale.requires_grad_())
    want = reference.ae_update(zr, ar, saliency, sr, 1, 5, 4)
    want.sum().backward()
    assert rel_err(out, want) < FP32_BOUND
    assert rel_err(s.grad, sr.grad) < FP32_BOUND and rel_err(z.grad, zr.grad) < FP32_BOUND


# ------------------------------------------------------------------ backend selection
# ------------------------------------------------------------------ what backward keeps
def saved_numel(fn) -> int:
    """Elements of the tensors ``fn``'s autograd graph keeps for backward."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_da_mix_keeps_only_the_prompt_rows_for_backward():
    """The input sequence is the previous block's output, which nothing else keeps: saving it
    whole cost ~1 GB at ViT-B/16, batch 128 (benchmarks/results/bench_h200.md)."""
    tokens, prompts, weight, bias = (t.float().to(DEVICE).requires_grad_() for t in da_mix_inputs(3, 30, 32, 1, 4, 0.0, 5))
    saved = saved_numel(lambda: triton_backend.da_mix(tokens, prompts, weight, bias, 1))
    assert saved <= 3 * 4 * 32 + prompts.numel() + weight.numel() + 1


def test_ae_update_keeps_no_sequence_for_backward():
    tokens, attn_out, saliency, scale = ae_inputs(2, 1 + 5 + 16, 32, 16, seed=3)
    leaves_ = [t.float().to(DEVICE).requires_grad_() for t in (tokens, attn_out, scale)]
    saved = saved_numel(lambda: triton_backend.ae_update(leaves_[0], leaves_[1], saliency.float().to(DEVICE),
                                                         leaves_[2], 1, 5, 4))
    assert saved <= 2 * 32 + 2 * 4 + 1  # mean(h_prompt), the top-k indices, the scale


def test_why_unusable_reports_devices():
    assert triton_backend.AUTO_DEVICE_TYPES == ("cuda",)
    assert triton_backend.why_unusable(None) is None  # interpreter here, or a GPU
    if DEVICE == "cpu":
        assert triton_backend.why_unusable(torch.device("cpu")) is None
        assert "TRITON_INTERPRET" in (triton_backend.why_unusable(torch.device("cuda")) or "TRITON_INTERPRET")
    assert "meta" in triton_backend.why_unusable(torch.device("meta"))
    assert "triton" in svpt.available_backends(DEVICE)
