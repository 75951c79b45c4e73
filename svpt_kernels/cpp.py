"""svpt's C++/CUDA backend: the compiled extension ``svpt_kernels._C`` (sources in csrc/).

Importing ``_C`` registers the ops ``torch.ops.svpt_cpp.*`` (a forward and a backward per
differentiable op; CPU kernels always, CUDA kernels when it was built with nvcc). This module
wraps them in ``torch.autograd.Function``s and exposes every op of :mod:`svpt.ops` (the two exact
fast paths included) with exactly the signatures of :mod:`svpt.reference`, and registers the
ops' fake kernels so that ``torch.compile`` traces them.

Gradients are first order: every backward raises an error naming the op when a differentiable
gradient is asked (``create_graph=True``), instead of returning a silently wrong or missing
second-order gradient (``gradgradcheck`` fails with that error; :func:`_first_order`).
``da_mix`` and ``ae_update`` work in place on the rows they change, forward and backward, as
:mod:`svpt.ops` specifies; their backward updates the incoming gradient's few rows in place too
(:func:`_writable`).

Dtypes: the inputs are promoted as the reference promotes them. On CPU, float16/bfloat16 are
computed in float32 (attention casts its inputs to float32 and the result back; da_mix,
ae_update and the saliency read and write the half types and accumulate in float32). On CUDA,
16-bit attention is handed to PyTorch's fused attention (declared in ``PREFER``; the VPT-deep
fast path calls ATen's cuDNN or FlashAttention kernels itself, :func:`fused_kv_kernel` says which).

If the extension was not built or does not load, this module still imports and
:func:`why_unusable` says why; ``svpt env`` shows it.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from svpt_kernels import aten_attention, traced, with_layer_norm

__all__ = ["AUTO_DEVICE_TYPES", "FAST_PATHS", "PREFER", "SUPPORTS", "ae_update", "attention_saliency", "build_info",
           "da_mix", "folded_cross_attention", "prompt_attention", "prompt_kv_attention", "why_unusable"]

_HALF = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float32, torch.float64, *_HALF)  # half types: float32 arithmetic on CPU

# "auto" picks this backend on CPU, and on CUDA where Triton is unusable (it comes after Triton):
# measured on an H200 against the Triton backend, ViT-B/16 training step, batch 128, bf16, not
# compiled / compiled: SVPT M=50 1.07x / 1.06x, CVPT M=10 1.04x / 0.97x, VPT-deep M=50 1.26x /
# 1.04x (benchmarks/results/cpp_cuda_step_h200*.txt); cpp SVPT 44.6 ms, eager SVPT 86.8 ms (another
# run: token_floor_h200_eager.txt). With cuDNN's attention and word-wise concatenation for VPT-deep's
# fast path, on an H100, not compiled / compiled: SVPT 0.99x / 1.08x, VPT-deep 1.14x / 1.07x, CVPT
# 1.05x / 1.05x (cpp_cuda_step_h100_custom_op.txt).
AUTO_DEVICE_TYPES = ("cpu", "cuda")
# The fast paths the methods use on this backend, per device type (svpt.backends.has_fast_path).
# CPU: both measured faster than the plain path, training step of ViT-Tiny/16 at 224, batch 32,
# fp32, 2 cores (median of paired steps): VPT-deep M=50 1.27x (1.58 vs 2.04 s), CVPT M=10 1.09x
# (1.30 vs 1.41 s); benchmarks/results/cpp_cpu_fast_paths.txt. CUDA: listed because the plain paths
# do strictly more work (VPT-deep's runs the M prompt rows through every block, 25% more tokens at
# M=50 on ViT-B/16; CVPT's runs the cross-attention's query and output projections per token, and
# the fold applies only where it is cheaper, svpt.methods.cvpt.fold_pays); the Triton backend's
# measurements of the same two paths agree (fast_path_step_h200.txt); the cpp steps with them are in
# benchmarks/results/cpp_cuda_step_h200*.txt.
FAST_PATHS = {"cpu": ("prompt_kv_attention", "folded_cross_attention"),
              "cuda": ("prompt_kv_attention", "folded_cross_attention")}
_ALL = {"devices": ("cpu", "cuda"), "dtypes": _DTYPES}
# The CUDA attention kernels keep a head's row in registers: head dims up to 128 (the saliency
# kernel stages rows in shared memory: up to 256). The limits apply on CPU too (one spec per op).
# The in-place ops are autograd.Functions that mark their buffer dirty, which torch.jit.trace
# cannot record: while it traces, svpt.backends hands them to the reference.
_IN_PLACE = {**_ALL, "jit_trace": False}
SUPPORTS = {
    "da_mix": _IN_PLACE,
    "ae_update": _IN_PLACE,
    "attention_saliency": {**_ALL, "limits": {"head_dim": 256}},
    "prompt_attention": {**_ALL, "limits": {"head_dim": 128}},
    "prompt_kv_attention": {**_ALL, "limits": {"head_dim": 128}},
    "folded_cross_attention": _ALL,
}
# 16-bit attention with nothing to fuse on CUDA: cuDNN / FlashAttention through SDPA. Measured on an
# H200, attention forward + backward at B=64, T=247, 12 heads of 64: this extension's kernel 12.3 ms,
# SDPA 1.4 ms in bf16 (benchmarks/results/cpp_gpu_tests.txt). CPU: nothing handed over, every op
# measured faster than eager at the op benchmark's shapes, forward and forward+backward (1.16x to
# 3.0x, 2 cores; benchmarks/results/cpp_cpu_ops.txt).
PREFER = {
    "prompt_attention": [{"devices": ("cuda",), "dtypes": _HALF, "use": "sdpa",
                          "why": "measured: SDPA (cuDNN/FlashAttention) 1.4 ms vs 12.3 ms for this extension's "
                                 "kernel, bf16 attention fwd+bwd at B=64, T=247 on an H200"}],
}
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
# What the extension was built with, asked once here: its info ops return no tensors, so a forward
# that torch.compile traces must not call them (the backends' checks run inside the traced forward).
_BUILD_INFO = _LOAD_ERROR or _ops.build_info()
_HAS_CUDA_KERNELS = _ops is not None and bool(_ops.has_cuda())


def build_info() -> str:
    """What the loaded extension contains, or why it is not there."""
    return _BUILD_INFO


def _cuda_archs() -> list[tuple[int, int, bool]]:
    """(major, minor, ptx) for each architecture the CUDA kernels were compiled for."""
    archs = _BUILD_INFO.split("CUDA archs ", 1)[1].split(")", 1)[0] if "CUDA archs " in _BUILD_INFO else ""
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


_WHY_NOT_CUDA: dict[int | None, str | None] = {}


# Asked when a backend's kernels are resolved, also inside a forward torch.compile traces: a fact of
# the process, which the compiler takes as a constant (called, not traced).
@torch.compiler.assume_constant_result
def _why_not_cuda(index: int | None) -> str | None:
    if index not in _WHY_NOT_CUDA:
        _WHY_NOT_CUDA[index] = _cuda_problem(index)
    return _WHY_NOT_CUDA[index]


def _cuda_problem(index: int | None) -> str | None:
    if not _HAS_CUDA_KERNELS:
        return (f"the C++ extension was built without CUDA kernels ({_BUILD_INFO}); they are built when a GPU "
                "is visible at install time or TORCH_CUDA_ARCH_LIST / SVPT_BUILD_CUDA=1 asks for them, with nvcc and "
                "a CUDA build of torch: pip install --no-build-isolation -e . (docs/cpp.md)")
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    major, minor = torch.cuda.get_device_capability(index)
    archs = _cuda_archs()
    # A cubin runs on the same major architecture with an equal or higher minor; PTX is
    # compiled by the driver for any newer GPU.
    if archs and not any((ma == major and mi <= minor) or (ptx and (ma, mi) <= (major, minor))
                         for ma, mi, ptx in archs):
        return (f"the CUDA kernels were compiled for {_BUILD_INFO}, not for this GPU (sm_{major}{minor}); "
                f"rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    return None


def _kernel_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # The CPU attention kernels are float32/float64; half types run in float32 there (exact upcast).
    if device.type == "cpu" and dtype in _HALF:
        return torch.float32
    return dtype


def _require(device: torch.device) -> None:
    if torch.compiler.is_compiling():
        return  # checked when svpt.backends resolved this backend for the traced forward
    reason = why_unusable(device)
    if reason is not None:
        raise RuntimeError(f"svpt backend 'cpp' cannot run on {device}: {reason}")


def _first_order(op: str):
    """Decorator for the backward of ``op``'s Function: it computes the first-order gradient (with
    no autograd graph); asked for a differentiable one (``create_graph=True``: a double backward,
    ``gradgradcheck``), it raises at once. (``once_differentiable`` alone would let
    ``torch.autograd.grad(..., allow_unused=True)`` of a second-order gradient return ``None``: its
    error node is not on the path to the inputs.)"""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"svpt backend 'cpp': {op} has first-order gradients only, and a differentiable gradient was "
                    "asked (create_graph=True: a double backward, a gradient penalty, gradgradcheck); run it on "
                    "backend 'eager' for higher-order gradients (svpt.set_backend('eager'))")
            return backward(ctx, *grads)
        return run
    return wrap


def _writable(grad: torch.Tensor) -> torch.Tensor:
    """The incoming gradient of an in-place op's output, to be updated on the rows the op changed:
    it is the gradient of the buffer the op wrote, which autograd hands to this node only (unless
    the caller passes it to ``backward`` as the output's gradient). Copied first when it is expanded
    or strided (e.g. from ``sum().backward()``) or requires grad (a cotangent its caller keeps)."""
    if grad.requires_grad or grad.stride(-1) != 1 or 0 in grad.stride():
        return grad.detach().contiguous() if not grad.is_contiguous() else grad.detach().clone()
    return grad


# ------------------------------------------------------------------------------------ da_mix
class _DaMix(torch.autograd.Function):
    """In place on the prompt rows; saves their old values [B, M, d], never the [B, T, d] buffer."""

    @staticmethod
    def forward(ctx, tokens, prompts, weight, bias, num_prefix):
        prev = _ops.da_mix_fwd(tokens, prompts, weight, bias, num_prefix)
        ctx.mark_dirty(tokens)
        ctx.save_for_backward(prev, prompts, weight, bias)
        ctx.num_prefix = num_prefix
        return tokens

    @staticmethod
    @_first_order("da_mix")
    def backward(ctx, grad):
        prev, prompts, weight, bias = ctx.saved_tensors
        grad = _writable(grad)
        grads = _ops.da_mix_bwd(grad, prev, prompts, weight, bias, ctx.num_prefix)
        return (grad, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:4])), None)


def da_mix(tokens, prompts, weight, bias, num_prefix, residual=None, norm=None):
    _require(tokens.device)
    tokens = _summed(tokens, residual)
    return with_layer_norm(_DaMix.apply(tokens, prompts.to(tokens.dtype), weight, bias.reshape(()), num_prefix), norm)


def _summed(branch, residual):
    """The row-local ops given a residual run in place on ``residual + branch``: the extension's
    backward rewrites the sum's gradient, which autograd then hands to both (no fused conversion);
    given a ``norm``, F.layer_norm follows (nothing fused)."""
    return branch if residual is None else residual + branch


# -------------------------------------------------------------------------- attention_saliency
def attention_saliency(q, k, scale, saliency_rows, saliency_cols):
    _require(q.device)
    dtype = torch.promote_types(q.dtype, k.dtype)
    start, count = saliency_rows
    return _ops.attention_saliency(q.detach().to(dtype), k.detach().to(dtype), float(scale), int(start), int(count),
                                   int(saliency_cols))


# --------------------------------------------------------------------------------- ae_update
class _AeUpdate(torch.autograd.Function):
    """In place on the k selected rows; saves the prompt-row mean [B, d] and the indices."""

    @staticmethod
    def forward(ctx, h, saliency, scale, num_prefix, num_prompts, k):
        mean, index = _ops.ae_update_fwd(h, saliency, scale, num_prefix, num_prompts, k)
        ctx.mark_dirty(h)
        ctx.save_for_backward(mean, index, scale)
        ctx.num_prefix, ctx.num_prompts = num_prefix, num_prompts
        return h

    @staticmethod
    @_first_order("ae_update")
    def backward(ctx, grad):
        mean, index, scale = ctx.saved_tensors
        grad = _writable(grad)
        grad_scale = _ops.ae_update_bwd(grad, mean, index, scale, ctx.num_prefix, ctx.num_prompts)
        return grad, None, grad_scale if ctx.needs_input_grad[2] else None, None, None, None


def ae_update(h, saliency, scale, num_prefix, num_prompts, k, residual=None, norm=None):
    _require(h.device)
    h = _summed(h, residual)
    return with_layer_norm(_AeUpdate.apply(h, saliency.detach(), scale.reshape(()), num_prefix, num_prompts, k), norm)


# ----------------------------------------------------------------------- prompt_attention
class _PromptAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _ops.prompt_attention_fwd(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)  # lse, never the probabilities
        ctx.scale = scale
        return out

    @staticmethod
    @_first_order("prompt_attention")
    def backward(ctx, grad_out):
        grads = _ops.prompt_attention_bwd(grad_out, *ctx.saved_tensors, ctx.scale)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def _promoted(*tensors: torch.Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors[1:]), tensors[0].dtype)


def prompt_attention(q, k, v, scale):
    _require(q.device)
    dtype = _promoted(q, k, v)
    kdt = _kernel_dtype(dtype, q.device)
    return _PromptAttention.apply(q.to(kdt), k.to(kdt), v.to(kdt), float(scale)).to(dtype)


# -------------------------------------------------------------------- prompt_kv_attention
class _PromptKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, scale):
        out, lse = _ops.prompt_kv_attention_fwd(q, k, v, prompt_k, prompt_v, scale)
        ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse)  # lse, never the probabilities
        ctx.scale = scale
        return out

    @staticmethod
    @_first_order("prompt_kv_attention")
    def backward(ctx, grad_out):
        grads = _ops.prompt_kv_attention_bwd(grad_out, *ctx.saved_tensors, ctx.scale)
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


def _segments(q, k, v, prompt_k, prompt_v, words: bool):
    """[prompt_k; k] and [prompt_v; v] in SDPA's [B, H, T, D] layout (the prompt segment expanded
    over the batch)."""
    batch = q.shape[0]
    k_all = _cat_rows(prompt_k.expand(batch, -1, -1, -1), k, words)
    v_all = _cat_rows(prompt_v.expand(batch, -1, -1, -1), v, words)
    return k_all.transpose(1, 2), v_all.transpose(1, 2)


_WORD, _WORD_BYTES = torch.int64, 8


def _as_words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` viewed as 8-byte words along its last dim (the same bytes), or None where its layout
    does not allow it."""
    size = t.element_size()
    if size >= _WORD_BYTES or t.stride(-1) != 1 or (t.shape[-1] * size) % _WORD_BYTES or t.data_ptr() % _WORD_BYTES:
        return None
    if any((stride * size) % _WORD_BYTES for stride in t.stride()[:-1]):
        return None
    return t.view(_WORD)


