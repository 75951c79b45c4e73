"""Autograd of the C++ backend that cannot be silently wrong, checked with PyTorch's own tools.

* ``torch.autograd.gradcheck`` in float64 for every differentiable op (in place ones included, on
  a copy of the buffer): the first-order gradients are right;
* second order: every op is first-order only, so ``gradgradcheck`` and a gradient penalty
  (``create_graph=True``) must raise the backend's error, never return a value (the old kernels
  returned a silently zero second-order gradient);
* ``torch.library.opcheck`` for every op the extension registers, the backward ops included:
  schema (the in-place ops declare what they write), no autograd history on what the kernels
  return, fake kernels that match the real ones, tracing under AOTAutograd;
* ``torch.compile(fullgraph=True)`` traces the in-place ops without graph breaks.

These tests FAIL, not skip, when the extension is not built: CI must build it
(pip install --no-build-isolation .).

Run: python -m pytest tests/test_cpp_autograd.py -q
"""
from __future__ import annotations

import pytest
import torch

import svpt

SECOND_ORDER_ERROR = "has first-order gradients only"
NP, M, N, H, D, B = 1, 3, 8, 2, 8, 2  # prefix, prompts, patches, heads, head dim, batch
T, WIDTH = NP + M + N, H * D


@pytest.fixture(scope="module")
def cpp():
    from svpt_kernels import cpp as module
    reason = module.why_unusable("cpu")
    assert reason is None, f"the C++ extension must be built for these tests: {reason}"
    return module


_GEN = torch.Generator()  # reseeded by each case builder: every tensor differs, every run is the same


def rand(*shape, scale=1.0, dtype=torch.float64, grad=True):
    return (scale * torch.randn(shape, generator=_GEN, dtype=dtype)).requires_grad_(grad)


def saliency_scores():
    # distinct values: no top-k ties, so finite differences do not change the selection
    return torch.randperm(B * N, generator=torch.Generator().manual_seed(3)).reshape(B, N).double() / (B * N)


# op name -> (function of float64 leaves for gradcheck, its inputs). The in-place ops run on a copy
# of the buffer (an in-place op may not write a leaf that requires grad).
def _cases(cpp):
    _GEN.manual_seed(0)
    scale = D ** -0.5
    return {
        "da_mix": (lambda tokens, prompts, weight, bias: cpp.da_mix(tokens * 1, prompts, weight, bias, NP),
                   (rand(B, T, WIDTH), rand(1, M, WIDTH), rand(2, WIDTH, scale=0.3), rand())),
        "da_mix-batched-prompts": (lambda tokens, prompts, weight, bias:
                                   cpp.da_mix(tokens * 1, prompts, weight, bias, NP),
                                   (rand(B, T, WIDTH), rand(B, M, WIDTH), rand(2, WIDTH, scale=0.3), rand())),
        "ae_update": (lambda h, ae_scale: cpp.ae_update(h * 1, saliency_scores(), ae_scale, NP, M, 3),
                      (rand(B, T, WIDTH), rand())),
        "prompt_attention": (lambda q, k, v: cpp.prompt_attention(q, k, v, scale),
                             (rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D))),
        "prompt_attention-broadcast-kv": (lambda q, k, v: cpp.prompt_attention(q, k, v, scale),
                                          (rand(B, T, H, D), rand(1, M, H, D), rand(1, M, H, D))),
        "prompt_kv_attention": (lambda q, k, v, pk, pv: cpp.prompt_kv_attention(q, k, v, pk, pv, scale),
                                (rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D), rand(1, M, H, D),
                                 rand(1, M, H, D))),
        "folded_cross_attention": (
            lambda x, wl, bl, wv, bias: cpp.folded_cross_attention(x, wl, bl, wv, bias, x),
            (rand(B, T, WIDTH), rand(H, M, WIDTH, scale=0.3), rand(H, M), rand(H, M, WIDTH, scale=0.3), rand(WIDTH))),
    }


CASES = ("da_mix", "da_mix-batched-prompts", "ae_update", "prompt_attention", "prompt_attention-broadcast-kv",
         "prompt_kv_attention", "folded_cross_attention")


