"""prompt_kv_attention (VPT-deep's fast path: attention over [prompt keys; token keys]) on every
backend that declares it, and on the SDPA provider the backends may prefer.

Against the float64 reference (opcheck.check): the output and all five input gradients (a batch-1
prompt segment's summed over the batch). In 16-bit the only allowance beyond 2x eager's error is
FlashAttention's D rounding (numerics.flash_delta_moves); test_flash_delta_floor_is_tight shows
that allowance is the error a flash backward makes, not a cover for another. Inputs: q/k/v as the
strided views of one projection, shared (batch 1) and per-sample prompts, one prompt and more
prompts than one key block, head dims that are not powers of two.
"""
from __future__ import annotations

import pytest
import torch

import svpt.sdpa
from svpt import reference

from numerics import rel_err
from opcheck import (DEVICES, DTYPES, Case, check, check_hand_over, check_sized_route, declared, execute, flash_floors, handed_over,
                     kernel_backends, own_cases, randn, rounded, value_cases)

OP = "prompt_kv_attention"
FLASH = flash_floors("q", [("prompt_k", "prompt_v"), ("k", "v")])
NAMES = ("q", "k", "v", "prompt_k", "prompt_v")
# name: (batch, tokens, heads, head dim, prompt batch, M)
SHAPES = {
    "shared-prompts-M5-D32": (2, 17, 2, 32, 1, 5),
    "per-sample-prompts-M17-D24": (2, 9, 2, 24, 2, 17),
    "one-prompt-D40": (2, 18, 1, 40, 1, 1),
}
LONG = {"vit-M50-T267": (2, 267, 2, 64, 1, 50)}  # past the kernels' 256-row tiles
# tests/gpu/test_ops_gpu.py: the op at ViT-B/16's sizes (d 768, 12 heads of 64, N 196)
VIT_B16 = {"vitb16-M50": (32, 197, 12, 64, 1, 50)}
# the split provider's prompt gradients sum groups of samples: a batch that is no multiple of a group
ODD_BATCH = {"odd-batch-M4-D8": (3, 7, 2, 8, 1, 4)}


def make(name: str, seed: int = 0, head_dim: int | None = None) -> Case:
    batch, tokens, heads, dim, prompt_batch, m = (SHAPES | LONG | VIT_B16 | ODD_BATCH)[name]
    dim = head_dim or dim
    gen = torch.Generator().manual_seed(seed + dim)
    q, k, v = (randn(gen, batch, tokens, heads, dim) for _ in range(3))
    prompt_k, prompt_v = (randn(gen, prompt_batch, m, heads, dim) for _ in range(2))
    return Case(OP, dict(zip(NAMES, (q, k, v, prompt_k, prompt_v))), (dim ** -0.5,), grads=NAMES,
                layouts=dict.fromkeys("qkv", "padded"))


@pytest.mark.parametrize("backend,device,dtype,shape", value_cases(OP, SHAPES, LONG))
def test_matches_float64_reference(backend, device, dtype, shape):
    check(make(shape), backend, device, dtype, floors=FLASH)


