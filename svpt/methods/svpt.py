"""SVPT / iVPT (Zhou, Chen, Huang; TIP 2025): CDC + DA between blocks, AE inside them."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..backends import Kernels
from .base import layer_norm_args, mlp_branch, mlp_residual, replace_prompts, self_attention
from .vpt import _VPT


class DynamicAggregation(nn.Module):
    """DA's gate parameters: ``weight`` [L-1, 2, d] (zeros), ``bias`` [L-1] (``da_init_bias``)."""

    def __init__(self, depth: int, width: int, init_bias: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(depth - 1, 2, width))
        self.bias = nn.Parameter(torch.full((depth - 1,), float(init_bias)))


class AttentiveEnhancement(nn.Module):
    """AE's per-block step size ``scale`` [L] (``ae_init``)."""

    def __init__(self, depth: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((depth,), float(init)))


class SVPT(_VPT):
    method = "svpt"
    options = {"prompt_dropout": 0.0, "da_init_bias": -2.0, "ae_init": 0.0, "ae_ratio": 0.25,
               "ae_source": "cls", "ae_layers": None, "cdc": True}

    def __init__(self, *, da_init_bias: float, ae_init: float, ae_ratio: float, ae_source: str,
                 ae_layers: tuple[int, ...], cdc: bool, **kwargs) -> None:
        super().__init__(prompt_layers=kwargs["depth"], **kwargs)
        self.da_init_bias, self.ae_init, self.ae_ratio = da_init_bias, ae_init, ae_ratio
        self.ae_source, self.ae_layers, self.cdc = ae_source, ae_layers, cdc
        if cdc and self.depth > 1:
            self.da = DynamicAggregation(self.depth, self.width, da_init_bias)
        if ae_layers:
            self.ae = AttentiveEnhancement(self.depth, ae_init)
        # Saliency source rows: the class token (index 0) or the M prompt queries.
        self.saliency_rows = (0, 1) if ae_source == "cls" else (self.num_prefix, self.num_prompts)

    def layer_rows(self) -> dict[str, tuple[torch.Tensor, ...]]:
        rows = super().layer_rows()
        if self.cdc and self.depth > 1:
            rows["da_weight"], rows["da_bias"] = self.da.weight.unbind(0), self.da.bias.unbind(0)
        if self.ae_layers:
            rows["ae_scale"] = self.ae.scale.unbind(0)
        return rows

    def forward(self, x: torch.Tensor, blocks: nn.Sequential, use_checkpoint: bool = False,
                collect: Sequence[int] = ()):
        """As :meth:`PromptMethod.forward`, with each block given the next (its LayerNorm is fused
        into the block's last op): the token stream travels as ``(tokens, LN1 of the next block on
        them or None)`` between blocks."""
        rows = self.layer_rows()
        block = partial(self.block, kernels=self.kernels(x, blocks), rows=rows, blocks=blocks)
        return self.run_blocks(block, (self.enter(x, rows), None), blocks, use_checkpoint, collect,
                               lambda state: self.leave(state[0]))

    def block(self, layer: int, blk: nn.Module, state: tuple[torch.Tensor, torch.Tensor | None], kernels: Kernels,
              rows: dict, blocks: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block ``layer`` on ``state = (x, LN1(x) or None)``, where ``x``'s prompt rows already hold
        ``P_in[layer]``; its output's prompt rows hold ``P_in[layer + 1]`` (CDC + DA, with the block's
        last residual add). Doing the mix at the end of a block, not the start of the next, keeps a
        checkpointed block from writing its input.

        The row-local ops take each sub-layer's branch and its residual apart, and the LayerNorm
        that reads their result (``norm=``; ops.ae_update): a backend then fuses residual add, row
        update and LayerNorm into one pass, as torch.compile does for the plain block's add and
        LayerNorm, and returns the gradients of residual and branch each in its own dtype."""
        x, x_normed = state
        if layer in self.ae_layers:
            first_patch = self.num_prefix + self.num_prompts
            attn_out, saliency = self_attention(blk, x, kernels, (self.saliency_rows, first_patch), x_normed=x_normed)
            # int(): a plain number under torch.jit.trace too, where shapes are traced tensors
            k = max(1, round(self.ae_ratio * (int(x.shape[1]) - first_patch)))
            h, h_normed = _with_norm(kernels.ae_update(attn_out, saliency, rows["ae_scale"][layer], self.num_prefix,
                                                       self.num_prompts, k, x, layer_norm_args(blk.norm2)))
        else:
            h, h_normed = x + self_attention(blk, x, kernels, x_normed=x_normed)[0], None
        if layer + 1 == self.depth:
            return mlp_residual(blk, h, h_normed), None
        prompts = self.layer_prompts(rows, layer + 1, h.shape[0])
        if self.cdc:
            # (blocks may stop early: dense features of the first blocks only)
            norm = layer_norm_args(blocks[layer + 1].norm1) if layer + 1 < len(blocks) else None
            return _with_norm(kernels.da_mix(mlp_branch(blk, h, h_normed), prompts, rows["da_weight"][layer],
                                             rows["da_bias"][layer], self.num_prefix, h, norm))
        return replace_prompts(mlp_residual(blk, h, h_normed), prompts, self.num_prefix), None


def _with_norm(result: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An op's ``(out, LN(out))``, or ``(out, None)`` where it was called without ``norm``."""
    return result if isinstance(result, tuple) else (result, None)
