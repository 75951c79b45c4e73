"""CVPT (Huang et al., ICCV 2025): cross-attention to prompts with the block's frozen weights."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..backends import Kernels
from .base import PromptMethod, mlp_residual, plain_block, self_attention


def cross_attention(block: nn.Module, x: torch.Tensor, prompts: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """CA(x, P): queries from ``x`` (not layer-normed), keys/values from ``P``, all through
    the block's own qkv / q_norm / k_norm / proj (shared tensors, no copies)."""
    attn = block.attn
    batch, tokens, _ = x.shape
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = (None,) * 3 if attn.qkv.bias is None else attn.qkv.bias.chunk(3)
    heads = (attn.num_heads, attn.head_dim)
    q = attn.q_norm(F.linear(x, w_q, b_q).reshape(batch, tokens, *heads))
    k = attn.k_norm(F.linear(prompts, w_k, b_k).reshape(prompts.shape[0], -1, *heads))
    v = F.linear(prompts, w_v, b_v).reshape(prompts.shape[0], -1, *heads)
    out = kernels.prompt_attention(q, k, v, attn.scale)
    return attn.proj(out.reshape(batch, tokens, -1))


def folded_weights(blocks: Sequence[nn.Module], prompts: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """CA(x, P)'s prompt side folded into the frozen projections (METHOD.md, CVPT fast path),
    for all blocks at once (``prompts`` [L, M, d], one per block): per block l and head h,
    ``scale * k_h W_q,h`` [M, d], ``scale * k_h b_q,h`` [M] and ``v_h W_o,h`` [M, d], as
    [L, H, M, d], [L, H, M] and [L, H, M, d]. One batched product per factor instead of a dozen
    small ops per block keeps the step's host time down. Exact only when the queries have no
    q_norm (it is nonlinear in x); k_norm acts on the prompt keys, fine."""
    attns = [blk.attn for blk in blocks]
    heads, dim, scale = attns[0].num_heads, attns[0].head_dim, attns[0].scale
    layers, num_prompts, width = prompts.shape
    has_bias = attns[0].qkv.bias is not None
    # Folded in the weights' dtype even under autocast: the products of these [M, d] factors are
    # rounded once, when the op casts them for its kernels.
    with torch.autocast(prompts.device.type, enabled=False):
        w_qkv = torch.stack([attn.qkv.weight for attn in attns])  # [L, 3d, d]
        b_qkv = torch.stack([attn.qkv.bias for attn in attns]) if has_bias else None
        w_out = torch.stack([attn.proj.weight for attn in attns])  # [L, d, H*D]
        kv = torch.matmul(prompts.to(w_qkv.dtype), w_qkv[:, width:].transpose(1, 2))  # [L, M, 2d]
        if has_bias:
            kv = kv + b_qkv[:, None, width:]
        k, v = kv.reshape(layers, num_prompts, 2, heads, dim).unbind(2)  # [L, M, H, D]
        if not all(isinstance(attn.k_norm, nn.Identity) for attn in attns):
            k = torch.stack([attn.k_norm(k_l) for attn, k_l in zip(attns, k)])
        k = k.transpose(1, 2) * scale  # [L, H, M, D]
        w_logits = k @ w_qkv[:, :width].reshape(layers, heads, dim, width)
        b_logits = (k @ b_qkv[:, :width].reshape(layers, heads, dim, 1)).squeeze(-1) if has_bias else None
        w_values = v.transpose(1, 2) @ w_out.reshape(layers, width, heads, dim).permute(0, 2, 3, 1)
    return w_logits, b_logits, w_values


def fold_pays(block: nn.Module, num_prompts: int) -> bool:
    """Whether to fold, by multiply-adds per token of a training step, with a measured margin.
    Plain CA: the q and output projections forward and backward (4 d^2; frozen, no weight
    gradients) plus the attention over M (6 d M). Folded: forward and input gradient (4 d H M)
    plus the folded weights' gradients, which the prompts need (2 d H M); equal at
    3 (H - 1) M = 2 d. The fold's [rows, H M] logits, probabilities and their gradients add
    memory traffic that this count leaves out: on an H200 (ViT-B/16, d = 768, H = 12) it paid
    at M = 20 and lost at M = 40 (benchmarks/results/cvpt_fold_variants_h200.txt), so it is
    used up to half that break-even, 3 (H - 1) M < d: M <= 23 for ViT-B/16."""
    return 3 * (block.attn.num_heads - 1) * num_prompts < block.attn.qkv.in_features


class CVPT(PromptMethod):
    """``prompts`` [L, M, d], never in the self-attention sequence; CA added at ``cvpt_position``.

    Fast path (exact; METHOD.md): once per step, the prompts' keys and values of every block are
    folded into the blocks' query and output projections (:func:`folded_weights`), and CA becomes
    ``ops.folded_cross_attention``, where the blocks have no q_norm and the fold is cheaper.
    """

    method = "cvpt"
    options = {"prompt_dropout": 0.0, "cvpt_position": 3}

    def __init__(self, *, cvpt_position: int, **kwargs) -> None:
        super().__init__(prompt_layers=kwargs["depth"], **kwargs)
        self.cvpt_position = cvpt_position

    def forward(self, x: torch.Tensor, blocks: nn.Sequential, use_checkpoint: bool = False,
                collect: Sequence[int] = ()):
        kernels = self.kernels(x, blocks)
        folded = None
        if self.fold_applies(blocks, kernels):  # per block (unbind: see layer_rows)
            folded = tuple(None if t is None else t.unbind(0) for t in folded_weights(blocks, self.prompts[: len(blocks)]))
        block = partial(self.block, kernels=kernels, rows=self.layer_rows(), folded=folded)
        return self.run_blocks(block, x, blocks, use_checkpoint, collect)

    def fold_applies(self, blocks: nn.Sequential, kernels: Kernels) -> bool:
        if not fold_pays(blocks[0], self.num_prompts):
            return False
        has_q_norm = any(not isinstance(blk.attn.q_norm, nn.Identity) for blk in blocks)
        return self.fast_path("folded_cross_attention", kernels, "the blocks have q_norm, nonlinear in x" if has_q_norm else None)

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, kernels: Kernels, rows: dict,
              folded: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...]]
              | None = None) -> torch.Tensor:
        """Block ``layer`` with CA at ``cvpt_position``; folded (fast path) when given the
        output of :func:`folded_weights` for all blocks."""
        if folded is not None:
            w_logits, b_logits, w_values = (None if t is None else t[layer] for t in folded)

            def ca(source: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
                """``residual + CA(source, P)``."""
                return kernels.folded_cross_attention(source, w_logits, b_logits, w_values, blk.attn.proj.bias, residual)
        else:
            prompts = self.layer_prompts(rows, layer, x.shape[0]).to(x.dtype)

            def ca(source: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
                return residual + cross_attention(blk, source, prompts, kernels)
        position = self.cvpt_position
        if position == 1:  # before SA
            return plain_block(blk, ca(x, x), kernels)
        if position == 5:  # after the MLP
            x = plain_block(blk, x, kernels)
            return ca(x, x)
        attn_out = self_attention(blk, x, kernels)[0]
        if position == 2:  # parallel to SA
            return mlp_residual(blk, ca(x, x + attn_out))
        h = x + attn_out
        if position == 3:  # after SA, before the MLP
            return mlp_residual(blk, ca(h, h))
        # position 4: added to the MLP input
        return h + blk.ls2(blk.mlp(ca(h, blk.norm2(h))))
