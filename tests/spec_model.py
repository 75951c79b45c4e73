"""Independent float64 reference of the methods of /work/shared/METHOD.md.

Written from the specification only (not from the ``svpt`` package). It takes the
*unprompted* timm model (a deepcopy made before prompting) and runs the whole forward
with explicit attention math, so that autograd on the leaf prompt tensors gives the
reference gradients.

    logits = spec_forward(backbone, method, prompt_sd, options, images)

``prompt_sd``: dict with the keys of METHOD.md (``prompts``, ``da.weight``, ``da.bias``,
``ae.scale``, ``head.weight``, ``head.bias`` and ``head_dist.*`` for a distilled DeiT).
``options``: the keyword options given to ``svpt.prompt`` (``ae_source``, ``ae_ratio``,
``ae_layers``, ``cdc``, ``cvpt_position``; ``prompt_dropout`` is ignored: the reference
is the eval-mode forward, in which prompt dropout is the identity).

Interpretations where METHOD.md is terse (fixed by the brief):
  (1) AE ``ae_source="prompt"``: saliency = attention *probabilities* averaged over the
      heads and over the M prompt query rows;
  (2) ``k = max(1, round(ae_ratio * N))`` with Python's ``round`` (banker's rounding);
  (3) CVPT: the CA output is added to the residual stream without layer scale; SA/MLP
      keep theirs;
  (4) layer scale (ls1/ls2) as the backbone does in every block;
  (5) AE ``u = ae.scale[l] * mean over prompt rows of h``, h = z + ls1(attn).
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("none", "vpt-shallow", "vpt-deep", "svpt", "cvpt")

DEFAULT_OPTIONS = dict(
    ae_source="cls",
    ae_ratio=0.25,
    ae_layers=None,
    cdc=True,
    cvpt_position=3,
)


# ----------------------------------------------------------------------------- helpers
def _layer_scale(ls: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ls1/ls2 of a timm block: LayerScale (x * gamma) or Identity."""
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        assert isinstance(ls, nn.Identity), type(ls)
        return x
    return x * gamma


def _split_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """[..., S, H*dh] -> [..., H, S, dh]"""
    *lead, S, D = t.shape
    return t.reshape(*lead, S, H, D // H).transpose(-3, -2)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[..., H, S, dh] -> [..., S, H*dh]"""
    t = t.transpose(-3, -2)
    return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])


def _qkv_weights(attn: nn.Module):
    W = attn.qkv.weight  # [3*D, d], rows: q (heads concatenated), k, v
    b = attn.qkv.bias
    D = attn.num_heads * attn.head_dim
    Wq, Wk, Wv = W[:D], W[D:2 * D], W[2 * D:]
    if b is None:
        bq = bk = bv = None
    else:
        bq, bk, bv = b[:D], b[D:2 * D], b[2 * D:]
    return (Wq, bq), (Wk, bk), (Wv, bv)


def self_attention(attn: nn.Module, x: torch.Tensor):
    """timm ``Attention`` on the (already layer-normed) input x [B, T, d].

    Returns (output [B, T, d], probabilities [B, H, T, T])."""
    assert isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity), "scale_norm is not used by the test backbones"
    assert getattr(attn, "gate", None) is None
    H, dh = attn.num_heads, attn.head_dim
    (Wq, bq), (Wk, bk), (Wv, bv) = _qkv_weights(attn)
    q = _split_heads(F.linear(x, Wq, bq), H)  # [B, H, T, dh]
    k = _split_heads(F.linear(x, Wk, bk), H)
    v = _split_heads(F.linear(x, Wv, bv), H)
    q = attn.q_norm(q)
    k = attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) / (dh ** 0.5)
    p = torch.softmax(logits, dim=-1)
    o = _merge_heads(p @ v)  # [B, T, H*dh]
    return attn.proj(o), p


