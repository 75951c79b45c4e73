"""Input checks of svpt's ops and of the prompted model's entry, shared by every backend.

:mod:`svpt.ops` calls the ``check_<op>`` function of an op before it asks
:mod:`svpt.backends` for an implementation, so every backend sees only inputs the reference
(:mod:`svpt.reference`) can compute, and bad input fails the same way on all of them, with a
message that names the tensor, what it is and what is accepted, instead of a backend computing
garbage or failing deep inside a kernel.

What is checked (metadata only: no values are read, so nothing waits for a GPU):

* types: tensor arguments are tensors, integer arguments are integers, ``scale`` is a real number;
* device: every tensor on the device of the op's first tensor;
* dtype: float16, bfloat16, float32 or float64. Mixed dtypes follow the reference: tensors
  that the reference multiplies together (a matmul or ``F.linear``) must share one dtype, except
  under ``torch.autocast`` on their device type, which casts them (float64 excepted: autocast
  leaves it alone, so there float64 cannot be mixed with other dtypes); element-wise sums such
  as ``tokens + attn_out`` promote as torch does;
* shapes: ranks, matching sizes, ``num_prefix + M <= T``, ``k`` in ``1..N``, saliency rows and
  columns within the sequence.

Strides are not restricted, except that the buffer an op writes in place (``da_mix``'s tokens,
``ae_update``'s h) needs a unit stride along its last dimension, whatever the backend: the
kernels write its rows where they lie, and a copy would not be in place. Every other tensor may
have any strides (the kernel launchers make copies where a kernel needs unit strides). Values are not checked either: non-finite inputs
propagate (docs/method.md, "Numerical contract").
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

__all__ = ["SUPPORTED_DTYPES", "check_ae_update", "check_attention_saliency", "check_da_mix", "check_folded_cross_attention",
           "check_model_input", "check_prompt_attention", "check_prompt_kv_attention"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACCEPTED = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _dtype(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _tensors(op: str, named: Sequence[tuple[str, object]]) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs, ``None`` entries dropped; a non-tensor is a TypeError."""
    out = []
    for name, value in named:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"svpt.ops.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
        out.append((name, value))
    return out


def _same_device(op: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"svpt.ops.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"every input must be on one device (expected {first.device} for {name})")


def _float_dtypes(op: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    for name, t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"svpt.ops.{op}: {name} has dtype {_dtype(t.dtype)}; accepted: {_ACCEPTED}")


def _matmul_group(op: str, group: Iterable[tuple[str, torch.Tensor | torch.dtype | None]], why: str) -> None:
    """Tensors (or dtypes) the reference multiplies together: one dtype outside autocast; under
    autocast on their device type float64 cannot be mixed with the others (autocast leaves it)."""
    items = [(name, t.dtype if isinstance(t, torch.Tensor) else t, t) for name, t in group if t is not None]
    if not items:
        return
    dtypes = {d for _, d, _ in items}
    if len(dtypes) == 1:
        return
    device = next((t.device for _, _, t in items if isinstance(t, torch.Tensor)), None)
    autocast = device is not None and _autocast_on(device.type)
    if autocast and torch.float64 not in dtypes:
        return
    names = ", ".join(f"{name} ({_dtype(d)})" for name, d, _ in items)
    if autocast:
        raise TypeError(f"svpt.ops.{op}: {names} mix float64 with other dtypes; {why} must share one dtype "
                        "(torch.autocast does not cast float64)")
    raise TypeError(f"svpt.ops.{op}: {names} have different dtypes; {why} must share one dtype outside "
                    "torch.autocast (the reference multiplies them); cast them to one dtype or run under autocast")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...): no autocast there
        return False


def _int(op: str, name: str, value: object, minimum: int, maximum: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"svpt.ops.{op}: {name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        accepted = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise ValueError(f"svpt.ops.{op}: {name}={value} is out of range; it must be {accepted}{what}")
    return value


def _scalar_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"svpt.ops.{op}: {name} has shape {_shape(t)}; expected a scalar (shape () or (1,))")


def _scale(op: str, scale: object) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"svpt.ops.{op}: scale must be a real number (e.g. head_dim ** -0.5), got {scale!r}")
    # (not while torch.compile traces: a traced float is symbolic there, and isfinite breaks the graph)
    if not torch.compiler.is_compiling() and isinstance(scale, numbers.Real) and not math.isfinite(scale):
        raise ValueError(f"svpt.ops.{op}: scale={scale!r} must be finite")


