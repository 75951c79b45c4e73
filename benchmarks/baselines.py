"""What users run today, written the way they write it: the baselines of the benchmarks.

* ``NoPromptFloor``: the frozen timm ViT with no prompts; one trainable vector is added to
  every input token so that backward runs through all blocks, as it must for prompts.
  Nothing a prompt method does can cost less.
* ``TimmVPTShallow``: the token floor: M prompts inserted once after the prefix tokens and carried
  through timm's own blocks; what the extra tokens alone cost. No method that keeps M prompt
  tokens in the sequence can cost less without making the backbone itself cheaper.
* ``TimmVPTDeep``: VPT-deep the usual way: ``torch.cat`` the prompts into the sequence and
  call timm's own blocks (PyTorch SDPA).
* ``PlainSVPT``: the best SVPT a skilled user writes in plain PyTorch: SDPA for the attention
  output and the AE saliency from a separate softmax of the class-token query row only.
The straightforward research-code SVPT (probabilities materialised) is svpt's own eager
backend, so it is not repeated here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _frozen(vit: nn.Module) -> nn.Module:
    vit.requires_grad_(False).eval()
    vit.head.requires_grad_(True)
    return vit


def _features_head(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vit.forward_head(vit.norm(x))


class NoPromptFloor(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = _frozen(vit)
        self.delta = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images)) + self.delta
        return _features_head(vit, vit.blocks(x))


class TimmVPTShallow(nn.Module):
    def __init__(self, vit: nn.Module, num_prompts: int) -> None:
        super().__init__()
        self.vit = _frozen(vit)
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, vit.embed_dim).uniform_(-0.06, 0.06))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit, n_p, m = self.vit, self.vit.num_prefix_tokens, self.prompts.shape[1]
        x = vit._pos_embed(vit.patch_embed(images))
        x = vit.blocks(torch.cat([x[:, :n_p], self.prompts.expand(x.shape[0], -1, -1), x[:, n_p:]], 1))
        return _features_head(vit, torch.cat([x[:, :n_p], x[:, n_p + m:]], 1))


class TimmVPTDeep(nn.Module):
    def __init__(self, vit: nn.Module, num_prompts: int) -> None:
        super().__init__()
        self.vit = _frozen(vit)
        self.prompts = nn.Parameter(torch.empty(len(vit.blocks), num_prompts, vit.embed_dim).uniform_(-0.06, 0.06))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit, n_p, m = self.vit, self.vit.num_prefix_tokens, self.prompts.shape[1]
        x = vit._pos_embed(vit.patch_embed(images))
        for layer, blk in enumerate(vit.blocks):
            skip = n_p + (m if layer else 0)
            x = blk(torch.cat([x[:, :n_p], self.prompts[layer].expand(x.shape[0], -1, -1), x[:, skip:]], 1))
        return _features_head(vit, torch.cat([x[:, :n_p], x[:, n_p + m:]], 1))


class PlainSVPT(nn.Module):
    """SVPT (cls-token AE in every block, CDC + DA) with SDPA; same tensors as svpt's."""

    def __init__(self, vit: nn.Module, num_prompts: int, ae_ratio: float = 0.25) -> None:
        super().__init__()
        self.vit = _frozen(vit)
        depth, d = len(vit.blocks), vit.embed_dim
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, d).uniform_(-0.06, 0.06))
        self.da_weight = nn.Parameter(torch.zeros(depth - 1, 2, d))
        self.da_bias = nn.Parameter(torch.full((depth - 1,), -2.0))
        self.ae_scale = nn.Parameter(torch.full((depth,), 0.1))
        self.ae_ratio = ae_ratio

    def _block(self, blk: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
        attn, n_p, m = blk.attn, self.vit.num_prefix_tokens, self.prompts.shape[1]
        first = n_p + m
        if layer:
            prev, p = x[:, n_p:first], self.prompts[layer]
            g = torch.sigmoid(prev @ self.da_weight[layer - 1, 0] + p @ self.da_weight[layer - 1, 1]
                              + self.da_bias[layer - 1]).unsqueeze(-1)
            x = torch.cat([x[:, :n_p], g * prev + (1 - g) * p, x[:, first:]], 1)
        b, t, d = x.shape
        q, k, v = attn.qkv(blk.norm1(x)).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)
        with torch.no_grad():  # the saliency row: class-token query only, no gradient
            saliency = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, first:].mean(1)
        h = x + blk.ls1(attn.proj(out.transpose(1, 2).reshape(b, t, d)))
        top = max(1, round(self.ae_ratio * (t - first)))
        rows = (saliency.topk(top, dim=-1).indices + first).unsqueeze(-1).expand(-1, -1, d)
        u = self.ae_scale[layer] * h[:, n_p:first].mean(1)
        h = h.scatter_add(1, rows, u.unsqueeze(1).expand(-1, top, -1).to(h.dtype))
        return h + blk.ls2(blk.mlp(blk.norm2(h)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vit, n_p, m = self.vit, self.vit.num_prefix_tokens, self.prompts.shape[1]
        x = vit._pos_embed(vit.patch_embed(images))
        x = torch.cat([x[:, :n_p], self.prompts[0].expand(x.shape[0], -1, -1), x[:, n_p:]], 1)
        for layer, blk in enumerate(vit.blocks):
            x = self._block(blk, x, layer)
        return _features_head(vit, torch.cat([x[:, :n_p], x[:, n_p + m:]], 1))
