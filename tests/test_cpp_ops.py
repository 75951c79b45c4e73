"""The C++ extension's CPU kernels (backend "cpp") against svpt.reference, op by op.

Forward and the gradient of every differentiable input, float32 (rel. error < 1e-4 against
the float64 reference, METHOD.md) and float64 (< 1e-10). These tests FAIL, not skip, when
the extension is not built: CI must build it (pip install --no-build-isolation .).

Run: PYTHONPATH=/work/main python -m pytest tests/test_cpp_ops.py -q
"""
from __future__ import annotations

import pytest
import torch

from svpt import reference

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
DTYPES = (torch.float32, torch.float64)


@pytest.fixture(scope="module")
def cpp():
    from svpt_kernels import cpp as module
    reason = module.why_unusable("cpu")
    assert reason is None, f"the C++ extension must be built for these tests: {reason}"
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.norm() == 0:  # an exactly zero reference (one key: no gradient to q, k) must be met exactly
        return (a - b).norm().item() * 1e300
    return ((a - b).norm() / b.norm()).item()


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).requires_grad_(True)


def check(name, got, want, dtype):
    err = rel_err(got, want)
    assert err < TOL[dtype], f"{name}: relative error {err:.3e} >= {TOL[dtype]:.0e} ({dtype})"


# ------------------------------------------------------------------------ prompt_attention
# (B, Tq, Tk, H, D, kv batch, saliency_rows, saliency_cols, self-attention from a qkv tensor)
ATTENTION_CASES = {
    "M1-cls": (2, 1 + 1 + 16, None, 2, 32, 2, (0, 1), 2, True),
    "M7-prompt-rows": (2, 1 + 7 + 16, None, 2, 64, 2, (1, 7), 8, True),
    "M10-T70-D80": (3, 1 + 10 + 59, None, 2, 80, 3, (0, 1), 11, True),
    "T130-two-blocks": (2, 130, None, 3, 64, 2, (5, 4), 9, True),
    "cvpt-kv-bcast": (3, 17, 5, 2, 32, 1, None, 0, False),
    "cvpt-kv-bcast-T70": (2, 70, 7, 2, 80, 1, None, 0, False),
    "cvpt-single-key": (3, 17, 1, 2, 32, 1, None, 0, False),  # dq = dk = 0 exactly
    "single-query": (2, 1, 9, 2, 32, 2, (0, 1), 0, False),
}


