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


def test_prompt_attention_without_blas(cpp):
    """The CPU kernels' other GEMM path (at::mm, used when torch does not link MKL), forced
    with SVPT_CPP_BLAS=0 in a fresh process (the choice is made once per process)."""
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
        "print('ok')\n"
    )
    import os
    env = dict(os.environ, SVPT_CPP_BLAS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
