"""CVPT (Huang et al., ICCV 2025): cross-attention to prompts with the block's frozen weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .base import PromptMethod, mlp_residual, plain_block, self_attention


def cross_attention(block: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
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
    out, _ = ops.prompt_attention(q, k, v, attn.scale)
    return attn.proj(out.reshape(batch, tokens, -1))


class CVPT(PromptMethod):
    """``prompts`` [L, M, d], never in the self-attention sequence; CA added at ``cvpt_position``."""

    method = "cvpt"
    options = {"prompt_dropout": 0.0, "cvpt_position": 3}

    def __init__(self, *, cvpt_position: int, **kwargs) -> None:
        super().__init__(prompt_layers=kwargs["depth"], **kwargs)
        self.cvpt_position = cvpt_position

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        prompts = self.layer_prompts(layer, x.shape[0]).to(x.dtype)
        position = self.cvpt_position
        if position == 1:  # before SA
            return plain_block(blk, x + cross_attention(blk, x, prompts))
        if position == 5:  # after the MLP
            x = plain_block(blk, x)
            return x + cross_attention(blk, x, prompts)
        attn_out = self_attention(blk, x)[0]
        if position == 2:  # parallel to SA
            return mlp_residual(blk, x + attn_out + cross_attention(blk, x, prompts))
        h = x + attn_out
        if position == 3:  # after SA, before the MLP
            return mlp_residual(blk, h + cross_attention(blk, h, prompts))
        # position 4: added to the MLP input
        return h + blk.ls2(blk.mlp(blk.norm2(h) + cross_attention(blk, h, prompts)))