def cross_attention(attn: nn.Module, x: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """CVPT CA(x, P) with the block's frozen SA weights.

    x: residual stream [B, T, d] (not layer-normed); P: prompts [M, d] or [B, M, d]
    (not layer-normed). q from x, k and v from P, q/k norms as in SA, softmax over the
    M prompts, heads concatenated, output projection (with bias)."""
    assert isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
    H, dh = attn.num_heads, attn.head_dim
    (Wq, bq), (Wk, bk), (Wv, bv) = _qkv_weights(attn)
    q = attn.q_norm(_split_heads(F.linear(x, Wq, bq), H))  # [B, H, T, dh]
    k = attn.k_norm(_split_heads(F.linear(P, Wk, bk), H))  # [(B,) H, M, dh]
    v = _split_heads(F.linear(P, Wv, bv), H)
    logits = (q @ k.transpose(-1, -2)) / (dh ** 0.5)  # [B, H, T, M]
    A = torch.softmax(logits, dim=-1)
    o = _merge_heads(A @ v)  # [B, T, d]
    return attn.proj(o)


def mlp_sublayer(blk: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return h + _layer_scale(blk.ls2, blk.mlp(blk.norm2(h)))


def attn_sublayer(blk: nn.Module, z: torch.Tensor):
    a, p = self_attention(blk.attn, blk.norm1(z))
    return z + _layer_scale(blk.ls1, a), p


def plain_block(blk: nn.Module, z: torch.Tensor) -> torch.Tensor:
    h, _ = attn_sublayer(blk, z)
    return mlp_sublayer(blk, h)


def embed(bb: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """patch_embed -> (class/reg/dist tokens + position embedding) -> norm_pre."""
    x = bb.patch_embed(images)
    x = bb._pos_embed(x)
    x = bb.patch_drop(x)
    x = bb.norm_pre(x)
    return x


def has_class_token(bb: nn.Module) -> bool:
    return getattr(bb, "cls_token", None) is not None


def is_distilled(bb: nn.Module) -> bool:
    return getattr(bb, "dist_token", None) is not None and hasattr(bb, "head_dist")


def head_forward(bb: nn.Module, z: torch.Tensor, n_p: int, sd: Dict[str, torch.Tensor]):
    """Final norm, pooling over the unprompted token layout [prefix, patches], fc_norm, head."""
    z = bb.norm(z)
    if is_distilled(bb):
        x, x_dist = z[:, 0], z[:, 1]
        y = F.linear(x, sd["head.weight"], sd["head.bias"])
        y_dist = F.linear(x_dist, sd["head_dist.weight"], sd["head_dist.bias"])
        return (y + y_dist) / 2
    assert getattr(bb, "attn_pool", None) is None
    pool = bb.global_pool
    if pool == "token":
        x = z[:, 0]
    elif pool == "avg":
        x = z if getattr(bb, "pool_include_prefix", False) else z[:, n_p:]
        x = x.mean(dim=1)
    else:
        raise NotImplementedError(pool)
    x = bb.fc_norm(x)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def num_topk(ae_ratio: float, N: int) -> int:
    return max(1, round(ae_ratio * N))


# ----------------------------------------------------------------------------- forward
def spec_forward(
    backbone: nn.Module,
    method: str,
    prompt_sd: Dict[str, torch.Tensor],
    options: Optional[dict],
    images: torch.Tensor,
    saliency: Optional[list] = None,
) -> torch.Tensor:
    """Eval-mode float64 reference logits. ``backbone``: the unprompted timm model (float64).
    ``saliency``: a list that receives AE's saliency [B, N] of each AE block, in order (SVPT)."""
    assert method in METHODS, method
    opts = dict(DEFAULT_OPTIONS)
    opts.update({k: v for k, v in (options or {}).items()})
    bb = backbone
    assert not bb.training, "reference is the eval-mode forward"
    blocks = list(bb.blocks)
    L = len(blocks)
    n_p = bb.num_prefix_tokens

    z = embed(bb, images.to(bb.pos_embed.dtype if bb.pos_embed is not None else images.dtype))
    B = z.shape[0]
    prefix, patches = z[:, :n_p], z[:, n_p:]
    N = patches.shape[1]

    if method == "none":
        for blk in blocks:
            z = plain_block(blk, z)
        return head_forward(bb, z, n_p, prompt_sd)

    P = prompt_sd["prompts"]
    M = P.shape[1]

    if method == "vpt-shallow":
        assert P.shape[0] == 1
        z = torch.cat([prefix, P[0].expand(B, M, -1), patches], dim=1)
        for blk in blocks:
            z = plain_block(blk, z)
        z = torch.cat([z[:, :n_p], z[:, n_p + M:]], dim=1)  # strip prompts
        return head_forward(bb, z, n_p, prompt_sd)

    assert P.shape[0] == L, (P.shape, L)

    if method == "vpt-deep":
        for l, blk in enumerate(blocks):
            z = torch.cat([prefix, P[l].expand(B, M, -1), patches], dim=1)  # overwrite prompts
            z = plain_block(blk, z)
            prefix, patches = z[:, :n_p], z[:, n_p + M:]
        z = torch.cat([prefix, patches], dim=1)
        return head_forward(bb, z, n_p, prompt_sd)

    if method == "svpt":
        cdc = bool(opts["cdc"])
        ae_layers = opts["ae_layers"]
        ae_layers = set(range(L)) if ae_layers is None else set(int(i) for i in ae_layers)
        use_ae = len(ae_layers) > 0
        if cdc:
            W_da, b_da = prompt_sd["da.weight"], prompt_sd["da.bias"]  # [L-1, 2, d], [L-1]
            assert W_da.shape[:2] == (L - 1, 2) and b_da.shape == (L - 1,)
        if use_ae:
            scale = prompt_sd["ae.scale"]  # [L]
            assert scale.shape == (L,)
            if opts["ae_source"] == "cls" and not has_class_token(bb):
                raise ValueError("ae_source='cls' needs a class token")
            assert opts["ae_source"] in ("cls", "prompt")
        k = num_topk(float(opts["ae_ratio"]), N)
        P_out = None
        for l, blk in enumerate(blocks):
            # 1. CDC + DA
            if l == 0 or not cdc:
                P_in = P[l].expand(B, M, -1)
            else:
                g = torch.sigmoid(
                    P_out @ W_da[l - 1, 0] + P[l] @ W_da[l - 1, 1] + b_da[l - 1]
                ).unsqueeze(-1)  # [B, M, 1]
                P_in = g * P_out + (1 - g) * P[l]
            # 2. attention sub-layer
            z = torch.cat([prefix, P_in, patches], dim=1)
            h, p = attn_sublayer(blk, z)  # p: [B, H, T, T]
            # 3. AE
            if l in ae_layers:
                if opts["ae_source"] == "cls":
                    s = p[:, :, 0, n_p + M:].mean(dim=1)  # class token is token 0
                else:
                    s = p[:, :, n_p:n_p + M, n_p + M:].mean(dim=(1, 2))
                assert s.shape == (B, N)
                if saliency is not None:
                    saliency.append(s.detach())
                idx = torch.topk(s.detach(), k, dim=-1).indices  # [B, k], no gradient
                sel = torch.zeros(B, N, dtype=h.dtype)
                sel[torch.arange(B)[:, None], idx] = 1.0
                u = scale[l] * h[:, n_p:n_p + M].mean(dim=1)  # [B, d]
                h = torch.cat([h[:, :n_p + M], h[:, n_p + M:] + sel[:, :, None] * u[:, None, :]],
                              dim=1)
            # 4. MLP sub-layer
            z = mlp_sublayer(blk, h)
            prefix, P_out, patches = z[:, :n_p], z[:, n_p:n_p + M], z[:, n_p + M:]
        z = torch.cat([prefix, patches], dim=1)
        return head_forward(bb, z, n_p, prompt_sd)

    if method == "cvpt":
        pos = int(opts["cvpt_position"])
        assert pos in (1, 2, 3, 4, 5), pos
        x = z  # prompts never enter the SA sequence
        for l, blk in enumerate(blocks):
            Pl = P[l]
            if pos == 1:
                x = x + cross_attention(blk.attn, x, Pl)
                x = plain_block(blk, x)
            elif pos == 2:
                a, _ = self_attention(blk.attn, blk.norm1(x))
                x = x + _layer_scale(blk.ls1, a) + cross_attention(blk.attn, x, Pl)
                x = mlp_sublayer(blk, x)
            elif pos == 3:
                x, _ = attn_sublayer(blk, x)
                x = x + cross_attention(blk.attn, x, Pl)
                x = mlp_sublayer(blk, x)
            elif pos == 4:
                x, _ = attn_sublayer(blk, x)
                x = x + _layer_scale(blk.ls2, blk.mlp(blk.norm2(x) + cross_attention(blk.attn, x, Pl)))
            else:  # 5
                x = plain_block(blk, x)
                x = x + cross_attention(blk.attn, x, Pl)
        return head_forward(bb, x, n_p, prompt_sd)

    raise AssertionError(method)


def plain_forward(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Unprompted forward with the reference math (head from the backbone)."""
    sd = {"head.weight": backbone.head.weight, "head.bias": backbone.head.bias}
    if is_distilled(backbone):
        sd["head_dist.weight"] = backbone.head_dist.weight
        sd["head_dist.bias"] = backbone.head_dist.bias
    return spec_forward(backbone, "none", sd, None, images)


def reference_copy(model: nn.Module) -> nn.Module:
    """float64 eval-mode deepcopy of an *unprompted* backbone."""
    ref = copy.deepcopy(model).double().eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
