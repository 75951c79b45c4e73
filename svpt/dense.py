"""Dense features of a prompted ViT: timm's ``forward_intermediates`` contract, prompts removed.

timm's dense-prediction entry points (``forward_intermediates``, ``get_intermediate_layers``,
``prune_intermediate_layers`` and ``features_only=True``, which builds a ``FeatureGetterNet``
over the first) are the prompted model's methods of the same names, implemented here. Each
argument means what it means in timm's ``VisionTransformer``; the blocks run the method's way
(:meth:`svpt.methods.PromptMethod.forward` with ``collect``), so every intermediate is the
block's output in the unprompted ``[prefix, patches]`` layout: prompt tokens never appear in
a returned map or in the prefix tokens.

    model = svpt.prompt(timm.create_model("vit_base_patch16_224", dynamic_img_size=True), "svpt", 50)
    maps = model.forward_intermediates(images, indices=(3, 5, 7, 11), intermediates_only=True)

    net = timm.create_model("vit_base_patch16_224", features_only=True, out_indices=(3, 5, 7, 11))
    svpt.dense.prompt_features(net, "svpt", 50)     # prompts the ViT inside; net(images) -> 4 maps
"""
from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from torch import nn

from .checks import check_model_input
from .prompting import PromptedViTMixin, prompt

__all__ = ["forward_intermediates", "get_intermediate_layers", "prompt_features",
           "prune_intermediate_layers", "take_indices"]

OUTPUT_FORMATS = ("NCHW", "NLC")


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices`` with errors a user can act on: ``None`` is every block,
    an int n the last n blocks, a sequence those blocks (negative counts from the end)."""
    accepted = (f"accepted: None (all {num_blocks} blocks), an int n in 1..{num_blocks} (the last n), "
                f"or a sequence of block indices in {-num_blocks}..{num_blocks - 1}")
    if indices is None:
        return list(range(num_blocks))
    if _is_int(indices):
        if not 1 <= indices <= num_blocks:
            raise ValueError(f"indices={indices!r} is out of range; {accepted}")
        return list(range(num_blocks - int(indices), num_blocks))
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"indices={indices!r} is not accepted; {accepted}")
    chosen = list(indices)
    if not chosen or not all(_is_int(i) and -num_blocks <= i < num_blocks for i in chosen):
        raise ValueError(f"indices={indices!r} is not accepted; {accepted}")
    return [int(i) % num_blocks for i in chosen]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_image_size(model: nn.Module, images: torch.Tensor) -> None:
    """The sizes timm's patch embedding and position embedding accept, said before they assert."""
    embed = model.patch_embed
    height, width = images.shape[-2:]
    fixed = embed.img_size is not None and (
        embed.strict_img_size or (model.pos_embed is not None and not getattr(model, "dynamic_img_size", False)))
    if fixed and (height, width) != tuple(embed.img_size):
        raise ValueError(f"images are {height}x{width} but this model takes {embed.img_size[0]}x{embed.img_size[1]}; "
                         f"for {height}x{width} create it with timm.create_model(..., img_size=({height}, {width})) "
                         "(position embeddings resampled once, as timm does when loading weights) or "
                         "dynamic_img_size=True (interpolated at every forward)")
    patch_h, patch_w = embed.patch_size
    if not embed.dynamic_img_pad and (height % patch_h or width % patch_w):
        raise ValueError(f"images are {height}x{width}, not a multiple of the patch size {patch_h}x{patch_w}; "
                         "crop or pad them, or create the model with dynamic_img_pad=True")


def _embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The [prefix, patches] tokens entering block 0, as the prompted ``forward_features`` makes them."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def forward_intermediates(model: nn.Module, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                          return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                          output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                          attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """``model.forward_intermediates`` of a prompted model, with timm's arguments and results.

    Intermediates are in block order, each block once (as timm collects them). ``norm``: the
    final norm on each; ``stop_early``: run only up to the last wanted block (the final
    features then come from it); ``output_fmt``: ``"NCHW"`` maps [B, d, H, W] or ``"NLC"``
    tokens [B, N, d]; ``return_prefix_tokens``: (map, prefix [B, n_p, d]) pairs when the model
    has prefix tokens. Returns ``(final features, intermediates)``, the intermediates only, or
    timm's dict (``image_intermediates``, ``image_intermediates_prefix``, ``image_features``).
    """
    if attn_mask is not None or is_causal:
        raise ValueError("a prompted model does not take attn_mask or is_causal")
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt={output_fmt!r} is not accepted; accepted: {', '.join(OUTPUT_FORMATS)}")
    wanted = sorted(set(take_indices(len(model.blocks), indices)))
    check_model_input(model, x)
    _check_image_size(model, x)
    batch, _, height, width = x.shape
    blocks = model.blocks[: wanted[-1] + 1] if stop_early else model.blocks
    final, taken = model.prompter(_embed(model, x), blocks, use_checkpoint=model.grad_checkpointing,
                                  collect=wanted)
    if norm:
        taken = [model.norm(t) for t in taken]
    num_prefix = model.num_prefix_tokens
    prefix = [t[:, :num_prefix] for t in taken] if num_prefix else None
    maps = [t[:, num_prefix:] for t in taken]
    if output_fmt == "NCHW":
        grid_h, grid_w = model.patch_embed.dynamic_feat_size((height, width))
        maps = [t.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for t in maps]
    if output_dict:
        result = {"image_intermediates": maps}
        if prefix is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            result["image_features"] = model.norm(final)
        return result
    if return_prefix_tokens and prefix is not None:
        maps = list(zip(maps, prefix))
    return maps if intermediates_only else (model.norm(final), maps)


def get_intermediate_layers(model: nn.Module, x: torch.Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                            return_prefix_tokens: bool = False, norm: bool = False,
                            attn_mask: torch.Tensor | None = None) -> list:
    """timm's DINO-style accessor: the intermediates of blocks ``n`` (last n if an int), as
    [B, N, d] tokens or, with ``reshape``, [B, d, H, W] maps."""
    return forward_intermediates(model, x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                 output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                 attn_mask=attn_mask)


def prune_intermediate_layers(model: nn.Module, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                              prune_head: bool = True) -> list[int]:
    """timm's pruning (blocks after the last wanted one dropped; the final norm, and fc_norm and
    the classifier with ``prune_head``, replaced by identities); returns the absolute indices.
    The prompts of dropped blocks stay in ``prompt_state_dict`` (unused, they get no gradient),
    so checkpoints of the pruned and the full model are interchangeable."""
    take_indices(len(model.blocks), indices)  # timm only asserts
    return super(PromptedViTMixin, model).prune_intermediate_layers(indices, prune_norm=prune_norm,
                                                                   prune_head=prune_head)


def prompt_features(net: nn.Module, method: str, num_prompts: int, **options: Any) -> nn.Module:
    """Prompt the ViT inside a ``timm.create_model(..., features_only=True)`` model in place
    (timm's ``FeatureGetterNet``, which calls ``forward_intermediates``); returns ``net``.
    ``method``, ``num_prompts`` and ``options`` as :func:`svpt.prompt`. timm has already pruned
    that ViT to the last block of ``out_indices``, so it gets prompts for those blocks only."""
    from timm.models._features import FeatureGetterNet

    if not isinstance(net, FeatureGetterNet):
        raise TypeError(f"prompt_features takes a timm features_only model wrapping a ViT (FeatureGetterNet, "
                        f"what timm.create_model('vit_...', features_only=True) builds), got {type(net).__name__}; "
                        "prompt a plain ViT with svpt.prompt")
    prompt(net.model, method, num_prompts, **options)
    return net
