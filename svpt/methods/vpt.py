"""VPT (Jia et al., ECCV 2022): shallow and deep visual prompts."""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from ..backends import Kernels
from .base import (PromptMethod, insert_prompts, mlp_residual, plain_block, prompt_keys_values,
                   remove_prompts, replace_prompts, self_attention)


class _VPT(PromptMethod):
    """Prompts enter the sequence after the prefix tokens and leave it after the last block."""

    options = {"prompt_dropout": 0.0}

    def enter(self, x: torch.Tensor, rows: dict) -> torch.Tensor:
        return insert_prompts(x, self.layer_prompts(rows, 0, x.shape[0]), self.num_prefix)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        return remove_prompts(x, self.num_prefix, self.num_prompts)


class VPTShallow(_VPT):
    """``prompts`` [1, M, d] inserted once before block 0; their outputs flow on."""

    method = "vpt-shallow"

    def __init__(self, **kwargs) -> None:
        super().__init__(prompt_layers=1, **kwargs)

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, kernels: Kernels, rows: dict) -> torch.Tensor:
        return plain_block(blk, x, kernels)


class VPTDeep(_VPT):
    """``prompts`` [L, M, d]: before block l the prompt rows are overwritten with ``P[l]``.

    Fast path (exact; METHOD.md): block l's prompt outputs are discarded, so the prompts never
    enter the sequence; each block's attention gets their keys and values, computed once for
    the batch, as an extra key/value segment (``ops.prompt_kv_attention``).
    """

    method = "vpt-deep"

    def __init__(self, **kwargs) -> None:
        super().__init__(prompt_layers=kwargs["depth"], **kwargs)

    def forward(self, x: torch.Tensor, blocks: nn.Sequential, use_checkpoint: bool = False,
                collect: Sequence[int] = ()):
        kernels = self.kernels(x, blocks)
        if self.fast_path("prompt_kv_attention", kernels):
            block = partial(self.kv_only_block, kernels=kernels, rows=self.layer_rows())
            return self.run_blocks(block, x, blocks, use_checkpoint, collect)
        return super().forward(x, blocks, use_checkpoint, collect)

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, kernels: Kernels, rows: dict) -> torch.Tensor:
        if layer > 0:
            x = replace_prompts(x, self.layer_prompts(rows, layer, x.shape[0]), self.num_prefix)
        return plain_block(blk, x, kernels)

    def kv_only_block(self, layer: int, blk: nn.Module, x: torch.Tensor, kernels: Kernels,
                      rows: dict) -> torch.Tensor:
        """Block ``layer`` on ``x`` = [prefix, patches]: what the plain block gives those rows."""
        prompt_kv = prompt_keys_values(blk, self.layer_prompts(rows, layer, 1).to(x.dtype))
        return mlp_residual(blk, x + self_attention(blk, x, kernels, prompt_kv=prompt_kv)[0])
