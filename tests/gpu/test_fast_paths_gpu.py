"""The fast paths on a CUDA GPU at ViT-B/16 shapes (run through the device tool).

    PYTHONPATH=. python -m pytest tests/gpu/test_fast_paths_gpu.py -m gpu -v -s

Same numerics rule as test_triton_gpu.py (whose helpers are reused): fp32 relative error
< 1e-4 against float64 (or at most twice eager fp32's where eager itself misses it), bf16 at
most twice the eager error in the same dtype plus a small floor. Ops: float64 reference on the
same rounded inputs. Whole models: fp32 parameters and images, bf16 by autocast, fast path
(Triton) vs plain path (eager, same dtype) vs the float64 model.
"""
from __future__ import annotations

import copy

import pytest
import torch

import svpt
from svpt import reference
from test_triton_gpu import grads_of, model_run, prompted_vit_b16, report, within_rule

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEADS, HEAD_DIM, WIDTH, TOKENS = 12, 64, 768, 197


def compare(name, fn, triton_ops, inputs, cotangent, dtype, labels):
    """``fn(module)`` -> the callable under test; fused and eager vs float64 on the same rounded inputs."""
    lo = [t.to(dtype) for t in inputs]
    want, want_g = grads_of(fn(reference), [t.double() for t in lo], cotangent.to(dtype).double())
    eager, eager_g = grads_of(fn(reference), lo, cotangent)
    fused, fused_g = grads_of(fn(triton_ops), lo, cotangent)
    rows = [(label, *within_rule(f, e, w, dtype))
            for label, f, e, w in zip(labels, [fused, *fused_g], [eager, *eager_g], [want, *want_g])]
    report(name, rows)
    assert all(ok for _, ok, _, _ in rows), rows


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", [1, 128])
def test_prompt_kv_attention_vitb(triton_ops, batch, dtype_name):
    """VPT-deep M=50: queries = the 197 image tokens, keys = 50 prompt keys (batch 1) + 197."""
    gen = torch.Generator(device="cuda").manual_seed(batch)
    q, k, v = torch.randn(3, batch, TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=gen)
    pk, pv = torch.randn(2, 1, 50, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=gen)
    compare(f"prompt_kv_attention M=50 B={batch} {dtype_name}",
            lambda ops: lambda *t: ops.prompt_kv_attention(*t, HEAD_DIM ** -0.5), triton_ops,
            [q, k, v, pk, pv], torch.randn_like(q), DTYPES[dtype_name],
            ["out", "dq", "dk", "dv", "dprompt_k", "dprompt_v"])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("num_prompts", [10, 50])
def test_folded_cross_attention_vitb(triton_ops, num_prompts, dtype_name):
    """CVPT: 128 x 197 token rows of width 768, 12 heads x M prompts, residual = x."""
    gen = torch.Generator(device="cuda").manual_seed(num_prompts)
    x = torch.randn(128, TOKENS, WIDTH, device="cuda", dtype=torch.float64, generator=gen)
    # logits ~ N(0, 1-ish): folded weights of unit-variance keys through a 1/sqrt(d) projection
    w_logits = torch.randn(HEADS, num_prompts, WIDTH, device="cuda", dtype=torch.float64, generator=gen) / WIDTH ** 0.5
    b_logits = torch.randn(HEADS, num_prompts, device="cuda", dtype=torch.float64, generator=gen)
    w_values = torch.randn(HEADS, num_prompts, WIDTH, device="cuda", dtype=torch.float64, generator=gen)
    bias = torch.randn(WIDTH, device="cuda", dtype=torch.float64, generator=gen)
    compare(f"folded_cross_attention M={num_prompts} {dtype_name}",
            lambda ops: lambda x, wl, bl, wv: ops.folded_cross_attention(x, wl, bl, wv, bias.to(x.dtype), x),
            triton_ops, [x, w_logits, b_logits, w_values], torch.randn_like(x), DTYPES[dtype_name],
            ["out", "dx", "dw_logits", "db_logits", "dw_values"])


@pytest.mark.parametrize("method,num_prompts,options", [
    ("vpt-deep", 50, {}), ("cvpt", 10, {}), ("cvpt", 10, {"cvpt_position": 2})])
def test_whole_model_fast_path_vitb(triton_ops, monkeypatch, method, num_prompts, options):
    op = {"vpt-deep": "prompt_kv_attention", "cvpt": "folded_cross_attention"}[method]
    calls = []
    real = getattr(triton_ops, op)
    monkeypatch.setattr(triton_ops, op, lambda *a: calls.append(1) or real(*a))
    model = prompted_vit_b16(method, num_prompts, **options)
    images = torch.randn(32, 3, 224, 224, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    want_logits, want_grads = model_run(copy.deepcopy(model).double(), images, "eager", torch.float64)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        eager_logits, eager_grads = model_run(model, images, "eager", dtype)  # the plain path
        calls.clear()
        fused_logits, fused_grads = model_run(model, images, "triton", dtype)
        assert len(calls) == len(model.blocks), "the fast path did not run"
        rows.append((f"{dtype_name} logits", *within_rule(fused_logits, eager_logits, want_logits, dtype)))
        for name in want_grads:
            rows.append((f"{dtype_name} {name.replace('prompter.', '')}",
                         *within_rule(fused_grads[name], eager_grads[name], want_grads[name], dtype)))
    report(f"whole model {method} M={num_prompts} {options or ''} B=32: fast (triton) vs plain (eager)", rows)
    assert all(ok for _, ok, _, _ in rows), rows