def attention_inputs(case, seed=0):
    b, tq, tk, h, d, kvb, _, _, from_qkv = case
    g = torch.Generator().manual_seed(seed)
    if from_qkv:  # strided views, as the methods pass them
        qkv = torch.randn(b, tq, 3, h, d, generator=g, dtype=torch.float64)
        return qkv.unbind(2)
    tk = tk or tq
    return (torch.randn(b, tq, h, d, generator=g, dtype=torch.float64),
            torch.randn(kvb, tk, h, d, generator=g, dtype=torch.float64),
            torch.randn(kvb, tk, h, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_prompt_attention(cpp, case, dtype):
    spec = ATTENTION_CASES[case]
    rows, cols, head_dim = spec[6], spec[7], spec[4]
    q64, k64, v64 = attention_inputs(spec)
    scale = head_dim ** -0.5
    q, k, v = (leaf(t, dtype) for t in (q64, k64, v64))
    qr, kr, vr = (leaf(t, torch.float64) for t in (q64, k64, v64))
    out, sal = cpp.prompt_attention(q, k, v, scale, rows, cols)
    out_ref, sal_ref = reference.prompt_attention(qr, kr, vr, scale, rows, cols)
    assert out.dtype == dtype and out.shape == out_ref.shape
    check("out", out, out_ref, dtype)
    if rows is None:
        assert sal is None
    else:
        assert sal.dtype == torch.float32 and not sal.requires_grad
        assert sal.shape == sal_ref.shape == (q64.shape[0], k64.shape[1] - cols)
        assert rel_err(sal, sal_ref) < 1e-5  # float32 output in both
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(out_ref, (qr, kr, vr), grad)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype
        check(f"d{name}", a, b, dtype)


def test_prompt_attention_only_some_inputs_need_grad(cpp):
    q64, k64, v64 = attention_inputs(ATTENTION_CASES["cvpt-kv-bcast"])
    q = leaf(q64, torch.float32)
    out, _ = cpp.prompt_attention(q, k64.float(), v64.float(), 0.2)
    qr = leaf(q64, torch.float64)
    out_ref, _ = reference.prompt_attention(qr, k64, v64, 0.2)
    (dq,) = torch.autograd.grad(out.sum(), q)
    (dq_ref,) = torch.autograd.grad(out_ref.sum(), qr)
    check("dq", dq, dq_ref, torch.float32)


def test_prompt_attention_half_inputs_on_cpu(cpp):
    """bfloat16 on CPU runs the float32 kernels: no worse than eager bfloat16 (vs float64)."""
    q64, k64, v64 = attention_inputs(ATTENTION_CASES["M7-prompt-rows"])
    ref, _ = reference.prompt_attention(q64, k64, v64, 0.125)
    got, _ = cpp.prompt_attention(q64.bfloat16(), k64.bfloat16(), v64.bfloat16(), 0.125, (1, 7), 8)
    eager, _ = reference.prompt_attention(q64.bfloat16(), k64.bfloat16(), v64.bfloat16(), 0.125)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 2 * rel_err(eager, ref)


# ---------------------------------------------------------------------------------- da_mix
# (B, num_prefix, M, N, d, prompts batch)
DA_MIX_CASES = {
    "M1": (3, 1, 1, 16, 48, 1),
    "M7-per-sample-prompts": (3, 5, 7, 16, 48, 3),
    "M10-vit-tiny-rows": (2, 1, 10, 196, 64, 1),
    "no-prefix": (2, 0, 3, 9, 40, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DA_MIX_CASES, ids=str)
def test_da_mix(cpp, case, dtype):
    b, n_p, m, n, d, pb = DA_MIX_CASES[case]
    g = torch.Generator().manual_seed(2)
    inputs64 = (torch.randn(b, n_p + m + n, d, generator=g, dtype=torch.float64),
                torch.randn(pb, m, d, generator=g, dtype=torch.float64),
                0.2 * torch.randn(2, d, generator=g, dtype=torch.float64),  # non-zero: gate depends on rows
                torch.tensor(0.3, dtype=torch.float64))
    ins = [leaf(t, dtype) for t in inputs64]
    refs = [leaf(t, torch.float64) for t in inputs64]
    out = cpp.da_mix(*ins, n_p)
    out_ref = reference.da_mix(*refs, n_p)
    assert out.dtype == dtype
    check("out", out, out_ref, dtype)
    grad = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, grad.to(dtype))
    want = torch.autograd.grad(out_ref, refs, grad)
    for name, a, w in zip(("tokens", "prompts", "weight", "bias"), got, want):
        assert a.shape == w.shape and a.dtype == dtype
        check(f"d{name}", a, w, dtype)


def test_da_mix_promotes_like_reference(cpp):
    """A float64 bias with float32 tensors: the reference's result is float32."""
    g = torch.Generator().manual_seed(3)
    tokens, prompts, weight = (torch.randn(2, 12, 16, generator=g), torch.randn(1, 3, 16, generator=g),
                               torch.randn(2, 16, generator=g))
    bias = torch.tensor(-0.5, dtype=torch.float64)
    want = reference.da_mix(tokens, prompts, weight, bias, 1)
    got = cpp.da_mix(tokens, prompts, weight, bias, 1)
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) < 1e-6


# ------------------------------------------------------------------------------- ae_update
# (B, num_prefix, M, N, d, k)
AE_CASES = {
    "M1-k1": (3, 1, 1, 16, 48, 1),
    "M7-k4": (3, 5, 7, 16, 48, 4),
    "k-all": (2, 1, 3, 16, 32, 16),
    "vit-tiny-rows": (2, 1, 10, 196, 64, 49),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", AE_CASES, ids=str)
def test_ae_update(cpp, case, dtype):
    b, n_p, m, n, d, k = AE_CASES[case]
    g = torch.Generator().manual_seed(4)
    t64 = torch.randn(b, n_p + m + n, d, generator=g, dtype=torch.float64)
    a64 = torch.randn(b, n_p + m + n, d, generator=g, dtype=torch.float64)
    saliency = torch.rand(b, n, generator=g)  # float32, distinct values: no top-k ties
    s64 = torch.tensor(0.7, dtype=torch.float64)
    ins = [leaf(x, dtype) for x in (t64, a64, s64)]
    refs = [leaf(x, torch.float64) for x in (t64, a64, s64)]
    out = cpp.ae_update(ins[0], ins[1], saliency, ins[2], n_p, m, k)
    out_ref = reference.ae_update(refs[0], refs[1], saliency, refs[2], n_p, m, k)
    assert out.dtype == dtype
    check("out", out, out_ref, dtype)
    grad = torch.randn(out_ref.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, ins, grad.to(dtype))
    want = torch.autograd.grad(out_ref, refs, grad)
    for name, a, w in zip(("tokens", "attn_out", "scale"), got, want):
        assert a.shape == w.shape and a.dtype == dtype
        check(f"d{name}", a, w, dtype)


def test_ae_update_mixed_dtypes_follow_reference(cpp):
    """tokens float32 + attn_out bfloat16 -> float32, as `tokens + attn_out` promotes."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(2, 20, 16, generator=g)
    attn = torch.randn(2, 20, 16, generator=g).bfloat16()
    saliency = torch.rand(2, 16, generator=g)
    scale = torch.tensor(0.5)
    want = reference.ae_update(tokens, attn, saliency, scale, 1, 3, 4)
    got = cpp.ae_update(tokens, attn, saliency, scale, 1, 3, 4)
    assert got.dtype == want.dtype == torch.float32
    assert rel_err(got, want) < 1e-6


# ---------------------------------------------------------------------- prompt_kv_attention
# (B, Tq, H, D, prompt batch, M, q/k/v as views of one qkv tensor)
KV_CASES = {
    "shared-prompts": (3, 17, 2, 32, 1, 5, True),
    "one-prompt": (2, 18, 2, 64, 1, 1, True),
    "per-sample-prompts": (2, 9, 1, 80, 2, 20, False),
    "odd-sizes": (3, 33, 3, 40, 1, 7, False),
    "vit-tiny-rows-two-q-blocks": (2, 1 + 196 + 70, 3, 64, 1, 50, True),  # Tq > the CPU kernel's 256-row tile
    "batch-1": (1, 11, 2, 32, 1, 3, False),
}


def kv_inputs(case, seed=0):
    b, tq, h, d, pb, m, from_qkv = case
    g = torch.Generator().manual_seed(seed)
    if from_qkv:  # strided views, as the methods pass them
        q, k, v = torch.randn(b, tq, 3, h, d, generator=g, dtype=torch.float64).unbind(2)
        pk, pv = torch.randn(pb, m, 2, h, d, generator=g, dtype=torch.float64).unbind(2)
        return q, k, v, pk, pv
    return (*(torch.randn(b, tq, h, d, generator=g, dtype=torch.float64) for _ in range(3)),
            *(torch.randn(pb, m, h, d, generator=g, dtype=torch.float64) for _ in range(2)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", KV_CASES, ids=str)
def test_prompt_kv_attention(cpp, case, dtype):
    base = kv_inputs(KV_CASES[case])
    scale = KV_CASES[case][3] ** -0.5
    ins = [leaf(t, dtype) for t in base]
    refs = [leaf(t, torch.float64) for t in base]
    out = cpp.prompt_kv_attention(*ins, scale)
    out_ref = reference.prompt_kv_attention(*refs, scale)
    assert out.dtype == dtype and out.shape == out_ref.shape
    check("out", out, out_ref, dtype)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, ins, grad.to(dtype))
    want = torch.autograd.grad(out_ref, refs, grad)
    for name, a, w in zip(("q", "k", "v", "prompt_k", "prompt_v"), got, want):
        assert a.shape == w.shape and a.dtype == dtype, name  # batch-1 prompts: one summed gradient
        check(f"d{name}", a, w, dtype)


def test_prompt_kv_attention_equals_prompt_attention_on_the_concatenation(cpp):
    """The same kernels with and without the separate segment: equal to rounding, in float64."""
    q, k, v, pk, pv = kv_inputs(KV_CASES["shared-prompts"])
    want, _ = cpp.prompt_attention(q, torch.cat([pk.expand(3, -1, -1, -1), k], 1),
                                   torch.cat([pv.expand(3, -1, -1, -1), v], 1), 0.3)
    assert rel_err(cpp.prompt_kv_attention(q, k, v, pk, pv, 0.3), want) < 1e-14


def test_prompt_kv_attention_half_inputs_on_cpu(cpp):
    """bfloat16 on CPU runs the float32 kernels: no worse than eager bfloat16 (vs float64)."""
    base = kv_inputs(KV_CASES["shared-prompts"])
    ref = reference.prompt_kv_attention(*base, 0.2)
    got = cpp.prompt_kv_attention(*(t.bfloat16() for t in base), 0.2)
    eager = reference.prompt_kv_attention(*(t.bfloat16() for t in base), 0.2)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 2 * rel_err(eager, ref)


def test_prompt_kv_attention_gradcheck(cpp):
    q, k, v, pk, pv = (t.detach().requires_grad_() for t in kv_inputs((2, 3, 2, 4, 1, 2, False), seed=3))
    assert torch.autograd.gradcheck(lambda *t: cpp.prompt_kv_attention(*t, 0.7), (q, k, v, pk, pv))


# ------------------------------------------------------------------- folded_cross_attention
# (leading shape, d, H, M, with b_logits, with bias, residual: None / "x" / "other")
FOLD_CASES = {
    "residual-is-x": ((2, 9), 48, 4, 3, True, True, "x"),
    "other-residual": ((2, 9), 64, 2, 5, True, True, "other"),
    "no-residual-no-biases": ((3, 7), 40, 2, 7, False, False, None),
    "one-prompt-one-head": ((1, 20), 32, 1, 1, True, False, "x"),
    "bias-only": ((2, 5), 24, 3, 2, False, True, None),
    "vit-tiny-rows-two-blocks": ((2, 197), 192, 3, 10, True, True, "x"),  # > the CPU kernel's 128-row block
    "flat-rows": ((131,), 33, 2, 4, True, False, "other"),
    "M-over-vector-width": ((2, 6), 16, 2, 19, True, True, None),
}


def fold_inputs(case, seed=0):
    """x, w_logits, b_logits, w_values, bias, other residual (float64; None where the case has none)."""
    lead, width, heads, m, with_bl, with_bias, residual = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    w_logits = torch.randn(heads, m, width, generator=g, dtype=torch.float64) / width ** 0.5
    b_logits = torch.randn(heads, m, generator=g, dtype=torch.float64)
    w_values = torch.randn(heads, m, width, generator=g, dtype=torch.float64)
    bias = torch.randn(width, generator=g, dtype=torch.float64)
    other = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    return [x, w_logits, b_logits if with_bl else None, w_values, bias if with_bias else None,
            other if residual == "other" else None]


def fold_call(module, tensors, residual):
    """``module.folded_cross_attention`` with the residual the case asks for (x itself: the same tensor)."""
    x, w_logits, b_logits, w_values, bias, other = tensors
    return module.folded_cross_attention(x, w_logits, b_logits, w_values, bias, x if residual == "x" else other)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FOLD_CASES, ids=str)
def test_folded_cross_attention(cpp, case, dtype):
    residual = FOLD_CASES[case][-1]
    base = fold_inputs(FOLD_CASES[case])
    ins = [None if t is None else leaf(t, dtype) for t in base]
    refs = [None if t is None else leaf(t, torch.float64) for t in base]
    out = fold_call(cpp, ins, residual)
    out_ref = fold_call(reference, refs, residual)
    assert out.dtype == dtype and out.shape == out_ref.shape
    check("out", out, out_ref, dtype)
    grad = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [n for n, t in zip(("x", "w_logits", "b_logits", "w_values", "bias", "residual"), ins) if t is not None]
    got = torch.autograd.grad(out, [t for t in ins if t is not None], grad.to(dtype))
    want = torch.autograd.grad(out_ref, [t for t in refs if t is not None], grad)
    for name, a, w in zip(names, got, want):
        assert a.shape == w.shape and a.dtype == dtype, name
        check(f"d{name}", a, w, dtype)


def test_folded_cross_attention_gradcheck(cpp):
    for residual in (None, "x", "other"):
        case = ((2, 3), 6, 2, 3, True, True, residual)
        tensors = [None if t is None else t.requires_grad_() for t in fold_inputs(case, seed=4)]
        present = [t for t in tensors if t is not None]

        def f(*args, tensors=tensors, residual=residual):
            it = iter(args)
            return fold_call(cpp, [None if t is None else next(it) for t in tensors], residual)
        assert torch.autograd.gradcheck(f, present), residual


def test_folded_cross_attention_only_some_inputs_need_grad(cpp):
    x, w_logits, b_logits, w_values, bias, _ = fold_inputs(FOLD_CASES["residual-is-x"])
    w = leaf(w_logits, torch.float32)
    out = cpp.folded_cross_attention(x.float(), w, b_logits.float(), w_values.float(), bias.float(), x.float())
    wr = leaf(w_logits, torch.float64)
    out_ref = reference.folded_cross_attention(x, wr, b_logits, w_values, bias, x)
    (dw,) = torch.autograd.grad(out.sum(), w)
    (dw_ref,) = torch.autograd.grad(out_ref.sum(), wr)
    check("dw_logits", dw, dw_ref, torch.float32)


@pytest.mark.parametrize("residual", [None, "x", "other"])
def test_folded_cross_attention_half_inputs_on_cpu(cpp, residual):
    """bfloat16 on CPU runs the float32 kernels: dtype as the reference's, error no worse than eager's."""
    base = fold_inputs(FOLD_CASES["other-residual"][:-1] + (residual,))
    ref = fold_call(reference, base, residual)
    half = [None if t is None else t.bfloat16() for t in base]
    got, eager = fold_call(cpp, half, residual), fold_call(reference, half, residual)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert rel_err(got, ref) <= 2 * rel_err(eager, ref)


@pytest.mark.parametrize("residual", [None, "x", "other", "other-float64"])
def test_folded_cross_attention_follows_autocast_like_linear(cpp, residual):
    """Under CPU autocast the reference's products run in bfloat16 (F.linear); the result has the
    reference's dtype (bfloat16, or the residual's promotion) and no larger error."""
    x, w_logits, b_logits, w_values, bias, _ = fold_inputs(FOLD_CASES["residual-is-x"])
    other = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    res64 = {None: None, "x": x, "other": other, "other-float64": other}[residual]
    want = reference.folded_cross_attention(x, w_logits, b_logits, w_values, bias, res64)
    args = [x.float(), w_logits.float(), b_logits.float(), w_values.float(), bias.float()]
    res = {None: None, "x": args[0], "other": other.float(), "other-float64": other}[residual]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = reference.folded_cross_attention(*args, res)
        got = cpp.folded_cross_attention(*args, res)
    assert got.dtype == eager.dtype
    assert rel_err(got, want) <= 2 * rel_err(eager, want)


def test_folded_cross_attention_promotes_a_float64_residual(cpp):
    x, w_logits, b_logits, w_values, bias, other = fold_inputs(FOLD_CASES["other-residual"])
    want = reference.folded_cross_attention(x.float(), w_logits.float(), b_logits.float(), w_values.float(),
                                            bias.float(), other)
    got = cpp.folded_cross_attention(x.float(), w_logits.float(), b_logits.float(), w_values.float(), bias.float(),
                                     other)
    assert got.dtype == want.dtype == torch.float64
    assert rel_err(got, want) < 1e-6


# ----------------------------------------------------------------------- backend plumbing
def test_backend_registered_and_reasons(cpp):
    import svpt
    from svpt import backends
    assert "cpp" in svpt.available_backends("cpu")
    assert backends.describe()["cpp"] is None
    if not torch.cuda.is_available():  # must say why, not claim CUDA works
        assert isinstance(cpp.why_unusable("cuda"), str) and cpp.why_unusable("cuda")
    assert isinstance(cpp.build_info(), str) and "torch" in cpp.build_info()


def test_ops_dispatch_to_cpp(cpp, monkeypatch):
    """svpt.ops under backend('cpp') reaches the extension (not the reference)."""
    import svpt
    from svpt import ops
    calls = []
    real_ops = cpp._ops

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real_ops, name)
            if name == "prompt_attention_fwd":
                return lambda *a: (calls.append(1), fn(*a))[1]
            return fn

    monkeypatch.setattr(cpp, "_ops", Spy())
    q = torch.randn(1, 5, 2, 8)
    with svpt.backend("cpp"):
        ops.prompt_attention(q, q, q, 0.3)
    assert calls == [1]


def test_cpp_lists_the_fast_paths_measured_faster_on_cpu(cpp):
    """benchmarks/results/cpp_cpu_fast_paths.txt: both fast paths pay on CPU; CUDA lists none."""
    assert cpp.FAST_PATHS == {"cpu": ("prompt_kv_attention", "folded_cross_attention"), "cuda": ()}
    import svpt
    with svpt.backend("cpp"):
        assert svpt.ops.fast_path("prompt_kv_attention", torch.device("cpu"))
        assert svpt.ops.fast_path("folded_cross_attention", torch.device("cpu"))


def test_torch_compile_traces_the_ops(cpp):
    """The ops have fake kernels: torch.compile(fullgraph=True) traces them without breaks."""
    q64, k64, v64 = attention_inputs(ATTENTION_CASES["M1-cls"])
    q, k, v = (t.float().contiguous().requires_grad_(True) for t in (q64, k64, v64))

    def f(q, k, v):
        out, sal = cpp.prompt_attention(q, k, v, 0.2, (0, 1), 2)
        return out.sum() + sal.sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    torch._dynamo.reset()
    want = f(q, k, v)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_the_fast_path_ops(cpp):
    q, k, v, pk, pv = (t.float().requires_grad_() for t in kv_inputs(KV_CASES["shared-prompts"]))
    x, w_logits, b_logits, w_values, bias, _ = (None if t is None else t.float().requires_grad_()
                                                for t in fold_inputs(FOLD_CASES["residual-is-x"]))

    def f(q, k, v, pk, pv, x, w_logits, b_logits, w_values, bias):
        attn = cpp.prompt_kv_attention(q, k, v, pk, pv, 0.2)
        return attn.sum() + cpp.folded_cross_attention(x, w_logits, b_logits, w_values, bias, x).square().sum()

    inputs = (q, k, v, pk, pv, x, w_logits, b_logits, w_values, bias)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    torch._dynamo.reset()
    want = f(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernels_without_blas(cpp):
    """The CPU kernels' other GEMM path (at::mm, used when torch does not link MKL), forced
    with SVPT_CPP_BLAS=0 in a fresh process (the choice is made once per process): prompt_attention,
    prompt_kv_attention and folded_cross_attention."""
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from svpt import reference\n"
        "from svpt_kernels import cpp\n"
        "torch.manual_seed(0)\n"
        "q, k, v = torch.randn(2, 70, 3, 2, 80, dtype=torch.float64).unbind(2)\n"
        "q, k, v = (t.float().requires_grad_() for t in (q, k, v))\n"
        "out, sal = cpp.prompt_attention(q, k, v, 0.1, (1, 7), 8)\n"
        "want, sal_ref = reference.prompt_attention(*(t.double() for t in (q, k, v)), 0.1, (1, 7), 8)\n"
        "g = torch.randn_like(want)\n"
        "got = torch.autograd.grad(out, (q, k, v), g.float())\n"
        "qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))\n"
        "ref = torch.autograd.grad(reference.prompt_attention(qd, kd, vd, 0.1)[0], (qd, kd, vd), g)\n"
        "errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip((out, *got), (want, *ref))]\n"
        "assert max(errs) < 1e-4, errs\n"
        "assert ((sal.double() - sal_ref.double()).norm() / sal_ref.double().norm()).item() < 1e-5\n"
        "pk, pv = (t[:1, :9].detach().requires_grad_() for t in (k, v))\n"
        "out = cpp.prompt_kv_attention(q, k, v, pk, pv, 0.1)\n"
        "want = reference.prompt_kv_attention(*(t.double() for t in (q, k, v, pk, pv)), 0.1)\n"
        "got = torch.autograd.grad(out, (q, k, v, pk, pv), g.float())\n"
        "leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]\n"
        "ref = torch.autograd.grad(reference.prompt_kv_attention(*leaves, 0.1), leaves, g)\n"
        "errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip((out, *got), (want, *ref))]\n"
        "assert max(errs) < 1e-4, errs\n"
        "x = q.detach().reshape(2, 70, 160).requires_grad_()\n"
        "w = [torch.randn(2, 5, 160, requires_grad=True) for _ in range(2)]\n"
        "bl, bias = torch.randn(2, 5, requires_grad=True), torch.randn(160, requires_grad=True)\n"
        "ins = [x, w[0], bl, w[1], bias]\n"
        "out = cpp.folded_cross_attention(*ins, x)\n"
        "leaves = [t.detach().double().requires_grad_() for t in ins]\n"
        "want = reference.folded_cross_attention(*leaves, leaves[0])\n"
        "got = torch.autograd.grad(out, ins, want.detach().float())\n"
        "ref = torch.autograd.grad(want, leaves, want.detach())\n"
        "errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip((out, *got), (want, *ref))]\n"
        "assert max(errs) < 1e-4, errs\n"
        "print('ok')\n"
    )
    import os
    env = dict(os.environ, SVPT_CPP_BLAS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