def _cat_rows(prompts: torch.Tensor, tokens: torch.Tensor, words: bool) -> torch.Tensor:
    """``torch.cat([prompts, tokens], 1)``, copied as 8-byte words where ``words`` and both layouts
    allow it (bit-exact). The token rows are strided views of qkv, for which ATen's cat copies
    element by element: with 16-bit elements those concatenations took 8.5 ms of cpp's 43.2 ms
    VPT-deep step on an H100 (benchmarks/results/profile_vpt_deep_cpp_h100.txt). Fake tensors
    (``words`` False) have no addresses to check."""
    pair = (_as_words(prompts), _as_words(tokens)) if words else (None,)
    if None in pair:
        return torch.cat([prompts, tokens], dim=1)
    return torch.cat(pair, dim=1).view(tokens.dtype)


def _fused_kv_fwd(q, k, v, prompt_k, prompt_v, scale: float, kernel: str, words: bool = True):
    """ATen's fused attention of q over [prompt; token] keys and values: (out, lse, seed, offset),
    out in ATen's [B, H, T, D] view."""
    k_all, v_all = _segments(q, k, v, prompt_k, prompt_v, words)
    out, lse, seed, offset = aten_attention.forward(q.transpose(1, 2), k_all, v_all, scale, kernel)
    # Without dropout ATen leaves the RNG state it returns unset, and its backward does not read it;
    # a custom op's outputs must be determined by its inputs (torch.library.opcheck compares them).
    return out, lse, seed.zero_(), offset.zero_()


