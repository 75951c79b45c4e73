"""The C++ extension's CUDA kernels (backend "cpp") at ViT-B/16 shapes (device tool).

    PYTHONPATH=. python -m pytest tests/gpu/test_cpp_gpu.py -m gpu -v -s

T = 1 + M + 196, width 768, 12 heads of 64, M in (1, 50); the fast-path ops at batch 64:
prompt_kv_attention with T = 197 token keys + an M = 50 prompt segment, folded_cross_attention
with 12 heads x M = 10 prompts, d = 768. Numerics (METHOD.md, FlashAttention's rule): per op,
the float64 reference runs on the same rounded inputs; in fp32 the relative error is below 1e-4,
in bf16 at most twice eager's error in the same dtype plus one rounding (2^-8: a scalar such
as da.bias's gradient is one rounded sum, which eager may round closer by chance). The float64
reference sees the rounded cotangent too. float64: below 1e-10.
"""
from __future__ import annotations

import copy

import pytest
import torch

import svpt
from svpt import reference
from numerics import LOW_PRECISION_FLOOR

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HEADS, HEAD_DIM, WIDTH, PATCHES, BATCH = 12, 64, 768, 196, 8
FAST_BATCH, KV_PROMPTS, FOLD_PROMPTS = 64, 50, 10  # the fast-path ops: VPT-deep M=50, CVPT M=10
FAST_OPS = ("prompt_kv_attention", "folded_cross_attention")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@pytest.fixture(scope="module")
def cpp():
    torch.backends.cuda.matmul.allow_tf32 = False  # eager fp32 must be full fp32 too
    torch.backends.cudnn.allow_tf32 = False
    from svpt_kernels import cpp as module
    reason = module.why_unusable(torch.device("cuda"))
    assert reason is None, f"the CUDA kernels must be built for these tests: {reason}"
    print("\n" + module.build_info())
    return module


def rel_err(a, b, denom=None):
    """||a - b|| / ||b||; where the reference is exactly zero (M=1 cross-attention: a softmax over
    one key gives q and k no gradient), relative to ``denom`` (the cotangent's norm) instead."""
    a, b = a.detach().double(), b.detach().double()
    norm = b.norm()
    if norm == 0 and denom is not None:
        norm = denom
    return ((a - b).norm() / norm.clamp_min(1e-300)).item()


def within_rule(fused, eager, want, dtype, denom=None):
    ef, ee = rel_err(fused, want, denom), rel_err(eager, want, denom)
    if dtype == torch.float64:
        return ef < 1e-10, ef, ee
    if dtype == torch.float32:
        return ef < 1e-4 or ef <= 2 * ee, ef, ee
    return ef <= 2 * ee + LOW_PRECISION_FLOOR[dtype], ef, ee


def outputs_and_grads(fn, inputs, cotangent):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    main = out[0] if isinstance(out, tuple) else out
    diff = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(main, diff, cotangent.to(main.dtype))
    return out, grads


def compare(name, op, cpp, inputs, cotangent, dtype, labels):
    """``op(module)`` -> the callable under test; cpp and eager vs float64 on the same rounded inputs."""
    lo = [t.to(dtype) for t in inputs]
    want, want_g = outputs_and_grads(op(reference), [t.double() for t in lo], cotangent.to(dtype).double())
    eager, eager_g = outputs_and_grads(op(reference), lo, cotangent)
    fused, fused_g = outputs_and_grads(op(cpp), lo, cotangent)
    main = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    rows = [("out", *within_rule(main(fused), main(eager), main(want), dtype))]
    denom = cotangent.double().norm()
    rows += [(f"d{label}", *within_rule(f, e, w, dtype, denom))
             for label, f, e, w in zip(labels, fused_g, eager_g, want_g)]
    if isinstance(fused, tuple) and fused[1] is not None:  # saliency, float32 in every backend
        ok, ef, ee = within_rule(fused[1], eager[1], want[1], dtype)
        rows.append(("saliency", ef <= 2 * ee + 1e-5, ef, ee))
    for label, ok, ef, ee in rows:
        print(f"  {name:<34} {label:<9} cpp {ef:.3e}  eager {ee:.3e}  {'ok' if ok else 'FAIL'}")
    assert all(ok for _, ok, _, _ in rows), rows


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("num_prompts", [1, 50])
@pytest.mark.parametrize("source", ["cls", "prompt"])
def test_prompt_attention_vit_b16(cpp, dtype_name, num_prompts, source):
    dtype, tokens = DTYPES[dtype_name], 1 + num_prompts + PATCHES
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(BATCH, tokens, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)
    rows = (0, 1) if source == "cls" else (1, num_prompts)
    cot = torch.randn(BATCH, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)

    def op(mod):
        def f(qkv):
            q, k, v = qkv.unbind(2)  # strided views, as the methods pass them
            return mod.prompt_attention(q, k, v, HEAD_DIM ** -0.5, rows, 1 + num_prompts)
        return f

    compare(f"attention {dtype_name} M={num_prompts} {source}", op, cpp, [qkv], cot, dtype, ["qkv"])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("num_prompts", [1, 50])
