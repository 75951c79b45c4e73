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


def folded_weights(block: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """CA(x, P)'s prompt side folded into the frozen projections (METHOD.md, CVPT fast path):
    per head h, ``scale * k_h W_q,h`` [M, d], ``scale * k_h b_q,h`` [M] and ``v_h W_o,h`` [M, d],
    stacked over heads ([H, M, d], [H, M], [H, M, d]), for prompts [1, M, d]. Exact only when
    the queries have no q_norm (it is nonlinear in x); k_norm acts on the prompt keys, fine."""
    attn = block.attn
    heads, dim = attn.num_heads, attn.head_dim
    width = prompts.shape[-1]
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = (None,) * 3 if attn.qkv.bias is None else attn.qkv.bias.chunk(3)
    # Folded in the weights' dtype even under autocast: the products of these [M, d] factors are
    # rounded once, when the op casts them for its kernels.
    with torch.autocast(prompts.device.type, enabled=False):
        prompts = prompts[0].to(w_k.dtype)
        k = attn.k_norm(F.linear(prompts, w_k, b_k).reshape(1, -1, heads, dim))[0] * attn.scale  # [M, H, D]
        v = F.linear(prompts, w_v, b_v).reshape(-1, heads, dim)
        w_logits = torch.einsum("mhe,hec->hmc", k, w_q.reshape(heads, dim, width))
        b_logits = None if b_q is None else torch.einsum("mhe,he->hm", k, b_q.reshape(heads, dim))
        w_values = torch.einsum("mhe,che->hmc", v, attn.proj.weight.reshape(width, heads, dim))
    return w_logits, b_logits, w_values


def fold_pays(block: nn.Module, num_prompts: int) -> bool:
    """Two [d x H*M] products per token instead of two [d x d] ones plus the attention over M
    (2 d M): cheaper while (H - 1) M < d."""
    return (block.attn.num_heads - 1) * num_prompts < block.attn.qkv.in_features


class CVPT(PromptMethod):
    """``prompts`` [L, M, d], never in the self-attention sequence; CA added at ``cvpt_position``.

    Fast path (exact; METHOD.md): the prompts' keys and values are folded into the block's
    query and output projections once per step (:func:`folded_weights`), and CA becomes
    ``ops.folded_cross_attention``, wherever the block has no q_norm and the fold is cheaper.
    """

    method = "cvpt"
    options = {"prompt_dropout": 0.0, "cvpt_position": 3}

    def __init__(self, *, cvpt_position: int, **kwargs) -> None:
        super().__init__(prompt_layers=kwargs["depth"], **kwargs)
        self.cvpt_position = cvpt_position

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        prompts = self.layer_prompts(layer, x.shape[0]).to(x.dtype)
        if not fold_pays(blk, self.num_prompts):
            fold = False
        else:
            q_norm = None if isinstance(blk.attn.q_norm, nn.Identity) else "the block has q_norm, nonlinear in x"
            fold = self.fast_path("folded_cross_attention", x.device, q_norm)
        if fold:
            folded = folded_weights(blk, prompts)

            def ca(source: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
                """``residual + CA(source, P)``."""
                return ops.folded_cross_attention(source, *folded, blk.attn.proj.bias, residual)
        else:
            def ca(source: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
                return residual + cross_attention(blk, source, prompts)
        position = self.cvpt_position
        if position == 1:  # before SA
            return plain_block(blk, ca(x, x))
        if position == 5:  # after the MLP
            x = plain_block(blk, x)
            return ca(x, x)
        attn_out = self_attention(blk, x)[0]
        if position == 2:  # parallel to SA
            return mlp_residual(blk, ca(x, x + attn_out))
        h = x + attn_out
        if position == 3:  # after SA, before the MLP
            return mlp_residual(blk, ca(h, h))
        # position 4: added to the MLP input
        return h + blk.ls2(blk.mlp(ca(h, blk.norm2(h))))