def _fused_kv_bwd(grad_out, q, k, v, prompt_k, prompt_v, out, lse, seed, offset, scale: float, kernel: str,
                  words: bool = True):
    """The gradients of q and of the concatenated keys and values (rebuilt here), in ATen's [B, H, T, D]
    views."""
    k_all, v_all = _segments(q, k, v, prompt_k, prompt_v, words)
    return aten_attention.backward(grad_out.transpose(1, 2), q.transpose(1, 2), k_all, v_all, out, lse, seed,
                                   offset, scale, kernel)


# Opaque to torch.compile: traced through, AOTAutograd's partitioner merged the backward's rebuilt
# keys/values with the forward's (the same cat) and saved them for backward, 1.09 GiB more memory
# in the compiled VPT-deep step than Triton's (benchmarks/results/cpp_cuda_step_vpt_deep_h100.txt).
# Plain eager calls skip the custom-op dispatch (host time; see svpt_kernels.triton._common.define_op).
_FUSED_KV_FWD = torch.library.custom_op(
    "svpt_cpp::fused_kv_attention_fwd", _fused_kv_fwd, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v, float scale, str kernel) "
           "-> (Tensor, Tensor, Tensor, Tensor)")
_FUSED_KV_BWD = torch.library.custom_op(
    "svpt_cpp::fused_kv_attention_bwd", _fused_kv_bwd, mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v, Tensor out, "
           "Tensor lse, Tensor seed, Tensor offset, float scale, str kernel) -> (Tensor, Tensor, Tensor)")