def test_cvpt_cross_attention_vit_b16(cpp, dtype_name, num_prompts):
    dtype = DTYPES[dtype_name]
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(BATCH, 1 + PATCHES, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)
    k = torch.randn(1, num_prompts, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)
    v = torch.randn(1, num_prompts, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)
    cot = torch.randn_like(q)

    def op(mod):
        return lambda q, k, v: mod.prompt_attention(q, k, v, HEAD_DIM ** -0.5)

    compare(f"cross-attention {dtype_name} M={num_prompts}", op, cpp, [q, k, v], cot, dtype, "qkv")


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("num_prompts", [1, 50])
def test_da_mix_vit_b16(cpp, dtype_name, num_prompts):
    dtype, tokens = DTYPES[dtype_name], 1 + num_prompts + PATCHES
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(BATCH, tokens, WIDTH, device="cuda", dtype=torch.float64, generator=g)
    p = torch.randn(1, num_prompts, WIDTH, device="cuda", dtype=torch.float64, generator=g)
    w = 0.05 * torch.randn(2, WIDTH, device="cuda", dtype=torch.float64, generator=g)
    b = torch.tensor(-0.5, device="cuda", dtype=torch.float64)
    cot = torch.randn_like(x)

    def op(mod):
        return lambda x, p, w, b: mod.da_mix(x, p, w, b, 1)

    compare(f"da_mix {dtype_name} M={num_prompts}", op, cpp, [x, p, w, b], cot, dtype,
            ["tokens", "prompts", "weight", "bias"])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("num_prompts", [1, 50])
def test_ae_update_vit_b16(cpp, dtype_name, num_prompts):
    dtype, tokens = DTYPES[dtype_name], 1 + num_prompts + PATCHES
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(BATCH, tokens, WIDTH, device="cuda", dtype=torch.float64, generator=g)
    a = torch.randn(BATCH, tokens, WIDTH, device="cuda", dtype=torch.float64, generator=g)
    sal = torch.rand(BATCH, PATCHES, device="cuda", generator=g)  # float32, as the op receives it
    scale = torch.tensor(0.7, device="cuda", dtype=torch.float64)
    cot = torch.randn_like(x)

    def op(mod):
        return lambda x, a, scale: mod.ae_update(x, a, sal, scale, 1, num_prompts, 49)

    compare(f"ae_update {dtype_name} M={num_prompts}", op, cpp, [x, a, scale], cot, dtype,
            ["tokens", "attn_out", "scale"])


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("prompt_batch", ["shared", "per-sample"])
def test_prompt_kv_attention_vit_b16(cpp, dtype_name, prompt_batch):
    """VPT-deep's KV-only attention: queries = the 197 image tokens, keys = M=50 prompt keys (batch 1,
    or per sample as with prompt dropout) + the tokens' own; q/k/v as views of one qkv tensor."""
    dtype, tokens = DTYPES[dtype_name], 1 + PATCHES
    g = torch.Generator(device="cuda").manual_seed(5)
    qkv = torch.randn(FAST_BATCH, tokens, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)
    pkv = torch.randn(1 if prompt_batch == "shared" else FAST_BATCH, KV_PROMPTS, 2, HEADS, HEAD_DIM, device="cuda",
                      dtype=torch.float64, generator=g)
    cot = torch.randn(FAST_BATCH, tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.float64, generator=g)

    def op(mod):
        def f(qkv, pkv):
            return mod.prompt_kv_attention(*qkv.unbind(2), *pkv.unbind(2), HEAD_DIM ** -0.5)
        return f

    compare(f"prompt_kv_attention {dtype_name} {prompt_batch}", op, cpp, [qkv, pkv], cot, dtype,
            ["qkv", "prompt_kv"])


