"""svpt's Triton backend: fused CDC+DA, flash attention with AE saliency, fused AE update, and
the exact fast paths of VPT-deep (KV-only attention) and CVPT (folded cross-attention).

Each op lives in its own module (kernels, launchers, autograd Function, torch.library op)
and has exactly the signature of :mod:`svpt.reference`. On CPU the kernels run only under
Triton's interpreter (``TRITON_INTERPRET=1``, for tests); ``"auto"`` uses them on CUDA only.
"""
from __future__ import annotations

import torch

from . import _common
from .ae_update import ae_update
from .da_mix import da_mix
from .folded_cross_attention import folded_cross_attention
from .prompt_attention import prompt_attention
from .prompt_kv_attention import prompt_kv_attention

__all__ = ["AUTO_DEVICE_TYPES", "FAST_PATHS", "ae_update", "da_mix", "folded_cross_attention",
           "prompt_attention", "prompt_kv_attention", "why_unusable"]

AUTO_DEVICE_TYPES = ("cuda",)
# The fast paths the methods use on this backend (see svpt.backends). The CVPT fold
# (folded_cross_attention) is implemented and tested but not listed: on an H200 its training
# step did not beat CVPT's plain path reliably. M=10, x the no-prompt floor, fold vs plain:
# 1.42 vs 1.35 before the kernel tuning; after it, 1.064 vs 1.096 in one run
# (benchmarks/results/cvpt_fold_variants_h200.txt) but 1.32 vs 1.25 in another
# (benchmarks/results/fast_path_step_h200.txt, with the fold forced on), and per call its
# forward + backward costs 1.29 ms against 0.59 ms for the two projections it replaces.
FAST_PATHS = ("prompt_kv_attention",)


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
