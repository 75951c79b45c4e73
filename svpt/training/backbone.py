"""The timm backbone of a run: created with ``pretrained=False`` (never a download), then
filled from a local weights file through timm's own loaders."""
from __future__ import annotations

import difflib
import os
import re
import sys

import torch
from torch import nn

from .config import ConfigError

# The quick-start model of ``svpt train`` with no arguments: timm's 6-block, width-64 test
# ViT with 4-pixel patches (64 tokens on the 32-pixel built-in images), fast on a CPU.
QUICKSTART = ("test_vit", {"patch_size": 4})
WEIGHT_FORMATS = (".npz", ".pth", ".pt", ".bin", ".safetensors")
_CLASSIFIER_PREFIXES = ("head.", "head_dist.")  # re-created with the data's classes by svpt.prompt


def create_backbone(name: str | None, model_kwargs: dict, img_size: int | None) -> tuple[str, dict, nn.Module]:
    """(timm name, kwargs used, model) with random init; ``name=None`` is the quick-start model."""
    import timm

    if name is None:
        name, model_kwargs = QUICKSTART[0], {**QUICKSTART[1], **model_kwargs}
    kwargs = dict(model_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(f"--model {name!r} is not a timm model name" +
                          (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit*')"))
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        # A model that does not take img_size & co. is usually not a ViT: say that, not the TypeError.
        _require_vit(name, timm.create_model(name, pretrained=False))
        raise ConfigError(f"timm.create_model({name!r}, **{kwargs}) failed: {exc}; check --model-kwargs") from None
    _require_vit(name, model)
    return name, model_kwargs, model


def _require_vit(name: str, model: nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"--model {name!r} is a {type(model).__name__}; svpt prompts timm VisionTransformer "
                          "models (ViT, DeiT, DINOv2 families, e.g. vit_base_patch16_224)")


def describe(model: nn.Module) -> str:
    blocks = getattr(model, "blocks", ())
    width = getattr(model, "embed_dim", "?")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", ("?",))[0]
    return f"depth {len(blocks)}, width {width}, patch {patch}"


# ---------------------------------------------------------------- weights files
def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Fill ``model`` from ``path``: ``.npz`` (the original JAX ViT format, e.g. ViT-B_16.npz)
    through timm's ``_load_weights``; ``.pth``/``.pt``/``.bin``/``.safetensors`` state dicts
    through timm's ``load_state_dict`` and the model's ``checkpoint_filter_fn``. The classifier
    head is not loaded (prompting re-creates it for the data's classes). A file that does not
    fit is a ``ConfigError`` naming the tensors that differ."""
    if not os.path.isfile(path):
        raise ConfigError(f"--weights {path!r}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in WEIGHT_FORMATS:
        raise ConfigError(f"--weights {path!r}: unknown format {ext or '(no extension)'!r}; "
                          f"accepted: {', '.join(WEIGHT_FORMATS)}")
    if ext == ".npz":
        _load_npz(model, path, name)
    else:
        _load_state_dict_file(model, path, name)


def _unfit(path: str, name: str, model: nn.Module, detail: str) -> ConfigError:
    return ConfigError(f"--weights {path!r} does not fit --model {name!r} ({describe(model)}): {detail}")


def _load_state_dict_file(model: nn.Module, path: str, name: str) -> None:
    from timm.models import load_state_dict

    try:
        state = load_state_dict(path, use_ema=True)  # unwraps 'state_dict'/'model'/EMA entries
    except Exception as exc:  # torch.load / safetensors errors vary by version; the reason is in the message
        raise ConfigError(f"--weights {path!r} is not a readable checkpoint: {type(exc).__name__}: {exc}") from None
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)  # timm's conversions: pos-embed/patch resampling, other layouts
        except Exception as exc:
            raise _unfit(path, name, model, f"timm's checkpoint_filter_fn failed: {type(exc).__name__}: {exc}") from None
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    problems = _state_dict_mismatch(state, expected)
    if problems:
        raise _unfit(path, name, model, problems + _file_shape_hint(state))
    model.load_state_dict(state, strict=False)  # strict for everything but the head, checked above


def _state_dict_mismatch(state: dict, expected: dict) -> str:
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    parts = []
    for label, items in (("tensors of another shape", shapes), ("tensors missing from the file", missing),
                         ("tensors the model does not have", extra)):
        if items:
            parts.append(f"{len(items)} {label} (e.g. {'; '.join(items[:3])})")
    return "; ".join(parts)


def _file_shape_hint(state: dict) -> str:
    depth = len({m.group(1) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return ""
    return f". The file holds a ViT of depth {depth}, width {proj.shape[0]}, patch {proj.shape[-1]}"


# ---------------------------------------------------------------- original ViT .npz
_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _npz_layout(w) -> dict | None:
    """Depth, width, heads, MLP width, patch and class token of an original-format ViT .npz."""
    prefix = next((p for p in _NPZ_PREFIXES if f"{p}embedding/kernel" in w.files), None)
    if prefix is None:
        return None
    kernel = w[f"{prefix}embedding/kernel"]
    blocks = {m.group(1) for k in w.files for m in [re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k)] if m}
    layout = {"width": kernel.shape[-1], "patch": kernel.shape[0] if kernel.ndim == 4 else None,
              "depth": len(blocks), "class token": f"{prefix}cls" in w.files}
    query = f"{prefix}Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    mlp = f"{prefix}Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
    if query in w.files:
        layout["heads"] = w[query].shape[1]
    if mlp in w.files:
        layout["mlp width"] = w[mlp].shape[-1]
    return layout


def _model_layout(model: nn.Module) -> dict:
    blk = model.blocks[0]
    return {"width": model.embed_dim, "patch": model.patch_embed.patch_size[0], "depth": len(model.blocks),
            "class token": getattr(model, "cls_token", None) is not None,
            "heads": blk.attn.num_heads, "mlp width": blk.mlp.fc1.out_features}


def _load_npz(model: nn.Module, path: str, name: str) -> None:
    import numpy as np

    try:
        with np.load(path) as w:
            layout = _npz_layout(w)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--weights {path!r} is not a readable .npz file: {exc}") from None
    if layout is None:
        raise ConfigError(f"--weights {path!r} is not a ViT checkpoint in the original .npz format "
                          "(no 'embedding/kernel' array)")
    if not hasattr(model, "load_pretrained"):
        raise ConfigError(f"--model {name!r} cannot read .npz files (timm has no load_pretrained for it)")
    ours = _model_layout(model)
    # A different patch size is resampled by timm (FlexiViT-style); every other difference is fatal.
    wrong = [f"{k} {layout[k]} in the file vs {ours[k]} in the model"
             for k in ours if k != "patch" and k in layout and layout[k] != ours[k]]
    if wrong:
        raise _unfit(path, name, model, "; ".join(wrong))
    try:
        model.load_pretrained(path)  # timm's _load_weights, as create_model(pretrained_cfg_overlay=dict(file=...))
    except (KeyError, RuntimeError, ValueError) as exc:
        raise _unfit(path, name, model, f"timm's .npz loader failed: {type(exc).__name__}: {exc}") from None


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean/std the backbone was trained with (timm's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def default_img_size(model: nn.Module) -> int:
    return int(model.patch_embed.img_size[0])


def to_uint8_normaliser(model: nn.Module, device: torch.device):
    """A function that turns a uint8 batch [B, 3, H, W] into normalised float32 on ``device``."""
    mean, std = input_stats(model)
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255

    def normalise(images: torch.Tensor) -> torch.Tensor:
        return (images.to(device, non_blocking=True).float() - shift) / scale

    return normalise
