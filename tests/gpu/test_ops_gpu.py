"""Every op on every backend that computes it on CUDA, at ViT-B/16's sizes (run through the device
tool: ``python -m pytest -q tests/gpu -x``).

The shapes are each op module's ``VIT_B16`` (tests/ops/test_<op>.py), judged as there
(opcheck.check, METHOD.md): fp32 <= 1e-4 (tf32 off: fp32 means full fp32), float64 <= 1e-10,
fp16/bf16 <= 2x the eager backend's error in the same dtype on the GPU (plus FlashAttention's D
term for the attention backward); every case asserts by svpt.backends.trace() what ran. Eager's own
cases on CUDA: fp32 (its 16-bit runs are the yardstick). The SDPA provider, which the backends
prefer for 16-bit attention on CUDA, is checked at these sizes too. And AE's selection in bf16 at
ViT-B/16 scale on its own: the share of top-k patches that agree with float64, reported, >= 0.98.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import svpt.sdpa

import opcheck

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ops"))
import test_ae_update  # noqa: E402
import test_attention_saliency  # noqa: E402
import test_da_mix  # noqa: E402
import test_folded_cross_attention  # noqa: E402
import test_prompt_attention  # noqa: E402
import test_prompt_kv_attention  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODULES = {module.OP: module for module in (test_da_mix, test_prompt_attention, test_attention_saliency,
                                            test_ae_update, test_prompt_kv_attention, test_folded_cross_attention)}
FLOORS = {"prompt_attention": test_prompt_attention.FLASH, "prompt_kv_attention": test_prompt_kv_attention.FLASH}


def cuda_cases() -> list:
    """(op, shape, backend, dtype) for every case a backend computes itself on CUDA (eager: fp32)."""
    return [pytest.param(op, shape, row["backend"], opcheck.DTYPES[row["dtype"]],
                         id=f"{op}-{shape}-{row['backend']}-{row['dtype']}")
            for op, module in MODULES.items() for shape in module.VIT_B16 for row in opcheck.declared(op)
            if row["device"] == "cuda" and row["runs"] == row["backend"]
            and (row["backend"] != "eager" or row["dtype"] == "float32")]


def report(label: str, errors: dict) -> None:
    print(f"\n{label}")
    for key, (err, eager_err) in errors.items():
        print(f"  {key:<16} {err:.3e}  (eager {eager_err:.3e})")


@pytest.mark.parametrize("op,shape,backend,dtype", cuda_cases())
def test_op_at_vit_b16(op, shape, backend, dtype):
    errors = opcheck.check(MODULES[op].make(shape), backend, "cuda", dtype, floors=FLOORS.get(op))
    report(f"{op} {shape} on {backend} in {dtype}", errors)


@pytest.mark.parametrize("op,shape,backend,dtype", [
    case for case in cuda_cases() if case.values[0] in ("ae_update", "da_mix") and case.values[3] != torch.float32])
def test_row_local_op_on_a_float32_residual_at_vit_b16(op, shape, backend, dtype):
    """SVPT's blocks under autocast: the op on a float32 residual plus a 16-bit branch."""
    errors = opcheck.check(MODULES[op].residual_case(torch.float32, shape), backend, "cuda", dtype)
    report(f"{op} {shape} on a float32 residual, {backend} in {dtype}", errors)


@pytest.mark.parametrize("op,shape,backend,dtype", [
    case for case in cuda_cases() if case.values[0] in ("ae_update", "da_mix") and case.values[3] != torch.float32])
def test_row_local_op_with_its_layer_norm_at_vit_b16(op, shape, backend, dtype):
    """SVPT's blocks under autocast with ``norm``: a float32 residual plus a 16-bit branch, the row
    update and the block's float32 LayerNorm (fused on the Triton backend)."""
    errors = opcheck.check(MODULES[op].norm_case(dtype, torch.float32, shape), backend, "cuda", dtype)
    report(f"{op} {shape} with its LayerNorm, {backend} in {dtype}", errors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(test_prompt_attention.VIT_B16))
def test_sdpa_provider_at_vit_b16(shape, dtype):
    errors = opcheck.check(test_prompt_attention.make(shape), "sdpa", "cuda", dtype,
                           floors=test_prompt_attention.FLASH, provider=svpt.sdpa.prompt_attention)
    report(f"prompt_attention {shape} on sdpa in {dtype}", errors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(test_prompt_kv_attention.VIT_B16))
