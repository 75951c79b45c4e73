"""svpt's Triton backend: row-local CDC+DA and AE, AE's saliency rows, flash attention, and the
exact fast paths of VPT-deep (KV-only attention) and CVPT (folded cross-attention).

Each op lives in its own module (kernels, launchers, autograd Function, torch.library op)
and has exactly the signature of :mod:`svpt.reference`. On CPU the kernels run only under
Triton's interpreter (``TRITON_INTERPRET=1``, for tests); ``"auto"`` uses them on CUDA only.
What the kernels compute themselves and what svpt.backends hands over is declared below.
"""
from __future__ import annotations

import torch

from . import _common
from .ae_update import ae_update
from .attention_saliency import attention_saliency
from .da_mix import da_mix
from .folded_cross_attention import FUSED_MAX_COLUMNS, folded_cross_attention
from .prompt_attention import prompt_attention
from .prompt_kv_attention import prompt_kv_attention

__all__ = ["AUTO_DEVICE_TYPES", "FAST_PATHS", "PREFER", "SUPPORTS", "ae_update", "attention_saliency", "da_mix",
           "folded_cross_attention", "prompt_attention", "prompt_kv_attention", "why_unusable"]

AUTO_DEVICE_TYPES = ("cuda",)
_DEVICES = ("cuda", "cpu") if _common.INTERPRET else ("cuda",)
# Triton's CPU interpreter gets bfloat16 wrong (tl.dot returns garbage, fp32 -> bf16 casts truncate): there
# bf16 goes to the reference.
_DTYPES = (torch.float32, torch.float16) if _common.INTERPRET else _common.KERNEL_DTYPES
_ALL = {"devices": _DEVICES, "dtypes": _DTYPES}
_ATTENTION = {**_ALL, "limits": {"head_dim": 256}}  # head dims padded to a power of two in registers
# What the kernels compute themselves; float64 (and the sizes past a limit) go to the reference.
# The in-place ops are autograd.Functions that mark their buffer dirty, which torch.jit.trace
# cannot record: while it traces, svpt.backends hands them to the reference.
_IN_PLACE = {**_ALL, "jit_trace": False}
SUPPORTS = {
    "da_mix": _IN_PLACE,
    "ae_update": _IN_PLACE,
    "attention_saliency": _ATTENTION,
    "prompt_attention": _ATTENTION,
    "prompt_kv_attention": _ATTENTION,
    # Wider folds run as two cuBLAS products and a softmax, which is the reference's composition.
    "folded_cross_attention": {**_ALL, "limits": {"logit_columns": FUSED_MAX_COLUMNS}},
}
# Measured faster than the kernels here: attention with nothing to fuse, in 16-bit on CUDA (cuDNN /
# FlashAttention through SDPA): at ViT-B/16, batch 128, M=50 on an H200, cuDNN's forward and backward
# take 4.0 ms per step (benchmarks/results/token_floor_h200_run0_profile.txt) where the Triton kernels
# took 6.0 (forward 1.45, dQ 1.45, dK/dV 2.73, delta 0.36). Their backward may accumulate with
# atomics, so under torch.use_deterministic_algorithms(True) the kernels run. prompt_kv_attention
# stays here: SDPA over the concatenated [prompt; token] keys (svpt.sdpa) was measured slower not
# compiled (37.06 vs 34.01 ms per VPT-deep M=50 step, ViT-B/16, batch 128, bf16, H200), 2% faster
# compiled (28.50 vs 29.09 ms) and 18% more memory either way (7.25 vs 6.17 GiB), since it stores
# the prompt keys and values once per sample (benchmarks/results/token_floor_vpt_deep_kv_h200.txt).
# The split provider (prompt_kv_split.py: ATen's attention over the token keys alone, Triton kernels
# for the prompt keys, merged by log-sum-exp; no concatenation) is not preferred here: it has not
# been timed on a GPU yet (token_floor.py's vpt-deep-split row).
# While torch.compile traces a forward on CUDA, CVPT's fold runs as plain PyTorch (svpt.fusible: two
# products and a softmax), which Inductor fuses with the block's residual add and LayerNorms: compiled
# CVPT M=10 step, ViT-B/16, batch 128, bf16, H100: 33.31 ms against 35.02 with the fused kernel
# (1.120x / 1.178x the no-prompt step; benchmarks/results/token_floor_compiled_variants_h100.txt).
PREFER = {
    "prompt_attention": [{"devices": ("cuda",), "dtypes": (torch.float16, torch.bfloat16), "use": "sdpa",
                          "why": "cuDNN/FlashAttention attention is faster than the Triton kernel in 16-bit",
                          "nondeterministic": True}],
    "folded_cross_attention": [{"devices": ("cuda",), "use": "fusible", "compiling": True,
                                "why": "measured faster compiled: Inductor fuses its two products and softmax "
                                       "with their neighbours (CVPT M=10, ViT-B/16, H100: 33.31 vs 35.02 ms a step)"}],
}
# The fast paths the methods use on this backend (see svpt.backends). The CVPT fold pays once
# CVPT folds all blocks' weights in one batched product per step (host time 40.1 -> 31.2 ms,
# so the step is no longer bound by the host): on an H200, M=10, 1.037x the no-prompt floor's
# step against 1.098x for the plain CA (benchmarks/results/profile_step_cvpt_fold_h200.txt).
FAST_PATHS = ("prompt_kv_attention", "folded_cross_attention")


def _why_not_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    if torch.version.hip is None and torch.cuda.get_device_capability() < (7, 0):
        return "Triton needs a CUDA GPU of compute capability 7.0 or newer"
    return None


def why_unusable(device: torch.device | None = None) -> str | None:
    """``None`` when the kernels can run on ``device`` (anywhere here when ``None``), else why not."""
    if device is None:
        if _why_not_cuda() is None or _common.INTERPRET:
            return None
        return (f"{_why_not_cuda()}, and TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests) "
                "was not set before svpt_kernels.triton was imported")
    device = torch.device(device)
    if device.type == "cuda":
        if _common.INTERPRET:
            return ("TRITON_INTERPRET=1 was set when svpt_kernels.triton was imported: the kernels "
                    "run in the CPU interpreter, not on the GPU")
        return _why_not_cuda()
    if device.type == "cpu":
        if _common.INTERPRET:
            return None
        return ("Triton kernels run on CUDA GPUs; on CPU only through the interpreter "
                "(set TRITON_INTERPRET=1 before importing svpt), which is for tests, not speed")
    return f"Triton kernels do not run on {device.type} devices"