def fold_inputs(seed: int, residual: str) -> list[torch.Tensor]:
    """x [64, 197, 768], w_logits / w_values [12, 10, 768], b_logits [12, 10], bias [768] and, for
    ``residual="other"``, that residual; logits ~ N(0, 1): folded weights of unit-variance keys
    through a 1/sqrt(d) projection."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    f64 = dict(device="cuda", dtype=torch.float64, generator=g)
    x = torch.randn(FAST_BATCH, 1 + PATCHES, WIDTH, **f64)
    w_logits = torch.randn(HEADS, FOLD_PROMPTS, WIDTH, **f64) / WIDTH ** 0.5
    b_logits = torch.randn(HEADS, FOLD_PROMPTS, **f64)
    w_values = torch.randn(HEADS, FOLD_PROMPTS, WIDTH, **f64) / HEADS ** 0.5
    bias = 0.1 * torch.randn(WIDTH, **f64)
    return [x, w_logits, b_logits, w_values, bias] + ([torch.randn(x.shape, **f64)] if residual == "other" else [])


def fold_op(residual: str):
    """``mod.folded_cross_attention`` with the residual named: none, x itself, or another tensor."""
    def op(mod):
        def f(x, w_logits, b_logits, w_values, bias, *other):
            res = {"none": None, "x": x, "other": other[0] if other else None}[residual]
            return mod.folded_cross_attention(x, w_logits, b_logits, w_values, bias, res)
        return f
    return op


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("residual", ["x", "other", "none"])
def test_folded_cross_attention_vit_b16(cpp, dtype_name, residual):
    """CVPT's folded cross-attention: 64 x 197 token rows of width 768, 12 heads x M=10 prompts."""
    inputs = fold_inputs(6, residual)
    cot = torch.randn(inputs[0].shape, device="cuda", dtype=torch.float64,
                      generator=torch.Generator(device="cuda").manual_seed(7))
    compare(f"folded_cross_attention {dtype_name} residual={residual}", fold_op(residual), cpp, inputs, cot,
            DTYPES[dtype_name], ["x", "w_logits", "b_logits", "w_values", "bias", "other"])