@pytest.mark.parametrize("shape", ["shared-prompts-M5-D32", "per-sample-prompts-M17-D24"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_provider_matches_float64_reference(device, dtype, shape):
    """PyTorch's SDPA over the concatenated keys, which backends may name in PREFER, called directly."""
    check(make(shape), "sdpa", device, dtype, floors=FLASH, provider=svpt.sdpa.prompt_kv_attention)


@pytest.mark.parametrize("needed", NAMES)
@pytest.mark.parametrize("backend,device,dtype", own_cases(OP, dtypes=(torch.float32,)))
def test_only_some_inputs_need_grad(backend, device, dtype, needed):
    case = make("shared-prompts-M5-D32")
    case.grads = (needed,)
    check(case, backend, device, dtype)


def flash_backends() -> list:
    """(backend, device) computing this op in fp16 themselves with a FlashAttention-style backward (D
    taken from the fp16 output): Triton's. (The C++ CPU kernels compute fp16 in fp32: no D rounding.)"""
    return [pytest.param(row["backend"], row["device"], id=f"{row['backend']}-{row['device']}") for row in declared(OP)
            if row["backend"] == "triton" and row["runs"] == "triton" and row["dtype"] == "float16"]


@pytest.mark.parametrize("backend,device", flash_backends())
def test_flash_delta_floor_is_tight(backend, device):
    """One query, one token key and one prompt key in fp16 (a case hypothesis found on the GPU):
    the flash backward's key gradient is far beyond 2x eager's error, and that excess is the
    D-rounding term of numerics.flash_delta_moves to within 10%: the floor explains the error."""
    gen = torch.Generator().manual_seed(194)
    case = Case(OP, {n: randn(gen, 1, 1, 1, 32) for n in NAMES}, (32 ** -0.5,), grads=NAMES)
    dtype = torch.float16
    want = execute(case, None, device, dtype)
    got = execute(case, backend, device, dtype)
    eager = execute(case, "eager", device, dtype)
    assert got.log == [(OP, backend)]
    floor = FLASH(case, want, dtype)["grad k"]
    err, eager_err = rel_err(got.grads["k"], want.grads["k"]), rel_err(eager.grads["k"], want.grads["k"])
    assert err > 4 * eager_err, (err, eager_err)
    assert abs(err - floor) < 0.1 * floor, (err, floor)


def test_reference_is_attention_over_the_concatenation():
    """The reference (eager float64) is prompt_attention over [prompt_k; k], [prompt_v; v] (the
    plain VPT-deep path), to rounding."""
    case = rounded(make("shared-prompts-M5-D32"), torch.float64)
    q, k, v, pk, pv = (case.inputs[n] for n in NAMES)
    out = reference.prompt_kv_attention(q, k, v, pk, pv, 0.3)
    expected = reference.prompt_attention(q, torch.cat([pk.expand(2, -1, -1, -1), k], 1),
                                          torch.cat([pv.expand(2, -1, -1, -1), v], 1), 0.3)
    assert rel_err(out, expected) < 1e-14


@pytest.mark.parametrize("row", handed_over(OP))
def test_hand_over(row):
    check_hand_over(make("shared-prompts-M5-D32"), row)


@pytest.mark.parametrize("backend", kernel_backends(OP))
def test_head_dim_past_a_declared_limit(backend):
    check_sized_route(make("one-prompt-D40", head_dim=320), backend, {"head_dim": 320})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", ["shared-prompts-M5-D32", "per-sample-prompts-M17-D24", "one-prompt-D40"])
def test_cpp_fused_segments_are_the_concatenation(shape, dtype):
    """cpp's fused VPT-deep attention (ATen's cuDNN / FlashAttention over [prompt; token] keys and
    values) builds the concatenation as 8-byte words where the layout allows: bit for bit torch.cat's,
    on the strided q/k/v views of one projection, with shared and per-sample prompts; layouts that
    do not allow it (a head dim whose rows are not whole words, an offset view) take torch.cat."""
    cpp = pytest.importorskip("svpt_kernels.cpp")
    if cpp.why_unusable() is not None:
        pytest.skip(cpp.why_unusable())
    case = rounded(make(shape), dtype)
    q, k, v, pk, pv = (case.inputs[n] for n in NAMES)
    batch = q.shape[0]
    for prompts, tokens in ((pk, k), (pv, v), (pk[..., 1:], k[..., 1:]), (pk[..., :3], k[..., :3])):
        want = torch.cat([prompts.expand(batch, -1, -1, -1), tokens], 1)
        got = cpp._cat_rows(prompts.expand(batch, -1, -1, -1), tokens, words=True)
        assert got.dtype == want.dtype and torch.equal(got, want)
    words = cpp._as_words(k)
    assert (words is not None) == (k.element_size() < 8), "16- and 32-bit rows of whole words go as words"
    assert cpp._as_words(k[..., 1:]) is None


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_cpp_fused_keeps_no_concatenation_for_backward_when_traced(kernel):
    """Traced for torch.compile (AOTAutograd with the min-cut partitioner inductor uses, on meta
    tensors: the partition needs no GPU), cpp's fused VPT-deep attention keeps for backward what its
    eager form keeps: the inputs, the output and the log-sum-exp, never the [prompt; token] keys and
    values (the partitioner had merged the backward's rebuilt concatenation with the forward's and
    kept it: 1.09 GiB more memory in a compiled ViT-B/16 step)."""
    cpp = pytest.importorskip("svpt_kernels.cpp")
    from svpt_kernels import aten_attention
    if kernel == "cudnn" and not aten_attention.has_cudnn_ops():
        pytest.skip("this torch has no cuDNN attention ops of the signature cpp calls")
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition
    batch, tokens, prompts, heads, dim = 2, 9, 3, 4, 64
    graphs = {}

    def keep(name):
        def compiler(graph, _):
            graphs[name] = graph
            return make_boxed_func(graph)
        return compiler

    def attend(qkv, prompt_k, prompt_v):
        q, k, v = qkv.unbind(2)
        return cpp._FusedKVAttention.apply(q, k, v, prompt_k, prompt_v, dim ** -0.5, kernel)

    qkv = torch.empty(batch, tokens, 3, heads, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
    pk, pv = (torch.empty(1, prompts, heads, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(2))
    traced = aot_function(attend, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                          partition_fn=min_cut_rematerialization_partition)
    traced(qkv, pk, pv).sum().backward()
    (outputs,) = [node.args[0] for node in graphs["forward"].graph.nodes if node.op == "output"]
    kept = [tuple(node.meta["val"].shape) for node in outputs[1:]]  # what the forward keeps for backward
    assert kept and all(tokens + prompts not in shape for shape in kept), kept
    called = {str(node.target) for name in graphs for node in graphs[name].graph.nodes}
    assert {"svpt_cpp.fused_kv_attention_fwd.default", "svpt_cpp.fused_kv_attention_bwd.default"} <= called, called


def _split_dtypes(device: str) -> list:
    """What the split provider computes: ATen's fused kernels take 16-bit on CUDA; on CPU its Triton
    kernels run in the interpreter, whose bf16 products are wrong (fp32 and fp16 there)."""
    return [torch.float16, torch.bfloat16] if device == "cuda" else [torch.float32, torch.float16]


SPLIT_CASES = [pytest.param(device, dtype, shape, id=f"{device}-{str(dtype)[6:]}-{shape}")
               for device in DEVICES for dtype in _split_dtypes(device) for shape in (*SHAPES, *LONG, *ODD_BATCH)]


@pytest.mark.parametrize("device,dtype,shape", SPLIT_CASES)
def test_split_provider_matches_float64_reference(device, dtype, shape):
    """The split provider (ATen's fused attention over the token keys, Triton kernels for the prompt
    keys, merged by log-sum-exp; benchmarks/token_floor.py's vpt-deep-split row), called directly."""
    from svpt_kernels.triton import prompt_kv_split
    check(make(shape), "split", device, dtype, floors=FLASH, provider=prompt_kv_split.prompt_kv_attention)


@pytest.mark.parametrize("needed", [("prompt_k", "prompt_v"), ("q",), ("v", "prompt_v")], ids=str)
def test_split_provider_with_some_gradients(needed):
    """VPT-deep's first block asks only the prompts' gradients (its input is frozen): the backward
    then runs the prompt kernel alone, without ATen's."""
    from svpt_kernels.triton import prompt_kv_split
    case = make("shared-prompts-M5-D32")
    case.grads = needed
    check(case, "split", "cpu", torch.float32, provider=prompt_kv_split.prompt_kv_attention)


def test_split_provider_refuses_what_aten_cannot_run():
    from svpt_kernels.triton import prompt_kv_split
    q = torch.randn(1, 4, 1, 20)
    with pytest.raises(ValueError, match="heads of 20"):
        prompt_kv_split.prompt_kv_attention(q, q, q, q[:, :2], q[:, :2], 0.2)


def test_split_provider_compiles_to_one_graph():
    """torch.compile (fullgraph, AOTAutograd) through ATen's attention and the provider's ops, with
    the eager gradients."""
    from svpt_kernels.triton import prompt_kv_split
    case = make("per-sample-prompts-M17-D24")
    inputs = [case.inputs[n].float().requires_grad_() for n in NAMES]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    compiled = torch.compile(prompt_kv_split.prompt_kv_attention, backend="aot_eager", fullgraph=True)
    grad = randn(torch.Generator().manual_seed(3), *case.inputs["q"].shape).float()
    compiled(*inputs, *case.args).backward(grad)
    prompt_kv_split.prompt_kv_attention(*twins, *case.args).backward(grad)
    torch._dynamo.reset()
    for a, b in zip(inputs, twins):
        assert rel_err(a.grad, b.grad) < 1e-6