def test_split_provider_at_vit_b16(shape, dtype):
    """VPT-deep's attention split (ATen's cuDNN / FlashAttention over the token keys, given the merged
    output and log-sum-exp in backward; Triton kernels for the prompt keys)."""
    from svpt_kernels.triton import prompt_kv_split
    errors = opcheck.check(test_prompt_kv_attention.make(shape), "split", "cuda", dtype,
                           floors=test_prompt_kv_attention.FLASH, provider=prompt_kv_split.prompt_kv_attention)
    report(f"prompt_kv_attention {shape} on split in {dtype}", errors)


def share(got: torch.Tensor, want: torch.Tensor, k: int) -> float:
    """The share of ``got``'s top-k patches (per sample) that are ``want``'s too."""
    hits = torch.zeros(got.shape, dtype=torch.bool, device=got.device)
    hits.scatter_(1, want.topk(k, dim=-1).indices, True)
    return hits.gather(1, got.topk(k, dim=-1).indices).float().mean().item()


@pytest.mark.parametrize("shape", list(test_attention_saliency.VIT_B16))
@pytest.mark.parametrize("backend", sorted({row["backend"] for row in opcheck.declared("attention_saliency")
                                            if (row["device"], row["dtype"]) == ("cuda", "bfloat16")
                                            and row["runs"] == row["backend"] != "eager"}))
def test_selection_in_bf16_agrees_with_float64(backend, shape):
    """AE's top-k (ratio 0.25: 49 of 196 patches) from the bf16 saliency: the share of patches that
    float64 selects too. Asserted against float64 on the same bf16-rounded q and k (the backend's
    own error); reported also against float64 on the unrounded q and k, and eager's."""
    case = test_attention_saliency.make(shape)
    k = 49
    rounded = opcheck.execute(case, None, "cuda", torch.bfloat16).out
    exact = opcheck.execute(case, None, "cuda", torch.float64).out
    got = opcheck.execute(case, backend, "cuda", torch.bfloat16)
    eager = opcheck.execute(case, "eager", "cuda", torch.bfloat16).out
    assert got.log == [("attention_saliency", backend)]
    shares = {"backend vs float64 (same rounded inputs)": share(got.out, rounded, k),
              "backend vs float64 (unrounded inputs)": share(got.out, exact, k),
              "eager vs float64 (same rounded inputs)": share(eager, rounded, k),
              "eager vs float64 (unrounded inputs)": share(eager, exact, k)}
    print(f"\nAE top-{k} agreement, {shape}, {backend} in bf16:")
    for label, value in shares.items():
        print(f"  {label:<44} {value:.4f}")
    assert shares["backend vs float64 (same rounded inputs)"] >= 0.98, shares


def test_cpp_vpt_deep_attention_runs_the_kernel_sdpa_would_choose():
    """The cpp backend's 16-bit prompt_kv_attention calls ATen's cuDNN or FlashAttention kernel itself
    (svpt_kernels.cpp.fused_kv_kernel): the one PyTorch's SDPA would choose for such inputs here."""
    from torch.nn.attention import SDPBackend

    from svpt_kernels import cpp
    if cpp.why_unusable("cuda") is not None:
        pytest.skip(f"cpp cannot run on CUDA here: {cpp.why_unusable('cuda')}")
    q = torch.randn(8, 12, 247, 64, device="cuda", dtype=torch.bfloat16)
    choice = int(torch._fused_sdp_choice(q, q, q))
    expected = {int(SDPBackend.CUDNN_ATTENTION.value): "cudnn", int(SDPBackend.FLASH_ATTENTION.value): "flash"}
    assert cpp.fused_kv_kernel("cuda") == expected.get(choice), (choice, cpp.fused_kv_kernel("cuda"))


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_cpp_fused_kv_ops_pass_opcheck(kernel):
    """The two ops cpp registers in Python for its fused VPT-deep attention (opaque to torch.compile;
    tests/test_cpp_autograd.py opchecks the extension's own on CPU): schema, fake kernels against the
    real ones (shapes and strides of every output), and tracing, at ViT-B/16's head sizes."""
    from svpt_kernels import aten_attention, cpp  # noqa: F401  (cpp registers the ops)
    if kernel not in aten_attention.kernels(torch.cuda.current_device()):
        pytest.skip(f"ATen's {kernel} attention is not usable on this GPU or torch")
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(4, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv.unbind(2)
    pk, pv = torch.randn(2, 1, 50, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    args = (q, k, v, pk, pv, 0.125, kernel)
    torch.library.opcheck(torch.ops.svpt_cpp.fused_kv_attention_fwd.default, args)
    out, lse, seed, offset = torch.ops.svpt_cpp.fused_kv_attention_fwd(*args)
    grad = torch.randn(4, 197, 12, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    torch.library.opcheck(torch.ops.svpt_cpp.fused_kv_attention_bwd.default,
                          (grad, q, k, v, pk, pv, out, lse, seed, offset, 0.125, kernel))
