"""SVPT / iVPT (Zhou, Chen, Huang; TIP 2025): CDC + DA between blocks, AE inside them."""
from __future__ import annotations

import torch
from torch import nn

from ..backends import Kernels
from .base import mlp_residual, replace_prompts, self_attention
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

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, kernels: Kernels, rows: dict) -> torch.Tensor:
        """Block ``layer`` on ``x``, whose prompt rows already hold ``P_in[layer]``; its output's
        prompt rows then become ``P_in[layer + 1]`` in place (CDC + DA). Doing the mix at the end
        of a block, not the start of the next, keeps a checkpointed block from writing its input."""
        if layer in self.ae_layers:
            first_patch = self.num_prefix + self.num_prompts
            attn_out, saliency = self_attention(blk, x, kernels, (self.saliency_rows, first_patch))
            # int(): a plain number under torch.jit.trace too, where shapes are traced tensors
            k = max(1, round(self.ae_ratio * (int(x.shape[1]) - first_patch)))
            h = kernels.ae_update(x + attn_out, saliency, rows["ae_scale"][layer], self.num_prefix, self.num_prompts, k)
        else:
            h = x + self_attention(blk, x, kernels)[0]
        z = mlp_residual(blk, h)
        if layer + 1 == self.depth:
            return z
        prompts = self.layer_prompts(rows, layer + 1, z.shape[0])
        if self.cdc:
            return kernels.da_mix(z, prompts, rows["da_weight"][layer], rows["da_bias"][layer], self.num_prefix)
        return replace_prompts(z, prompts, self.num_prefix)