@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(cpp, case):
    fn, inputs = _cases(cpp)[case]
    with svpt.backend("cpp"):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_second_order_is_an_error(cpp, case):
    fn, inputs = _cases(cpp)[case]
    with pytest.raises(RuntimeError, match=SECOND_ORDER_ERROR):
        torch.autograd.gradgradcheck(fn, inputs)
    # The way a user meets it: a gradient penalty asks for a differentiable first-order gradient.
    out = fn(*inputs)
    with pytest.raises(RuntimeError, match=SECOND_ORDER_ERROR):
        torch.autograd.grad((out * out).sum(), inputs, create_graph=True)


def test_saliency_has_no_gradient(cpp):
    q, k = rand(B, T, H, D), rand(B, T, H, D)
    sal = cpp.attention_saliency(q, k, D ** -0.5, (0, 1), NP + M)
    assert sal.dtype == torch.float32 and sal.shape == (B, N)
    assert not sal.requires_grad and sal.grad_fn is None


def test_in_place_ops_write_only_their_rows(cpp):
    """da_mix writes the prompt rows, ae_update the k selected rows, forward and backward."""
    before = rand(B, T, WIDTH).detach()
    tokens = before.clone()
    out = cpp.da_mix(tokens, rand(1, M, WIDTH).detach(), rand(2, WIDTH).detach(), rand().detach(), NP)
    assert out is tokens
    torch.testing.assert_close(out[:, :NP], before[:, :NP], rtol=0, atol=0)
    torch.testing.assert_close(out[:, NP + M:], before[:, NP + M:], rtol=0, atol=0)
    assert not torch.equal(out[:, NP:NP + M], before[:, NP:NP + M])

    h = before.clone()
    sal = saliency_scores()
    out = cpp.ae_update(h, sal, torch.tensor(0.5, dtype=torch.float64), NP, M, 3)
    assert out is h
    changed = (out != before).any(-1)  # [B, T]
    chosen = torch.zeros(B, T, dtype=torch.bool)
    chosen.scatter_(1, sal.topk(3, dim=-1).indices + NP + M, True)
    assert torch.equal(changed, chosen)


def test_raw_in_place_op_refuses_a_buffer_that_requires_grad(cpp):
    """torch.ops.svpt_cpp.* record no gradient: writing a buffer in the autograd graph through them
    directly would be a silently lost gradient, so it is an error (svpt_kernels.cpp records it)."""
    tokens = rand(B, T, WIDTH, dtype=torch.float32) * 1
    args = (rand(1, M, WIDTH, dtype=torch.float32), rand(2, WIDTH, dtype=torch.float32), rand(dtype=torch.float32))
    with pytest.raises(RuntimeError, match="records no gradient"):
        torch.ops.svpt_cpp.da_mix_fwd(tokens, *args, NP)
    with torch.no_grad():
        torch.ops.svpt_cpp.da_mix_fwd(tokens, *args, NP)  # no graph to lose: fine


