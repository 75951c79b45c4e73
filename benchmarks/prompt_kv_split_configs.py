"""The split VPT-deep attention (provider "split", svpt_kernels.triton.prompt_kv_split) against the
Triton backend's own prompt_kv_attention kernels, at VPT-deep's fast-path shape (issue 14): ViT-B/16,
batch 128, 12 heads of 64, 197 token queries against 50 prompt keys (batch 1) + 197 token keys,
bf16, q/k/v as views of timm's qkv buffer. Prints each part's time (ATen's forward and backward,
the merge kernel, the prompt-gradient kernel), then sweeps the two Triton kernels' block sizes one
at a time; a configuration whose outputs differ from the current one's beyond bf16 rounding is not
ranked. cuDNN's attention at the no-prompt 197 x 197 is printed for scale.

    PYTHONPATH=. python benchmarks/prompt_kv_split_configs.py
"""
import importlib
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from config_sweep import rank_configs  # noqa: E402
from fast_path_step import median_ms  # noqa: E402
from prompt_attention_configs import BATCH, DIM, HEADS, PROMPTS, SCALE, TOKENS, pkv  # noqa: E402  the same shape
from svpt_kernels import aten_attention  # noqa: E402

split = importlib.import_module("svpt_kernels.triton.prompt_kv_split")


def inputs():
    qkv = torch.randn(BATCH, TOKENS, 3, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (t.detach() for t in qkv.unbind(2)))
    pk, pv = (torch.randn(1, PROMPTS, HEADS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(2))
    grad = torch.randn(BATCH, TOKENS, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    return (q, k, v, pk, pv), grad


def fwd_bwd(provider, tensors, grad):
    return lambda: torch.autograd.grad(provider(*tensors, SCALE), tensors, grad)


def heads_first(t):
    return t.detach().transpose(1, 2)


def part_times(tensors, grad, kernel) -> dict:
    q, k, v, pk, pv = (t.detach() for t in tensors)
    qt, kt, vt = (heads_first(t) for t in (q, k, v))
    out_t, lse_t, seed, offset = aten_attention.forward(qt, kt, vt, SCALE, kernel)
    merge = lambda: split._merge_op(q, pk, pv, out_t.transpose(1, 2), lse_t, SCALE)  # noqa: E731
    out, lse = merge()
    dq = torch.empty_like(q)
    return {
        "aten fwd (197 x 197)": median_ms(lambda: aten_attention.forward(qt, kt, vt, SCALE, kernel), 20),
        "merge": median_ms(merge, 20),
        "aten bwd (197 x 197)": median_ms(lambda: aten_attention.backward(
            grad.transpose(1, 2), qt, kt, vt, out.transpose(1, 2), lse, seed, offset, SCALE, kernel), 20),
        "prompt grads (into dq)": median_ms(
            lambda: split._prompt_grads_into_op(grad, q, pk, pv, out, lse, dq, SCALE), 20),
    }


def sweep(name, attr, grid, check):
    """Times ``check`` with split.<attr> replaced by each config of ``grid``; prints the best five."""
    current = getattr(split, attr)
    rank_configs(name, grid, lambda cfg: setattr(split, attr, lambda *_: dict(cfg)), check, expected=check()[1])
    setattr(split, attr, current)


def main() -> None:
    tensors, grad = inputs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"ATen kernels {aten_attention.kernels(torch.cuda.current_device())}")
    qt, kt, vt = (heads_first(t).requires_grad_() for t in tensors[:3])
    cudnn = lambda: torch.autograd.grad(  # noqa: E731
        torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), (qt, kt, vt), grad.transpose(1, 2))
    print(f"SDPA fwd+bwd 197 x 197 (no prompts):   {median_ms(cudnn, 20):.3f} ms")
    with torch.no_grad():
        print(f"triton prompt_kv fwd:                  "
              f"{median_ms(lambda: pkv.prompt_kv_attention(*tensors, SCALE), 20):.3f} ms")
    print(f"triton prompt_kv fwd+bwd:              {median_ms(fwd_bwd(pkv.prompt_kv_attention, tensors, grad), 20):.3f} ms")
    for kernel in aten_attention.kernels(torch.cuda.current_device()):
        provider = lambda *a, kernel=kernel: split.PromptKVSplitFunction.apply(*a, kernel)  # noqa: E731
        with torch.no_grad():
            print(f"split ({kernel}) fwd:                   {median_ms(lambda: provider(*tensors, SCALE), 20):.3f} ms")
        print(f"split ({kernel}) fwd+bwd:               {median_ms(fwd_bwd(provider, tensors, grad), 20):.3f} ms")
        for part, ms in part_times(tensors, grad, kernel).items():
            print(f"  {part}: {ms:.3f} ms", flush=True)

    kernel = aten_attention.kernel_for(tensors[0].device, torch.bfloat16, DIM)
    q, k, v, pk, pv = (t.detach() for t in tensors)
    out_t, lse_t, *_ = aten_attention.forward(*(heads_first(t) for t in (q, k, v)), SCALE, kernel)

    def merge():
        fn = lambda: split._merge_op(q, pk, pv, out_t.transpose(1, 2), lse_t, SCALE)  # noqa: E731
        return median_ms(fn, 20), fn()
    sweep("merge", "_merge_config", [dict(BLOCK_M=m, num_warps=w) for m, w in itertools.product(
        (16, 32, 64, 128), (2, 4, 8))], merge)

    out, lse = merge()[1]

    def prompt_grads():
        dq = torch.zeros_like(q)
        fn = lambda: split._prompt_grads_into_op(grad, q, pk, pv, out, lse, dq, SCALE)  # noqa: E731
        ms = median_ms(fn, 20)
        dq.zero_()
        return ms, (*fn(), dq)
    sweep("prompt grads", "_bwd_config", [
        dict(BLOCK_M=m, SAMPLES=s, num_warps=w, num_stages=st)
        for m, s, w, st in itertools.product((16, 32, 64), (1, 2, 4, 8), (4, 8), (1, 2))], prompt_grads)


if __name__ == "__main__":
    main()
