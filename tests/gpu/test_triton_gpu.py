"""Triton backend on a CUDA GPU at ViT-B/16 shapes (run through the device tool).

    PYTHONPATH=. python -m pytest tests/gpu/test_triton_gpu.py -m gpu -v

Numerics (FlashAttention's rule, METHOD.md): in bf16/fp16 the fused error against a float64
reference is at most twice the eager error in the same dtype, plus a small floor; in fp32 the
relative error is below 1e-4 (or, where eager fp32 itself exceeds that, at most twice eager's).
Per op, the float64 reference runs on the same rounded inputs (as FlashAttention's tests do),
so input quantisation, which dominates scalar gradients such as da.bias, is not counted as the
backend's error. Whole models: fp32 parameters and images, bf16/fp16 by autocast, against the
float64 model. T = 1 + M + 196, width 768, 12 heads of 64.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import svpt
from svpt import reference
from numerics import rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS = [1, 7, 50, 100]
BATCHES = [1, 128]
FLOOR = {torch.float32: 0.0, torch.bfloat16: 2e-3, torch.float16: 5e-4}
HEADS, HEAD_DIM, WIDTH, PATCHES = 12, 64, 768, 196
TOPK_FLIP_FLOOR = 0.1


def within_rule(fused, eager, want, dtype):
    err, eager_err = rel_err(fused, want), rel_err(eager, want)
    if dtype == torch.float32:
        # METHOD.md's 1e-4; or, where eager fp32 itself misses it (gradients of the few DA/AE
        # scalars summed over 128 samples and 12 blocks cancel heavily), twice eager's error.
        return err < 1e-4 or err <= 2 * eager_err, err, eager_err
    return err <= 2 * eager_err + FLOOR[dtype], err, eager_err


def grads_of(fn, inputs, cotangent):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    main = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(main, inputs, cotangent.to(main.dtype))
    return out, grads


def report(name, rows):
    print(f"\n{name}")
    for label, ok, err, eager_err in rows:
        print(f"  {label:<14} fused {err:.3e}  eager {eager_err:.3e}  {'ok' if ok else 'FAIL'}")


# ------------------------------------------------------------------ ops at ViT-B/16 shapes
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("num_prompts", PROMPTS)
def test_prompt_attention_vitb(triton_ops, num_prompts, batch, dtype_name):
    dtype = DTYPES[dtype_name]
    tokens = 1 + num_prompts + PATCHES
    gen = torch.Generator(device="cuda").manual_seed(num_prompts * 1000 + batch)
    # a [B, T, 3, H, D] qkv buffer read through strided views, as the model does; logits ~ N(0, 1)
    qkv = torch.randn(batch, tokens, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=gen)
    cotangent = torch.randn(batch, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=gen)
    scale = HEAD_DIM ** -0.5
    rows = []
    for sal_rows in [(0, 1), (1, num_prompts)]:
        def call(ops, dt):
            return lambda q, k, v: ops.prompt_attention(q, k, v, scale, sal_rows, 1 + num_prompts)
        lo = [t.to(dtype) for t in qkv.unbind(2)]
        # float64 reference on the same rounded inputs: what is measured is each backend's own error
        want, want_g = grads_of(call(reference, None), [t.double() for t in lo], cotangent.to(dtype).double())
        eager, eager_g = grads_of(call(reference, dtype), lo, cotangent)
        fused, fused_g = grads_of(call(triton_ops, dtype), lo, cotangent)
        names = ["out", "saliency", "dq", "dk", "dv"]
        for name, f, e, w in zip(names, [fused[0], fused[1], *fused_g], [eager[0], eager[1], *eager_g],
                                 [want[0], want[1], *want_g]):
            rows.append((f"{name}{sal_rows}", *within_rule(f, e, w, dtype)))
    report(f"prompt_attention M={num_prompts} B={batch} {dtype_name}", rows)
    assert all(ok for _, ok, _, _ in rows), rows


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
def test_prompt_attention_cvpt_broadcast_vitb(triton_ops, batch, dtype_name):
    """CVPT: queries are the 197 image tokens, keys/values the M=50 prompts with batch 1."""
    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(batch)
    q = torch.randn(batch, 197, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=gen)
    k, v = torch.randn(2, 1, 50, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=gen)
    cotangent = torch.randn_like(q)

    def call(ops):
        return lambda q, k, v: ops.prompt_attention(q, k, v, HEAD_DIM ** -0.5)
    lo = [t.to(dtype) for t in (q, k, v)]
    want, want_g = grads_of(call(reference), [t.double() for t in lo], cotangent.to(dtype).double())
    eager, eager_g = grads_of(call(reference), lo, cotangent)
    fused, fused_g = grads_of(call(triton_ops), lo, cotangent)
    rows = [(n, *within_rule(f, e, w, dtype)) for n, f, e, w in
            zip(["out", "dq", "dk", "dv"], [fused[0], *fused_g], [eager[0], *eager_g], [want[0], *want_g])]
    report(f"prompt_attention CVPT broadcast B={batch} {dtype_name}", rows)
    assert all(ok for _, ok, _, _ in rows), rows


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("num_prompts", PROMPTS)
def test_da_mix_and_ae_update_vitb(triton_ops, num_prompts, dtype_name):
    dtype = DTYPES[dtype_name]
    batch, tokens = 128, 1 + num_prompts + PATCHES
    gen = torch.Generator(device="cuda").manual_seed(num_prompts)
    x = torch.randn(batch, tokens, WIDTH, device="cuda", dtype=torch.float64, generator=gen)
    prompts = torch.randn(1, num_prompts, WIDTH, device="cuda", dtype=torch.float64, generator=gen)
    weight = 0.05 * torch.randn(2, WIDTH, device="cuda", dtype=torch.float64, generator=gen)
    bias = torch.tensor(-0.5, device="cuda", dtype=torch.float64)
    attn_out = torch.randn_like(x)
    saliency = torch.rand(batch, PATCHES, device="cuda", generator=gen)
    scale = torch.tensor(0.3, device="cuda", dtype=torch.float64)
    cotangent = torch.randn_like(x)
    rows = []

    def da(ops):
        return lambda t, p, w, b: ops.da_mix(t, p, w, b, 1)
    lo = [x.to(dtype), prompts.to(dtype), weight.to(dtype), bias.to(dtype)]
    want, want_g = grads_of(da(reference), [t.double() for t in lo], cotangent.to(dtype).double())
    eager, eager_g = grads_of(da(reference), lo, cotangent)
    fused, fused_g = grads_of(da(triton_ops), lo, cotangent)
    for n, f, e, w in zip(["out", "dtokens", "dprompts", "dweight", "dbias"], [fused, *fused_g],
                          [eager, *eager_g], [want, *want_g]):
        rows.append((f"da_mix {n}", *within_rule(f, e, w, dtype)))

    def ae(ops):
        return lambda z, a, s: ops.ae_update(z, a, saliency, s, 1, num_prompts, 49)
    # autocast's mix: fp32 residual stream, low-precision attention output
    lo = [x.float(), attn_out.to(dtype), scale.float()]
    want, want_g = grads_of(ae(reference), [t.double() for t in lo], cotangent.float().double())
    eager, eager_g = grads_of(ae(reference), lo, cotangent)
    fused, fused_g = grads_of(ae(triton_ops), lo, cotangent)
    assert fused.dtype == eager.dtype == torch.float32
    for n, f, e, w in zip(["out", "dz", "da", "dscale"], [fused, *fused_g], [eager, *eager_g], [want, *want_g]):
        rows.append((f"ae_update {n}", *within_rule(f, e, w, dtype)))
    report(f"da_mix / ae_update M={num_prompts} B={batch} {dtype_name}", rows)
    assert all(ok for _, ok, _, _ in rows), rows


# ------------------------------------------------------------------ whole ViT-B/16 models
_BACKBONE = {}


def vit_b16(seed=0):
    """A fresh copy of one random ViT-B/16 (built once: re-drawing 86M weights takes seconds)."""
    if seed not in _BACKBONE:
        import timm
        from backbones import randomize_  # tests/: well-spread random weights (non-uniform attention)
        torch.manual_seed(seed)
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
        _BACKBONE[seed] = randomize_(model, seed).eval()
    return copy.deepcopy(_BACKBONE[seed])


def prompted_vit_b16(method, num_prompts, **options):
    model = svpt.prompt(vit_b16(), method, num_prompts, **options).cuda()
    with torch.no_grad():  # non-default trainables so every gradient path carries signal
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.startswith("prompter.da.weight"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif name.startswith("prompter.ae.scale"):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=gen))
    return model


def model_run(model, images, backend, dtype):
    model.zero_grad(set_to_none=True)
    with svpt.backend(backend), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32 and dtype != torch.float64):
        logits = model(images.to(next(model.parameters()).dtype))
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).reshape(logits.shape)
    (logits.float() * weights).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


MODEL_CASES = [("svpt", m, b) for m in PROMPTS for b in BATCHES] + [
    ("vpt-deep", 50, 32), ("vpt-shallow", 50, 32), ("cvpt", 50, 32), ("svpt-prompt-source", 50, 32)]


@pytest.mark.parametrize("method,num_prompts,batch", MODEL_CASES)
def test_whole_model_vitb(triton_ops, method, num_prompts, batch):
    options = {"ae_source": "prompt"} if method == "svpt-prompt-source" else {}
    model = prompted_vit_b16(method.replace("-prompt-source", ""), num_prompts, **options)
    images = torch.randn(batch, 3, 224, 224, device="cuda", generator=torch.Generator(device="cuda").manual_seed(batch))
    want_logits, want_grads = model_run(copy.deepcopy(model).double(), images, "eager", torch.float64)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        eager_logits, eager_grads = model_run(model, images, "eager", dtype)
        fused_logits, fused_grads = model_run(model, images, "triton", dtype)
        rows.append((f"{dtype_name} logits", *within_rule(fused_logits, eager_logits, want_logits, dtype)))
        for name in want_grads:
            ok, err, eager_err = within_rule(fused_grads[name], eager_grads[name], want_grads[name], dtype)
            if name == "prompter.ae.scale" and dtype != torch.float32:
                # A scalar summed over all blocks that jumps whenever a top-k selection flips, and
                # 16-bit q/k flip near-ties for both backends (eager's own error ranged 5e-4 to 1e-1
                # across these cases): the factor-2 rule only holds beyond that discrete noise.
                ok = err <= 2 * eager_err + TOPK_FLIP_FLOOR
            rows.append((f"{dtype_name} {name.replace('prompter.', '')}", ok, err, eager_err))
    report(f"whole model {method} M={num_prompts} B={batch}", rows)
    assert all(ok for _, ok, _, _ in rows), rows


def test_compile_fullgraph_inductor(triton_ops):
    model = prompted_vit_b16("svpt", 7)
    model.blocks = model.blocks[:2]  # two blocks: the point is tracing, not the depth
    images = torch.randn(4, 3, 224, 224, device="cuda")
    with svpt.backend("triton"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = model(images).float()
            compiled = torch.compile(model, fullgraph=True)
            got = compiled(images).float()
        got.sum().backward()
    assert rel_err(got, expected) < 2e-2
    assert model.prompter.prompts.grad.abs().max() > 0


# ------------------------------------------------------------------ 50-step training
def train_curve(backend, dtype, steps=50, batch=32):
    model = prompted_vit_b16("svpt", 50)
    gen = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(4 * batch, 3, 224, 224, device="cuda", generator=gen)
    labels = torch.randint(0, 10, (4 * batch,), device="cuda", generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    with svpt.backend(backend):
        for step in range(steps):
            sel = slice((step % 4) * batch, (step % 4 + 1) * batch)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                loss = torch.nn.functional.cross_entropy(model(images[sel]).float(), labels[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def test_training_loss_curve_bf16(triton_ops):
    reference_curve = train_curve("eager", torch.float32)
    eager_curve = train_curve("eager", torch.bfloat16)
    fused_curve = train_curve("triton", torch.bfloat16)
    eager_dev = max(abs(a - b) for a, b in zip(eager_curve, reference_curve))
    fused_dev = max(abs(a - b) for a, b in zip(fused_curve, reference_curve))
    print("\n50-step SVPT training (ViT-B/16, M=50, batch 32): loss every 5 steps")
    for i in range(0, 50, 5):
        print(f"  step {i:2d}  fp32 eager {reference_curve[i]:.4f}  bf16 eager {eager_curve[i]:.4f}  "
              f"bf16 fused {fused_curve[i]:.4f}")
    print(f"  final: fp32 eager {reference_curve[-1]:.4f}  bf16 eager {eager_curve[-1]:.4f}  bf16 fused {fused_curve[-1]:.4f}")
    print(f"  max |bf16 eager - fp32 eager| = {eager_dev:.4f}; max |bf16 fused - fp32 eager| = {fused_dev:.4f}")
    assert all(math.isfinite(x) for x in fused_curve)
    assert fused_curve[-1] < fused_curve[0]  # it trains
    assert fused_dev <= 2 * eager_dev + 0.02