_FUSED_KV_FWD.register_fake(lambda *args: _fused_kv_fwd(*args, words=False))
_FUSED_KV_BWD.register_fake(lambda *args: _fused_kv_bwd(*args, words=False))


def _call_fused_kv(op, fn, *args):
    return op(*args) if traced(*args) else fn(*args)


class _FusedKVAttention(torch.autograd.Function):
    """16-bit prompt_kv_attention on CUDA through ATen's fused attention kernels (cuDNN's or
    FlashAttention's, :func:`fused_kv_kernel`). The concatenated keys/values exist only inside the
    forward and the backward (rebuilt there, one cheap copy): what is kept for backward is the
    inputs, the output and the row log-sum-exp, as for the extension's own kernels, never a second
    copy of the sequence's keys and values."""

    @staticmethod
    def forward(ctx, q, k, v, prompt_k, prompt_v, scale, kernel):
        out, lse, seed, offset = _call_fused_kv(_FUSED_KV_FWD, _fused_kv_fwd, q, k, v, prompt_k, prompt_v, scale,
                                                kernel)
        ctx.save_for_backward(q, k, v, prompt_k, prompt_v, out, lse, seed, offset)
        ctx.scale, ctx.kernel = scale, kernel
        return out.transpose(1, 2)

    @staticmethod
    @_first_order("prompt_kv_attention")
    def backward(ctx, grad_out):
        dq, dk_all, dv_all = (t.transpose(1, 2) for t in _call_fused_kv(
            _FUSED_KV_BWD, _fused_kv_bwd, grad_out, *ctx.saved_tensors, ctx.scale, ctx.kernel))
        q, prompt_k = ctx.saved_tensors[0], ctx.saved_tensors[3]
        prompts = prompt_k.shape[1]
        batch_1 = prompt_k.shape[0] == 1 and q.shape[0] != 1

        def prompt_grad(g):
            g = g[:, :prompts]
            return g.sum(0, keepdim=True) if batch_1 else g
        return dq, dk_all[:, prompts:], dv_all[:, prompts:], prompt_grad(dk_all), prompt_grad(dv_all), None, None