@pytest.mark.parametrize("residual", ["x", "other", "none"])
def test_folded_cross_attention_under_autocast_vit_b16(cpp, residual):
    """fp32 inputs under bf16 autocast (how CVPT trains): the products run in bf16 as eager's F.linear
    do, the result has eager's dtype (fp32 with an fp32 residual) and at most twice its error."""
    inputs = fold_inputs(8, residual)
    cot = torch.randn(inputs[0].shape, device="cuda", dtype=torch.float64,
                      generator=torch.Generator(device="cuda").manual_seed(9))
    want, want_g = outputs_and_grads(fold_op(residual)(reference), inputs, cot)
    runs = {}
    for name, mod in (("eager", reference), ("cpp", cpp)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs[name] = outputs_and_grads(fold_op(residual)(mod), [t.float() for t in inputs], cot.float())
    (eager, eager_g), (fused, fused_g) = runs["eager"], runs["cpp"]
    assert fused.dtype == eager.dtype
    labels = ["out", "dx", "dw_logits", "db_logits", "dw_values", "dbias", "dother"]
    rows = [(label, *within_rule(f, e, w, torch.bfloat16))
            for label, f, e, w in zip(labels, [fused, *fused_g], [eager, *eager_g], [want, *want_g])]
    for label, ok, ef, ee in rows:
        print(f"  folded autocast residual={residual:<6} {label:<10} cpp {ef:.3e}  eager {ee:.3e}  "
              f"{'ok' if ok else 'FAIL'}")
    assert all(ok for _, ok, _, _ in rows), rows


def prompted_vit_b16(method: str, num_prompts: int) -> torch.nn.Module:
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    model = svpt.prompt(model, method, num_prompts, **({"ae_init": 0.5} if method == "svpt" else {})).cuda()
    with torch.no_grad():
        for name, p in svpt.prompt_state_dict(model, keep_vars=True).items():
            if name == "da.weight":
                p.normal_(0, 0.05)
    return model


def model_rows(model, label: str, dtype_name: str) -> list:
    """cpp vs eager (same dtype, bf16 by autocast) vs the float64 model: logits and every trainable gradient."""
    images = torch.randn(4, 3, 224, 224, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def run(m, x, backend, autocast):
        params = svpt.prompt_state_dict(m, keep_vars=True)
        with svpt.backend(backend), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            logits = m(x)
        grads = torch.autograd.grad(logits.float().square().sum(), list(params.values()))
        return [logits, *grads], list(params)

    bf16 = dtype_name == "bf16"
    want, names = run(copy.deepcopy(model).double(), images.double(), "eager", False)
    eager, _ = run(model, images, "eager", bf16)
    fused, _ = run(model, images, "cpp", bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    rows = [(name, *within_rule(f, e, w, dtype)) for name, f, e, w in zip(["logits", *names], fused, eager, want)]
    for name, ok, ef, ee in rows:
        print(f"  model {label} {dtype_name:<5} {name:<12} cpp {ef:.3e}  eager {ee:.3e}  {'ok' if ok else 'FAIL'}")
    return rows


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["svpt", "cvpt"])
def test_whole_model_vit_b16(cpp, method, dtype_name):
    """Prompted ViT-B/16 (random init), M=10: cpp vs eager vs the float64 model; bf16 by autocast."""
    rows = model_rows(prompted_vit_b16(method, 10), method, dtype_name)
    assert all(ok for _, ok, _, _ in rows), rows


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("method,num_prompts", [("vpt-deep", 50), ("cvpt", 10)])
def test_whole_model_fast_path_vit_b16(cpp, monkeypatch, method, num_prompts, dtype_name):
    """The fast paths on the CUDA kernels (cpp lists none on CUDA; forced on here): VPT-deep M=50
    and CVPT M=10 against eager's plain path and the float64 model."""
    op = FAST_OPS[0] if method == "vpt-deep" else FAST_OPS[1]
    monkeypatch.setattr(cpp, "FAST_PATHS", {"cuda": FAST_OPS})
    calls = []
    real = getattr(cpp, op)
    monkeypatch.setattr(cpp, op, lambda *a: calls.append(1) or real(*a))
    model = prompted_vit_b16(method, num_prompts)
    rows = model_rows(model, f"{method} fast", dtype_name)
    assert len(calls) == len(model.blocks), "the fast path did not run"
    assert all(ok for _, ok, _, _ in rows), rows


def fwd_bwd_ms(step) -> float:
    """Mean time of ``step()`` (a forward and backward) over 10 runs after 3 warm-up runs."""
    for _ in range(3):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def test_attention_speed_vit_b16(cpp):
    """Not a pass/fail number: fwd+bwd time of the attention op, batch 64, M=50, for the record."""
    tokens = 1 + 50 + PATCHES
    for dtype in (torch.float32, torch.bfloat16):
        qkv = torch.randn(64, tokens, 3, HEADS, HEAD_DIM, device="cuda", dtype=dtype, requires_grad=True)
        times = {}
        for name, mod in (("eager", reference), ("cpp", cpp)):
            def step():
                q, k, v = qkv.unbind(2)
                out, _ = mod.prompt_attention(q, k, v, 0.125, (0, 1), 51)
                out.sum().backward()
            times[name] = fwd_bwd_ms(step)
        print(f"  attention fwd+bwd {dtype}, B=64 T={tokens}: eager {times['eager']:.2f} ms, "
              f"cpp {times['cpp']:.2f} ms")


def test_fast_path_ops_speed_vit_b16(cpp):
    """Not a pass/fail number, for deciding cpp's FAST_PATHS on CUDA: fwd+bwd per call, batch 64.
    KV-only attention (197 queries, 50 + 197 keys) vs the plain path's attention over all 247 tokens;
    the folded cross-attention (12 x 10 prompts) on cpp vs eager."""
    tokens = 1 + PATCHES
    for dtype in (torch.float32, torch.bfloat16):
        opts = dict(device="cuda", dtype=dtype, requires_grad=True)
        qkv = torch.randn(FAST_BATCH, tokens, 3, HEADS, HEAD_DIM, **opts)
        pkv = torch.randn(1, KV_PROMPTS, 2, HEADS, HEAD_DIM, **opts)
        full = torch.randn(FAST_BATCH, tokens + KV_PROMPTS, 3, HEADS, HEAD_DIM, **opts)
        x, w_logits, b_logits, w_values, bias = (t.to(dtype).requires_grad_() for t in fold_inputs(10, "x"))

        def kv_only():
            cpp.prompt_kv_attention(*qkv.unbind(2), *pkv.unbind(2), 0.125).sum().backward()

        def plain(mod):
            return lambda: mod.prompt_attention(*full.unbind(2), 0.125)[0].sum().backward()

        def fold(mod):
            return lambda: mod.folded_cross_attention(x, w_logits, b_logits, w_values, bias, x).sum().backward()

        print(f"  {dtype}: prompt_kv_attention cpp {fwd_bwd_ms(kv_only):.2f} ms; plain-path attention over "
              f"{tokens + KV_PROMPTS} tokens: cpp {fwd_bwd_ms(plain(cpp)):.2f} ms, eager "
              f"{fwd_bwd_ms(plain(reference)):.2f} ms; folded_cross_attention cpp {fwd_bwd_ms(fold(cpp)):.2f} ms, "
              f"eager {fwd_bwd_ms(fold(reference)):.2f} ms")