def _common(op: str, named: Sequence[tuple[str, object]]) -> list[tuple[str, torch.Tensor]]:
    tensors = _tensors(op, named)
    _same_device(op, tensors)
    _float_dtypes(op, tensors)
    return tensors


# ---------------------------------------------------------------- the ops
def _written_in_place(op: str, name: str, t: torch.Tensor, residual: torch.Tensor | None) -> None:
    """``t`` is written in place unless a ``residual`` is given (then the op writes a new buffer)."""
    if residual is not None:
        if residual.shape != t.shape:
            raise ValueError(f"svpt.ops.{op}: residual has shape {_shape(residual)}; expected {name}'s shape {_shape(t)}")
        return
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"svpt.ops.{op}: {name} is written in place, so its last dimension must be contiguous "
                         f"(stride 1); got strides {tuple(t.stride())}; pass {name}.contiguous() and use the result")


def _norm(op: str, norm: object, residual: torch.Tensor | None, width: int) -> list[tuple[str, object]]:
    """``norm`` = (weight [d] or None, bias [d] or None, eps > 0), the frozen LayerNorm after a residual
    sum; returns its tensors for the common checks."""
    if norm is None:
        return []
    if not isinstance(norm, (tuple, list)) or len(norm) != 3:
        raise TypeError(f"svpt.ops.{op}: norm must be (weight, bias, eps) of a LayerNorm, got {norm!r}")
    if residual is None:
        raise ValueError(f"svpt.ops.{op}: norm is the LayerNorm of the residual sum; pass residual with it")
    weight, bias, eps = norm
    for name, t in (("norm weight", weight), ("norm bias", bias)):
        if isinstance(t, torch.Tensor) and (t.dim() != 1 or t.shape[0] != width):
            raise ValueError(f"svpt.ops.{op}: {name} has shape {_shape(t)}; expected [d={width}] or None")
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"svpt.ops.{op}: {name} requires grad; norm is the frozen backbone's LayerNorm, "
                             "whose parameters get no gradient here (detach them, or freeze the LayerNorm)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"svpt.ops.{op}: norm's eps must be a positive number, got {eps!r}")
    return [("norm weight", weight), ("norm bias", bias)]


def check_da_mix(tokens, prompts, weight, bias, num_prefix, residual=None, norm=None) -> None:
    op = "da_mix"
    width = tokens.shape[-1] if isinstance(tokens, torch.Tensor) else 0
    _common(op, [("tokens", tokens), ("prompts", prompts), ("weight", weight), ("bias", bias),
                 ("residual", residual), *_norm(op, norm, residual, width)])
    if tokens.dim() != 3:
        raise ValueError(f"svpt.ops.{op}: tokens has shape {_shape(tokens)}; expected [B, T, d]")
    _written_in_place(op, "tokens", tokens, residual)
    batch, length, width = tokens.shape
    if prompts.dim() != 3 or prompts.shape[0] not in (1, batch) or prompts.shape[2] != width or prompts.shape[1] < 1:
        raise ValueError(f"svpt.ops.{op}: prompts has shape {_shape(prompts)}; expected [1 or B={batch}, M >= 1, "
                         f"d={width}] for tokens {_shape(tokens)}")
    if weight.dim() != 2 or tuple(weight.shape) != (2, width):
        raise ValueError(f"svpt.ops.{op}: weight has shape {_shape(weight)}; expected [2, d={width}]")
    _scalar_tensor(op, "bias", bias)
    num_prompts = prompts.shape[1]
    _int(op, "num_prefix", num_prefix, 0, length - num_prompts,
         f" (T={length} tokens hold num_prefix + M={num_prompts} prompt rows)")
    rows = ("tokens", tokens) if residual is None else \
        ("residual + tokens", torch.promote_types(residual.dtype, tokens.dtype))
    _matmul_group(op, [rows, ("prompts", prompts), ("weight", weight)],
                  "tokens, prompts and weight (the gate's products)")