def fused_kv_kernel(device: torch.device | str, head_dim: int = 64) -> str | None:
    """Which ATen kernel runs 16-bit prompt_kv_attention with heads of ``head_dim`` on ``device``
    (``"cudnn"``, ``"flash"``: multiples of 8, up to 128 and 256), or ``None`` where this extension's
    own kernels run it."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return aten_attention.kernel_for(device, torch.bfloat16, head_dim)


def prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale):
    """On CUDA in 16-bit ATen's fused attention kernels over the concatenated segments
    (:func:`fused_kv_kernel`); elsewhere this extension's kernels, which read the segments in turn."""
    _require(q.device)
    dtype = _promoted(q, k, v, prompt_k, prompt_v)
    kdt = _kernel_dtype(dtype, q.device)
    tensors = [t.to(kdt) for t in (q, k, v, prompt_k, prompt_v)]
    fused = aten_attention.kernel_for(q.device, kdt, q.shape[-1]) if q.is_cuda else None
    if fused is not None:
        tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
        return _FusedKVAttention.apply(*tensors, float(scale), fused)
    return _PromptKVAttention.apply(*tensors, float(scale)).to(dtype)


# ----------------------------------------------------------------- folded_cross_attention
class _FoldedCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_logits, b_logits, w_values, bias, residual, add_x):
        ctx.save_for_backward(x, w_logits, b_logits, w_values)  # the backward recomputes the probabilities
        ctx.has_bias, ctx.add_x = bias is not None, add_x
        return _ops.folded_cross_attention_fwd(x, w_logits, b_logits, w_values, bias, residual, add_x)

    @staticmethod
    @_first_order("folded_cross_attention")
    def backward(ctx, grad):
        x, w_logits, b_logits, w_values = ctx.saved_tensors
        need = ctx.needs_input_grad
        # In CVPT the output bias is a frozen projection's: its gradient (a sum over every row) only when asked.
        grads = _ops.folded_cross_attention_bwd(grad, x, w_logits, b_logits, w_values, ctx.has_bias and need[4],
                                                ctx.add_x)
        return (*(g if n else None for g, n in zip(grads, need)), grad if need[5] else None, None)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    try:
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    except RuntimeError:  # a device type autocast does not know
        return None


