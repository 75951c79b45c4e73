"""svpt's C++/CUDA backend: the compiled extension ``svpt_kernels._C`` (sources in csrc/).

Importing ``_C`` registers the ops ``torch.ops.svpt_cpp.*`` (a forward and a backward per
op; CPU kernels always, CUDA kernels when it was built with nvcc). This module wraps them
in ``torch.autograd.Function``s and exposes every op of :mod:`svpt.ops` (the two exact fast
paths included) with exactly the signatures of :mod:`svpt.reference`. Mixed input dtypes are
promoted as the reference promotes them before the kernels run; on CPU, float16/bfloat16
inputs are computed in float32 (the CPU kernels are float32/float64) and the result is cast back.

If the extension was not built or does not load, this module still imports and
:func:`why_unusable` says why; ``svpt env`` shows it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

__all__ = ["AUTO_DEVICE_TYPES", "FAST_PATHS", "SUPPORTS", "build_info", "folded_cross_attention",
           "prompt_attention", "prompt_kv_attention", "why_unusable"]

# "auto" uses the CUDA kernels nowhere yet: they are correct but slower than eager's cuBLAS path
# (attention fwd+bwd at B=64, T=247 on an H200: 12.3 ms vs 2.1 ms fp32, 1.4 ms bf16;
# benchmarks/results/cpp_gpu_tests.txt). svpt.set_backend("cpp") still runs them.
AUTO_DEVICE_TYPES = ("cpu",)
# The fast paths the methods use on this backend, per device type (svpt.backends.has_fast_path).
# CPU: both measured faster than the plain path, training step of ViT-Tiny/16 at 224, batch 32,
# fp32, 2 cores (median of paired steps): VPT-deep M=50 1.27x (1.58 vs 2.04 s), CVPT M=10 1.09x
# (1.30 vs 1.41 s); benchmarks/results/cpp_cpu_fast_paths.txt. CUDA: none; not measured on a GPU
# (tests/gpu/test_cpp_gpu.py::test_fast_path_ops_speed_vit_b16 records the op times), and "auto"
# does not pick this backend there.
FAST_PATHS = {"cpu": ("prompt_kv_attention", "folded_cross_attention"), "cuda": ()}
# What the extension computes itself (svpt.backends hands the rest to the reference, saying so).
# The row-local in-place da_mix / ae_update and the saliency rows are not in C++ yet.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # half types: fp32 on CPU
SUPPORTS = {op: {"devices": ("cpu", "cuda"), "dtypes": _DTYPES}
            for op in ("prompt_attention", "prompt_kv_attention", "folded_cross_attention")}
_BUILD_RECORD = "_C_not_built.txt"  # written by setup.py when the build was skipped or failed


def _load() -> str | None:
    """Import the compiled extension (registering torch.ops.svpt_cpp); the reason if that fails."""
    name = f"{__package__}._C"
    if importlib.util.find_spec(name) is None:
        reason = ("the C++ extension svpt_kernels._C is not built (`pip install --no-build-isolation .` compiles "
                  "it when torch is importable at build time and a C++ compiler is found; SVPT_BUILD_EXT=1 makes "
                  "a failed build an error, `pip install -v` shows the compiler output)")
        record = os.path.join(os.path.dirname(__file__), _BUILD_RECORD)
        if os.path.exists(record):
            with open(record) as f:
                reason += "; at install: " + f.read().strip()
        return reason
    try:
        importlib.import_module(name)
    except Exception as exc:  # ABI mismatch, missing symbol, ...: usually torch changed since the build
        return (f"the C++ extension svpt_kernels._C failed to load ({type(exc).__name__}: {exc}); "
                f"rebuild it against the installed torch {torch.__version__}")
    return None


_LOAD_ERROR = _load()
_ops = None if _LOAD_ERROR else torch.ops.svpt_cpp


def build_info() -> str:
    """What the loaded extension contains, or why it is not there."""
    if _LOAD_ERROR:
        return _LOAD_ERROR
    return _ops.build_info()


def _has_cuda_kernels() -> bool:
    return _ops is not None and bool(_ops.has_cuda())


def _cuda_archs() -> list[tuple[int, int, bool]]:
    """(major, minor, ptx) for each architecture the CUDA kernels were compiled for."""
    info = _ops.build_info()
    archs = info.split("CUDA archs ", 1)[1].split(")", 1)[0] if "CUDA archs " in info else ""
    out = []
    for item in archs.replace(";", " ").replace("_", " ").split():
        ptx = item.endswith("+PTX")
        major, _, minor = item.removesuffix("+PTX").partition(".")
        if major.isdigit() and minor[:1].isdigit():
            out.append((int(major), int(minor[:1]), ptx))
    return out


def why_unusable(device: torch.device | str | None = None) -> str | None:
    """``None`` when the extension can run the ops on ``device`` (on CPU when ``None``), else why not."""
    if _LOAD_ERROR:
        return _LOAD_ERROR
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the C++ extension has CPU and CUDA kernels, not {device.type} kernels"
    return _why_not_cuda(device.index)


@functools.lru_cache(maxsize=None)  # asked on every op call (svpt.backends.resolve): answer once per GPU
def _why_not_cuda(index: int | None) -> str | None:
    if not _has_cuda_kernels():
        return (f"the C++ extension was built without CUDA kernels ({_ops.build_info()}); reinstall with nvcc on "
                "PATH and a CUDA build of torch (SVPT_BUILD_CUDA=1 makes that an error)")
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    major, minor = torch.cuda.get_device_capability(index)
    archs = _cuda_archs()
    # A cubin runs on the same major architecture with an equal or higher minor; PTX is
    # compiled by the driver for any newer GPU.
    if archs and not any((ma == major and mi <= minor) or (ptx and (ma, mi) <= (major, minor))
                         for ma, mi, ptx in archs):
        return (f"the CUDA kernels were compiled for {_ops.build_info()}, not for this GPU (sm_{major}{minor}); "
                f"rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return None


def _kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # CPU kernels are float32/float64; half types run in float32 there (exact upcast).
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _require(device: torch.device) -> None:
    reason = why_unusable(device)
    if reason is not None:
        raise RuntimeError(f"svpt backend 'cpp' cannot run on {device}: {reason}")


# ----------------------------------------------------------------------- prompt_attention
class _PromptAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, start, count, cols):
        out, lse, saliency = _ops.prompt_attention_fwd(q, k, v, scale, start, count, cols)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(saliency)
        return out, saliency

    @staticmethod
    def backward(ctx, grad_out, _grad_saliency):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ops.prompt_attention_bwd(grad_out, q, k, v, out, lse, ctx.scale)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None, None)


def prompt_attention(q, k, v, scale):
    _require(q.device)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    kdt = _kernel_dtype(dtype, q.device)
    out, _ = _PromptAttention.apply(q.to(kdt), k.to(kdt), v.to(kdt), float(scale), 0, 0, 0)
    return out.to(dtype)


# -------------------------------------------------------------------- prompt_kv_attention
class _PromptKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, scale):
        out, lse = _ops.prompt_kv_attention_fwd(q, k, v, prompt_k, prompt_v, scale)
        ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse)  # lse, never the probabilities
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = _ops.prompt_kv_attention_bwd(grad_out, *ctx.saved_tensors, ctx.scale)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    _require(q.device)
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in (k, v, prompt_k, prompt_v)), q.dtype)
    kdt = _kernel_dtype(dtype, q.device)
    out = _PromptKVAttention.apply(*(t.to(kdt) for t in (q, k, v, prompt_k, prompt_v)), float(scale))
    return out.to(dtype)


# ----------------------------------------------------------------- folded_cross_attention
class _FoldedCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_logits, b_logits, w_values, bias, residual, add_x):
        ctx.save_for_backward(x, w_logits, b_logits, w_values)  # the backward recomputes the probabilities
        ctx.has_bias, ctx.add_x = bias is not None, add_x
        return _ops.folded_cross_attention_fwd(x, w_logits, b_logits, w_values, bias, residual, add_x)

    @staticmethod
    def backward(ctx, grad):
        x, w_logits, b_logits, w_values = ctx.saved_tensors
        grads = _ops.folded_cross_attention_bwd(grad, x, w_logits, b_logits, w_values, ctx.has_bias, ctx.add_x)
        need = ctx.needs_input_grad
        return (*(g if n else None for g, n in zip(grads, need)), grad if need[5] else None, None)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except RuntimeError:  # a device type autocast does not know
        return None


def _products_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype:
    """The dtype the reference's products run in: autocast's where it is on (as F.linear runs
    them; float64 excepted, autocast leaves it), else the promotion of the inputs."""
    dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights), x.dtype)
    autocast = _autocast_dtype(x.device)
    return autocast if autocast is not None and dtype != torch.float64 else dtype


def folded_cross_attention(x, w_logits, b_logits, w_values, bias=None, residual=None):
    _require(x.device)
    compute = _products_dtype(x, w_logits, w_values)
    kdt = _kernel_dtype(compute, x.device)
    # The kernels add the residual when it is already in their dtype (x itself: its gradient then
    # joins dx there); any other residual is added here, promoting as the reference's sum does.
    fused = residual is not None and residual.dtype == kdt
    add_x = fused and residual is x
    width = x.shape[-1]
    w_logits, w_values = w_logits.to(kdt), w_values.to(kdt)
    b_logits, bias = (None if t is None else t.to(kdt) for t in (b_logits, bias))
    res = residual.reshape(-1, width) if fused and not add_x else None  # the kernels take [rows, d]
    out = _FoldedCrossAttention.apply(x.to(kdt).reshape(-1, width), w_logits, b_logits, w_values, bias, res,
                                      add_x).reshape(x.shape)
    if residual is None:
        return out.to(compute)
    if fused:
        return out.to(torch.promote_types(residual.dtype, compute))
    return residual + out.to(compute)


# ------------------------------------------------- fake kernels: torch.compile traces the ops
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


if _ops is not None:
    @torch.library.register_fake("svpt_cpp::da_mix_fwd")
    def _(tokens, prompts, weight, bias, num_prefix):
        return torch.empty_like(tokens, memory_format=torch.contiguous_format)

    @torch.library.register_fake("svpt_cpp::da_mix_bwd")
    def _(grad, tokens, prompts, weight, bias, num_prefix):
        return (torch.empty_like(tokens, memory_format=torch.contiguous_format),
                prompts.new_empty(prompts.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape))

    @torch.library.register_fake("svpt_cpp::prompt_attention_fwd")
    def _(q, k, v, scale, start, count, cols):
        b, tq, h, _ = q.shape
        sal = q.new_empty((b, k.shape[1] - cols) if count else (0,), dtype=torch.float32)
        return q.new_empty(q.shape), q.new_empty((b, h, tq), dtype=_acc(q.dtype)), sal

    @torch.library.register_fake("svpt_cpp::prompt_attention_bwd")
    def _(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("svpt_cpp::prompt_kv_attention_fwd")
    def _(q, k, v, prompt_k, prompt_v, scale):
        b, tq, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((b, h, tq), dtype=_acc(q.dtype))

    @torch.library.register_fake("svpt_cpp::prompt_kv_attention_bwd")
    def _(grad_out, q, k, v, prompt_k, prompt_v, out, lse, scale):
        return tuple(t.new_empty(t.shape) for t in (q, k, v, prompt_k, prompt_v))

    @torch.library.register_fake("svpt_cpp::folded_cross_attention_fwd")
    def _(x, w_logits, b_logits, w_values, bias, residual, add_x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("svpt_cpp::folded_cross_attention_bwd")
    def _(grad, x, w_logits, b_logits, w_values, has_bias, add_x):
        return (x.new_empty(x.shape), w_logits.new_empty(w_logits.shape),
                x.new_empty((0,) if b_logits is None else b_logits.shape), w_values.new_empty(w_values.shape),
                x.new_empty((x.shape[1],) if has_bias else (0,)))

    @torch.library.register_fake("svpt_cpp::ae_update_fwd")
    def _(tokens, attn_out, saliency, scale, num_prefix, num_prompts, k):
        b, _, d = tokens.shape
        return (tokens.new_empty(tokens.shape), tokens.new_empty((b, k), dtype=torch.int64),
                tokens.new_empty((b, d), dtype=_acc(tokens.dtype)))

    @torch.library.register_fake("svpt_cpp::ae_update_bwd")
    def _(grad, rows, mean, scale, num_prefix, num_prompts):
        return grad.new_empty(grad.shape), scale.new_empty(scale.shape)