# ------------------------------------------------------------------------------- opcheck
def _opcheck_args():
    """Arguments for each registered op, with an input that requires grad (opcheck's autograd test
    needs one); the buffers the in-place ops write do not (they would be leaves written in place)."""
    _GEN.manual_seed(1)

    def t(*shape, grad=False, scale=1.0):
        return rand(*shape, scale=scale, dtype=torch.float32, grad=grad)

    scale = D ** -0.5
    q, k, v = t(B, T, H, D, grad=True), t(B, T, H, D, grad=True), t(B, T, H, D, grad=True)
    pk, pv = t(1, M, H, D, grad=True), t(1, M, H, D, grad=True)
    x, wl, bl, wv, bias = t(B * T, WIDTH, grad=True), t(H, M, WIDTH, scale=0.3), t(H, M), t(H, M, WIDTH), t(WIDTH)
    out, lse = torch.ops.svpt_cpp.prompt_attention_fwd(q.detach(), k.detach(), v.detach(), scale)
    kv_out, kv_lse = torch.ops.svpt_cpp.prompt_kv_attention_fwd(q.detach(), k.detach(), v.detach(), pk.detach(),
                                                                 pv.detach(), scale)
    mean, index = torch.ops.svpt_cpp.ae_update_fwd(t(B, T, WIDTH), saliency_scores().float(), t(), NP, M, 3)
    return {
        "da_mix_fwd": (t(B, T, WIDTH), t(1, M, WIDTH, grad=True), t(2, WIDTH, grad=True), t(grad=True), NP),
        "da_mix_bwd": (t(B, T, WIDTH), t(B, M, WIDTH), t(1, M, WIDTH, grad=True), t(2, WIDTH, grad=True),
                       t(grad=True), NP),
        "attention_saliency": (q, k, scale, 0, 1, NP + M),
        "ae_update_fwd": (t(B, T, WIDTH), saliency_scores().float(), t(grad=True), NP, M, 3),
        "ae_update_bwd": (t(B, T, WIDTH), mean, index, t(grad=True), NP, M),
        "prompt_attention_fwd": (q, k, v, scale),
        "prompt_attention_bwd": (t(B, T, H, D, grad=True), q, k, v, out, lse, scale),
        "prompt_kv_attention_fwd": (q, k, v, pk, pv, scale),
        "prompt_kv_attention_bwd": (t(B, T, H, D, grad=True), q, k, v, pk, pv, kv_out, kv_lse, scale),
        "folded_cross_attention_fwd": (x, wl, bl, wv, bias, None, True),
        "folded_cross_attention_bwd": (t(B * T, WIDTH, grad=True), x, wl, bl, wv, True, True),
    }


def _registered_ops() -> list[str]:
    import svpt_kernels._C  # noqa: F401  (registers torch.ops.svpt_cpp; fails here if not built)
    names = [name for name in dir(torch.ops.svpt_cpp) if not name.startswith("_")]
    return sorted(n for n in names if n not in ("has_cuda", "build_info") and isinstance(
        getattr(torch.ops.svpt_cpp, n), torch._ops.OpOverloadPacket))


OPCHECKED = ("da_mix_fwd", "da_mix_bwd", "attention_saliency", "ae_update_fwd", "ae_update_bwd", "prompt_attention_fwd",
             "prompt_attention_bwd", "prompt_kv_attention_fwd", "prompt_kv_attention_bwd",
             "folded_cross_attention_fwd", "folded_cross_attention_bwd")


# Registered by svpt_kernels.cpp in Python: ATen's fused attention for VPT-deep, CUDA only, opchecked
# in tests/gpu/test_ops_gpu.py::test_cpp_fused_kv_ops_pass_opcheck.
OPCHECKED_ON_GPU = ("fused_kv_attention_fwd", "fused_kv_attention_bwd")


def test_opcheck_covers_every_registered_op(cpp):
    assert set(_registered_ops()) == set(OPCHECKED) | set(OPCHECKED_ON_GPU)
    assert set(OPCHECKED) == set(_opcheck_args().keys())


@pytest.mark.parametrize("op", OPCHECKED)
def test_opcheck(cpp, op):
    torch.library.opcheck(getattr(torch.ops.svpt_cpp, op).default, _opcheck_args()[op])


def test_compile_traces_in_place_ops(cpp):
    """One graph (fullgraph) through da_mix, the saliency, ae_update and attention, forward and
    backward, with the compiled gradients equal to the eager ones."""
    def block(tokens, prompts, weight, bias, ae_scale, qkv):
        q, k, v = qkv.unbind(2)
        sal = cpp.attention_saliency(q, k, D ** -0.5, (0, 1), NP + M)
        h = tokens + cpp.prompt_attention(q, k, v, D ** -0.5).reshape(B, T, WIDTH)
        h = cpp.ae_update(h, sal, ae_scale, NP, M, 3)
        return cpp.da_mix(h * 2, prompts, weight, bias, NP).sum(-1)

    inputs = [t.float() for t in (rand(B, T, WIDTH), rand(1, M, WIDTH), rand(2, WIDTH, scale=0.3), rand(),
                                  rand(), rand(B, T, 3, H, D))]

    def grads(fn):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for got, want in zip(grads(compiled), grads(block)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