def _attention_shapes(op, q, k, v=None) -> None:
    if q.dim() != 4:
        raise ValueError(f"svpt.ops.{op}: q has shape {_shape(q)}; expected [B, Tq, H, D]")
    batch, tq, heads, dim = q.shape
    for name, t in (("k", k), ("v", v)):
        if t is None:
            continue
        if t.dim() != 4 or t.shape[0] not in (1, batch) or t.shape[1] < 1 or tuple(t.shape[2:]) != (heads, dim):
            raise ValueError(f"svpt.ops.{op}: {name} has shape {_shape(t)}; expected [1 or B={batch}, Tk >= 1, "
                             f"H={heads}, D={dim}] for q {_shape(q)}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"svpt.ops.{op}: k {_shape(k)} and v {_shape(v)} must have the same shape")
    if tq < 1 or dim < 1:
        raise ValueError(f"svpt.ops.{op}: q has shape {_shape(q)}; Tq and D must be >= 1")


def check_prompt_attention(q, k, v, scale) -> None:
    op = "prompt_attention"
    _common(op, [("q", q), ("k", k), ("v", v)])
    _scale(op, scale)
    _attention_shapes(op, q, k, v)
    _matmul_group(op, [("q", q), ("k", k), ("v", v)], "q, k and v")


def check_attention_saliency(q, k, scale, saliency_rows, saliency_cols) -> None:
    op = "attention_saliency"
    _common(op, [("q", q), ("k", k)])
    _scale(op, scale)
    _attention_shapes(op, q, k)
    tq, tk = q.shape[1], k.shape[1]
    if not isinstance(saliency_rows, (tuple, list)) or len(saliency_rows) != 2:
        raise TypeError(f"svpt.ops.{op}: saliency_rows must be (start, count), got {saliency_rows!r}")
    start, count = saliency_rows
    _int(op, "saliency_rows start", start, 0, tq - 1, f" (q has Tq={tq} rows)")
    _int(op, "saliency_rows count", count, 1, tq - start, f" (rows start..start+count-1 must lie in Tq={tq})")
    _int(op, "saliency_cols", saliency_cols, 0, tk - 1, f" (k has Tk={tk} columns)")
    _matmul_group(op, [("q", q), ("k", k)], "q and k")


def check_ae_update(h, saliency, scale, num_prefix, num_prompts, k, residual=None, norm=None) -> None:
    op = "ae_update"
    width = h.shape[-1] if isinstance(h, torch.Tensor) else 0
    _common(op, [("h", h), ("saliency", saliency), ("scale", scale), ("residual", residual),
                 *_norm(op, norm, residual, width)])
    if h.dim() != 3:
        raise ValueError(f"svpt.ops.{op}: h has shape {_shape(h)}; expected [B, T, d]")
    _written_in_place(op, "h", h, residual)
    _scalar_tensor(op, "scale", scale)
    batch, length, _ = h.shape
    _int(op, "num_prompts", num_prompts, 1)
    _int(op, "num_prefix", num_prefix, 0, length - num_prompts - 1,
         f" (T={length} tokens hold num_prefix + M={num_prompts} prompt rows + N >= 1 patch rows)")
    num_patches = length - num_prefix - num_prompts
    if saliency.dim() != 2 or tuple(saliency.shape) != (batch, num_patches):
        raise ValueError(f"svpt.ops.{op}: saliency has shape {_shape(saliency)}; expected [B={batch}, "
                         f"N={num_patches}] (N = T - num_prefix - num_prompts)")
    _int(op, "k", k, 1, num_patches, f" (N={num_patches} patch tokens)")


def check_prompt_kv_attention(q, k, v, prompt_k, prompt_v, scale) -> None:
    op = "prompt_kv_attention"
    _common(op, [("q", q), ("k", k), ("v", v), ("prompt_k", prompt_k), ("prompt_v", prompt_v)])
    _scale(op, scale)
    if q.dim() != 4 or q.shape[1] < 1:
        raise ValueError(f"svpt.ops.{op}: q has shape {_shape(q)}; expected [B, Tq >= 1, H, D]")
    batch, _, heads, dim = q.shape
    for name, t, batches, what in (("k", k, (batch,), f"B={batch}"), ("v", v, (batch,), f"B={batch}"),
                                   ("prompt_k", prompt_k, (1, batch), f"1 or B={batch}"),
                                   ("prompt_v", prompt_v, (1, batch), f"1 or B={batch}")):
        if t.dim() != 4 or t.shape[0] not in batches or t.shape[1] < 1 or tuple(t.shape[2:]) != (heads, dim):
            raise ValueError(f"svpt.ops.{op}: {name} has shape {_shape(t)}; expected [{what}, "
                             f"{'M' if name.startswith('prompt') else 'Tk'} >= 1, H={heads}, D={dim}] "
                             f"for q {_shape(q)}")
    if k.shape != v.shape or prompt_k.shape != prompt_v.shape:
        raise ValueError(f"svpt.ops.{op}: k {_shape(k)} / v {_shape(v)} and prompt_k {_shape(prompt_k)} / "
                         f"prompt_v {_shape(prompt_v)} must have matching shapes")
    # The reference concatenates [prompt_k; k] (promoting) before multiplying with q.
    keys = torch.promote_types(prompt_k.dtype, k.dtype)
    values = torch.promote_types(prompt_v.dtype, v.dtype)
    group = [("q", q), ("[prompt_k; k]", keys), ("[prompt_v; v]", values)]
    _matmul_group(op, group, "q and the keys and values")


def check_folded_cross_attention(x, w_logits, b_logits, w_values, bias=None, residual=None) -> None:
    op = "folded_cross_attention"
    _common(op, [("x", x), ("w_logits", w_logits), ("b_logits", b_logits), ("w_values", w_values),
                 ("bias", bias), ("residual", residual)])
    if x.dim() < 1:
        raise ValueError(f"svpt.ops.{op}: x has shape {_shape(x)}; expected [..., d]")
    width = x.shape[-1]
    if w_logits.dim() != 3 or w_logits.shape[2] != width or w_logits.shape[0] < 1 or w_logits.shape[1] < 1:
        raise ValueError(f"svpt.ops.{op}: w_logits has shape {_shape(w_logits)}; expected [H, M, d={width}]")
    if w_values.shape != w_logits.shape:
        raise ValueError(f"svpt.ops.{op}: w_values has shape {_shape(w_values)}; expected w_logits' shape "
                         f"{_shape(w_logits)}")
    if b_logits is not None and tuple(b_logits.shape) != tuple(w_logits.shape[:2]):
        raise ValueError(f"svpt.ops.{op}: b_logits has shape {_shape(b_logits)}; expected [H, M] = "
                         f"{tuple(w_logits.shape[:2])}")
    if bias is not None and tuple(bias.shape) != (width,):
        raise ValueError(f"svpt.ops.{op}: bias has shape {_shape(bias)}; expected [d={width}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"svpt.ops.{op}: residual has shape {_shape(residual)}; expected x's shape {_shape(x)}")
    _matmul_group(op, [("x", x), ("w_logits", w_logits), ("b_logits", b_logits)], "x, w_logits and b_logits")
    # The probabilities have x's (or autocast's) dtype and meet w_values and bias in the second product.
    _matmul_group(op, [("x", x), ("w_values", w_values), ("bias", bias)], "x, w_values and bias")


# ---------------------------------------------------------------- the prompted model
def check_model_input(model: torch.nn.Module, x: object) -> None:
    """Images entering a prompted model's ``forward_features``: a float tensor [B, C, H, W] on the
    model's device and, outside autocast, in the model's dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the prompted model takes images as a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    weight = model.patch_embed.proj.weight if hasattr(model.patch_embed, "proj") else next(model.parameters())
    if x.device != weight.device:
        raise ValueError(f"images are on {x.device} but the model is on {weight.device}; expected images on "
                         f"{weight.device} (move them with images.to({str(weight.device)!r}))")
    if not x.is_floating_point():
        raise TypeError(f"images have dtype {_dtype(x.dtype)}; expected a floating-point tensor in the model's "
                        f"dtype {_dtype(weight.dtype)} (convert and normalise integer images first)")
    if x.dim() != 4:
        raise ValueError(f"images have shape {_shape(x)}; expected [B, C, H, W]")
    if x.dtype != weight.dtype and (torch.float64 in (x.dtype, weight.dtype) or not _autocast_on(x.device.type)):
        raise TypeError(f"images have dtype {_dtype(x.dtype)} but the model's parameters are "
                        f"{_dtype(weight.dtype)}; expected images of dtype {_dtype(weight.dtype)} "
                        f"(images.to({weight.dtype}), or model.to({x.dtype}), or run under torch.autocast)")