def _products_dtype(x: torch.Tensor, *weights: torch.Tensor) -> torch.dtype:
    """The dtype the reference's products run in: autocast's where it is on (as F.linear runs
    them; float64 excepted, autocast leaves it), else the promotion of the inputs."""
    dtype = _promoted(x, *weights)
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
def _acc(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the kernels for ``t``: float32 for the half types."""
    return torch.float32 if t.dtype in _HALF else t.dtype


if _ops is not None:
    @torch.library.register_fake("svpt_cpp::da_mix_fwd")
    def _(tokens, prompts, weight, bias, num_prefix):
        return tokens.new_empty((tokens.shape[0], prompts.shape[1], tokens.shape[2]))

    @torch.library.register_fake("svpt_cpp::da_mix_bwd")
    def _(grad, prev, prompts, weight, bias, num_prefix):
        return prompts.new_empty(prompts.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

    @torch.library.register_fake("svpt_cpp::attention_saliency")
    def _(q, k, scale, row_start, row_count, col_start):
        return q.new_empty((q.shape[0], k.shape[1] - col_start), dtype=torch.float32)

    @torch.library.register_fake("svpt_cpp::ae_update_fwd")
    def _(h, saliency, scale, num_prefix, num_prompts, k):
        return (h.new_empty((h.shape[0], h.shape[2]), dtype=_acc(h)),
                h.new_empty((h.shape[0], k), dtype=torch.int64))

    @torch.library.register_fake("svpt_cpp::ae_update_bwd")
    def _(grad, mean, index, scale, num_prefix, num_prompts):
        return scale.new_empty(scale.shape)

    @torch.library.register_fake("svpt_cpp::prompt_attention_fwd")
    def _(q, k, v, scale):
        b, tq, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((b, h, tq), dtype=_acc(q))

    @torch.library.register_fake("svpt_cpp::prompt_attention_bwd")
    def _(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("svpt_cpp::prompt_kv_attention_fwd")
    def _(q, k, v, prompt_k, prompt_v, scale):
        b, tq, h, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((b, h, tq), dtype=_acc(q))

    @torch.library.register_fake("svpt_cpp::prompt_kv_attention_bwd")
    def _(grad_out, q, k, v, prompt_k, prompt_v, out, lse, scale):
        return tuple(t.new_empty(t.shape) for t in (q, k, v, prompt_k, prompt_v))

    @torch.library.register_fake("svpt_cpp::folded_cross_attention_fwd")
    def _(x, w_logits, b_logits, w_values, bias, residual, add_x):
        return x.new_empty(x.shape)

    @torch.library.register_fake("svpt_cpp::folded_cross_attention_bwd")
    def _(grad, x, w_logits, b_logits, w_values, bias_grad, add_x):
        return (x.new_empty(x.shape), w_logits.new_empty(w_logits.shape),
                x.new_empty((0,) if b_logits is None else b_logits.shape), w_values.new_empty(w_values.shape),
                x.new_empty((x.shape[1],) if bias_grad else (0,)))
