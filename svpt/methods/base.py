"""What every method shares: the prompt parameters' base module and the backbone's sub-layers.

The sub-layers reproduce timm's pre-norm ``Block`` in eval mode (dropout and drop-path are
identities there), with attention routed through :func:`svpt.ops.prompt_attention` (or, on
VPT-deep's fast path, :func:`svpt.ops.prompt_kv_attention`) so that every backend can run it.
"""
from __future__ import annotations

import math
import warnings
import weakref
from functools import partial
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backends import Kernels, kernels


_IDENTITY = nn.Identity()


def frozen(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a frozen eval-mode backbone layer, without the module call where the layer
    is an identity (dropout in eval too) or a plain Linear / LayerNorm / GELU: the same function,
    at a fraction of the host time (about 20 such calls per block, every step)."""
    kind = type(module)
    if kind is nn.Identity or (kind is nn.Dropout and not module.training):
        return x
    if kind is nn.Linear:
        weight, bias = module.weight, module.bias
        if torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling():
            weight, bias = _autocast_copy(weight, x.device.type), _autocast_copy(bias, x.device.type)
        return F.linear(x, weight, bias)
    if kind in _LAYER_NORMS and not getattr(module, "_fast_norm", False):
        return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)
    if kind is nn.GELU:
        return F.gelu(x, approximate=module.approximate)
    return module(x)


# id(weight) -> ((version, device, dtype), copy, weakref to the weight); an entry goes with its weight.
_AUTOCAST_COPIES: dict[int, tuple] = {}


def _autocast_copy(tensor: torch.Tensor | None, device_type: str) -> torch.Tensor | None:
    """A frozen weight in autocast's dtype, cast once and kept while the weight is unchanged.
    Autocast caches its casts only for tensors that require grad, so timm's blocks re-cast every
    frozen weight on every forward (about 2 ms of an SVPT step at ViT-B/16, batch 128, on an H200);
    the copy is the same rounding, so the result is identical. Not under torch.compile, which
    traces the casts itself."""
    if tensor is None or tensor.requires_grad or tensor.dtype == torch.float64:
        return tensor
    key = (tensor._version, tensor.device, torch.get_autocast_dtype(device_type))  # in-place updates bump _version
    found = _AUTOCAST_COPIES.get(id(tensor))
    if found is None or found[2]() is not tensor:
        weakref.finalize(tensor, _AUTOCAST_COPIES.pop, id(tensor), None)
    elif found[0] == key:
        return found[1]
    copy = tensor.detach().to(key[2])
    _AUTOCAST_COPIES[id(tensor)] = (key, copy, weakref.ref(tensor))
    return copy


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` through :func:`frozen`; any other MLP through its own forward."""
    if type(mlp) is not _TIMM_MLP:
        return mlp(x)
    for layer in (mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2):
        x = frozen(layer, x)
    return x


# timm's Mlp and LayerNorm classes: imported when the first model is prompted (import_timm_layers),
# not by `import svpt`, and read as plain globals, which torch.compile takes as constants.
_TIMM_MLP: type | None = None
_LAYER_NORMS: tuple[type, ...] = (nn.LayerNorm,)


def import_timm_layers() -> None:
    """Bind timm's ``Mlp`` and its ``LayerNorm`` subclass, whose forward is F.layer_norm unless
    its fast-norm flag is on."""
    global _TIMM_MLP, _LAYER_NORMS
    from timm.layers import LayerNorm, Mlp
    _TIMM_MLP, _LAYER_NORMS = Mlp, (nn.LayerNorm, LayerNorm)


def layer_norm_args(norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None, float] | None:
    """``(weight, bias, eps)`` of a frozen LayerNorm that F.layer_norm computes (the ``norm=`` argument
    of ops.da_mix and ops.ae_update); ``None`` for any other normalisation layer."""
    if type(norm) not in _LAYER_NORMS or getattr(norm, "_fast_norm", False):
        return None
    return norm.weight, norm.bias, norm.eps


def normed(block_norm: nn.Module, x: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """``block_norm(x)``, unless an op already computed it with ``x`` (``given``)."""
    return frozen(block_norm, x) if given is None else given


def self_attention(block: nn.Module, x: torch.Tensor, kernels: Kernels,
                   saliency: tuple[tuple[int, int], int] | None = None,
                   prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                   x_normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ls1(MSA(LN1(x)))`` as the block computes it, and AE's saliency when asked
    (``saliency = ((start, count), first column)``: from the same queries and keys).

    With ``prompt_kv`` (from :func:`prompt_keys_values`), the attention of ``x``'s rows also
    sees those extra keys/values, as if their tokens were in the sequence (VPT-deep's fast path).
    ``x_normed``: ``LN1(x)`` where an op computed it with ``x``.
    """
    attn = block.attn
    batch, tokens, _ = x.shape
    y = normed(block.norm1, x, x_normed)
    q, k, v = frozen(attn.qkv, y).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).unbind(2)
    q, k = frozen(attn.q_norm, q), frozen(attn.k_norm, k)
    if prompt_kv is None:
        out = kernels.prompt_attention(q, k, v, attn.scale)
    else:
        out = kernels.prompt_kv_attention(q, k, v, *prompt_kv, attn.scale)
    sal = None if saliency is None else kernels.attention_saliency(q, k, attn.scale, *saliency)
    out = frozen(getattr(attn, "norm", _IDENTITY), out.reshape(batch, tokens, -1))  # timm < 1.0.10: no norm
    gate = getattr(attn, "gate", None)  # timm >= 1.0.30 gated attention
    if gate is not None:
        out = out * gate(y).sigmoid()
    return frozen(block.ls1, frozen(attn.proj, out)), sal


def prompt_keys_values(block: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the block's attention gives prompt tokens ``prompts`` [1 or B, M, d]:
    ``k_norm(LN1(P) W_k + b_k)`` and ``LN1(P) W_v + b_v``, [1 or B, M, H, D], without their queries."""
    attn = block.attn
    width = prompts.shape[-1]
    bias = attn.qkv.bias
    kv = F.linear(block.norm1(prompts), attn.qkv.weight[width:], None if bias is None else bias[width:])
    k, v = kv.reshape(prompts.shape[0], prompts.shape[1], 2, attn.num_heads, attn.head_dim).unbind(2)
    return attn.k_norm(k), v


def mlp_branch(block: nn.Module, h: torch.Tensor, h_normed: torch.Tensor | None = None) -> torch.Tensor:
    """``ls2(MLP(LN2(h)))``, the MLP sub-layer's branch (``h_normed``: ``LN2(h)`` where an op computed it)."""
    return frozen(block.ls2, _mlp(block.mlp, normed(block.norm2, h, h_normed)))


def mlp_residual(block: nn.Module, h: torch.Tensor, h_normed: torch.Tensor | None = None) -> torch.Tensor:
    """``h + ls2(MLP(LN2(h)))``."""
    return h + mlp_branch(block, h, h_normed)


def plain_block(block: nn.Module, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """The unprompted block, ``x + ls1(MSA(LN1 x))`` then the MLP residual."""
    return mlp_residual(block, x + self_attention(block, x, kernels)[0])


def insert_prompts(x: torch.Tensor, prompts: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``[prefix, prompts, patches]`` from ``[prefix, patches]``."""
    prompts = prompts.expand(x.shape[0], -1, -1).to(x.dtype)
    return torch.cat([x[:, :num_prefix], prompts, x[:, num_prefix:]], dim=1)


def replace_prompts(x: torch.Tensor, prompts: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Overwrite the prompt rows of ``[prefix, prompts, patches]`` (VPT-deep)."""
    end = num_prefix + prompts.shape[-2]
    prompts = prompts.expand(x.shape[0], -1, -1).to(x.dtype)
    return torch.cat([x[:, :num_prefix], prompts, x[:, end:]], dim=1)


def remove_prompts(x: torch.Tensor, num_prefix: int, num_prompts: int) -> torch.Tensor:
    return torch.cat([x[:, :num_prefix], x[:, num_prefix + num_prompts:]], dim=1)


def vpt_init_bound(patch_size: tuple[int, int], width: int) -> float:
    """VPT's uniform init bound ``sqrt(6 / (3 p^2 + d))`` (0.0625 for ViT-B/16)."""
    return math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + width))


class PromptMethod(nn.Module):
    """Trainable parameters of one method and the forward of the prompted blocks.

    Subclasses name their parameters exactly as METHOD.md's checkpoint keys
    (``prompts``, ``da.weight``, ...), keep each option as an attribute of the same name,
    and implement ``block(layer, blk, x)`` (plus ``enter`` / ``leave`` if prompts travel
    in the token sequence).
    Attached to the model as ``model.prompter``; its training mode drives prompt dropout.
    """

    method: ClassVar[str]
    options: ClassVar[dict[str, object]] = {}

    def __init__(self, *, depth: int, width: int, num_prefix: int,
                 patch_size: tuple[int, int], num_prompts: int, prompt_layers: int,
                 prompt_dropout: float = 0.0) -> None:
        super().__init__()
        self.depth, self.width, self.num_prefix = depth, width, num_prefix
        self.num_prompts = num_prompts
        self.prompt_dropout = prompt_dropout
        bound = vpt_init_bound(patch_size, width)
        self.prompts = nn.Parameter(torch.empty(prompt_layers, num_prompts, width).uniform_(-bound, bound))
        self._fast_path_warned: set[str] = set()

    def layer_rows(self) -> dict[str, tuple[torch.Tensor, ...]]:
        """The method's per-block parameters ([L, ...] tensors) split into their blocks' rows, once
        per forward: one unbind, whose backward is one stack, where indexing each block's row
        would write every block's gradient into a zero [L, ...] tensor and add those up."""
        return {"prompts": self.prompts.unbind(0)}

    def layer_prompts(self, rows: dict, layer: int, batch: int) -> torch.Tensor:
        """``P[layer]`` (from :meth:`layer_rows`) as [1, M, d], or [B, M, d] with independent
        dropout per sample."""
        prompts = rows["prompts"][layer].unsqueeze(0)
        if self.training and self.prompt_dropout > 0:
            prompts = F.dropout(prompts.expand(batch, -1, -1), self.prompt_dropout, training=True)
        return prompts

    def forward(self, x: torch.Tensor, blocks: nn.Sequential, use_checkpoint: bool = False,
                collect: Sequence[int] = ()) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``blocks`` on ``x`` = [prefix, patches] the method's way; returns the same layout.

        With ``collect`` (block indices into ``blocks``), also returns the outputs of those blocks,
        in that order, each in the [prefix, patches] layout (prompt rows removed): the dense
        features of :mod:`svpt.dense`.
        """
        rows = self.layer_rows()
        block = partial(self.block, kernels=self.kernels(x, blocks), rows=rows)
        return self.run_blocks(block, self.enter(x, rows), blocks, use_checkpoint, collect, self.leave)

    def kernels(self, x: torch.Tensor, blocks: nn.Sequential) -> Kernels:
        """The ops for this forward, resolved once (svpt.backends.kernels) for the token stream's
        device and dtype and the sizes the backends' limits name."""
        attn = blocks[0].attn
        return kernels(x.device, x.dtype, head_dim=attn.head_dim, logit_columns=attn.num_heads * self.num_prompts)

    @staticmethod
    def run_blocks(block_fn, x: torch.Tensor, blocks: nn.Sequential, use_checkpoint: bool,
                   collect: Sequence[int] = (), leave=None):
        """``x = block_fn(layer, blk, x)`` for each block, checkpointed when asked; returns
        ``leave(x)`` (``leave``: the method's exit from its sequence layout, identity when
        ``None``) and, when ``collect`` names blocks, ``[leave(output of block i) for i in collect]``."""
        wanted = set(collect)
        taken = {}
        for layer, blk in enumerate(blocks):
            if use_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block_fn, layer, blk, x, use_reentrant=False)
            else:
                x = block_fn(layer, blk, x)
            if layer in wanted:
                taken[layer] = x if leave is None else leave(x)
        out = x if leave is None else leave(x)
        return (out, [taken[i] for i in collect]) if collect else out

    def fast_path(self, op: str, kernels: Kernels, inexact: str | None = None) -> bool:
        """Whether to run the exact fast path ``op`` (METHOD.md, "Fast path") here: the backend
        offers it, the prompts are the same for every sample (no prompt dropout in training)
        and nothing else makes it inexact (``inexact``: why, or ``None``). When only the
        latter conditions stop it, says so once per model (a warning) and returns ``False``."""
        if not kernels.fast_path(op):
            return False
        if self.training and self.prompt_dropout > 0:
            inexact = (f"prompt dropout ({self.prompt_dropout}) is active in training, so the prompts "
                       "differ per sample")
        if inexact is None:
            return True
        if op not in self._fast_path_warned:
            self._fast_path_warned.add(op)
            warnings.warn(f"svpt {self.method}: the {op} fast path does not apply ({inexact}); "
                          "running the plain path", RuntimeWarning, stacklevel=3)
        return False

    def enter(self, x: torch.Tensor, rows: dict) -> torch.Tensor:
        return x

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def describe(self) -> str:
        """The method and its options, for the model summary."""
        opts = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.options)
        return f"{self.method} (M={self.num_prompts}{', ' + opts if opts else ''})"

    def extra_repr(self) -> str:
        return self.describe()
