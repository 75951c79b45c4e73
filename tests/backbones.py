"""Tiny, deterministic, randomly initialised timm ViT backbones for the tests.

Every factory in ``BACKBONES`` builds a fresh float32 model in eval mode, with no
download (``pretrained=False`` semantics: the classes are instantiated directly) and
with every parameter re-drawn from a fixed seed so that nothing is trivially zero or
one (LayerNorm affine, biases, layer-scale gammas, tokens, position embeddings), and
weights are scaled ~1/sqrt(fan_in) so attention is far from uniform.

All models: img_size 32, patch_size 8 -> N = 16 patch tokens, num_classes 5, depth 3; a factory's
keyword arguments override its timm options (e.g. ``depth=2, img_size=24`` for the slow Triton
interpreter).
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

try:  # timm >= 0.9
    from timm.models.deit import VisionTransformerDistilled
except Exception:  # pragma: no cover
    VisionTransformerDistilled = None

IMG_SIZE = 32
PATCH_SIZE = 8
NUM_PATCHES = (IMG_SIZE // PATCH_SIZE) ** 2
NUM_CLASSES = 5

__all__ = [
    "BACKBONES", "make_images", "randomize_", "IMG_SIZE", "PATCH_SIZE",
    "NUM_PATCHES", "NUM_CLASSES", "vit_with_dropout",
]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter of ``model`` deterministically from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def rand(shape):
        return torch.rand(shape, generator=g, dtype=torch.float32)

    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            if mod.weight is not None:
                mod.weight.copy_(1.0 + 0.3 * randn(mod.weight.shape))
            if mod.bias is not None:
                mod.bias.copy_(0.1 * randn(mod.bias.shape))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(randn(mod.weight.shape) / fan_in ** 0.5)
            if mod.bias is not None:
                mod.bias.copy_(0.2 * randn(mod.bias.shape))
        elif hasattr(mod, "gamma") and isinstance(getattr(mod, "gamma"), nn.Parameter):
            # LayerScale: values in [0.1, 1) so it matters
            mod.gamma.copy_(0.1 + 0.9 * rand(mod.gamma.shape))
    for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            p.copy_(0.5 * randn(p.shape))
    return model


def _finish(model: nn.Module, seed: int) -> nn.Module:
    randomize_(model, seed)
    model.float()
    model.eval()
    return model


def _build(cls, seed: int, **kwargs) -> nn.Module:
    base = dict(img_size=IMG_SIZE, patch_size=PATCH_SIZE, num_classes=NUM_CLASSES,
                depth=3, mlp_ratio=2.0)
    base.update(kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**base)
    return _finish(model, seed)


def vit(**overrides) -> VisionTransformer:
    """Class token, token pooling, like ViT-B (tiny)."""
    return _build(VisionTransformer, 1, embed_dim=48, num_heads=4, global_pool="token", **overrides)


def deit(**overrides) -> nn.Module:
    """DeiT distilled: class + distillation token (2 prefix tokens), head + head_dist."""
    if VisionTransformerDistilled is None:  # pragma: no cover
        raise RuntimeError("timm has no VisionTransformerDistilled")
    return _build(VisionTransformerDistilled, 2, embed_dim=32, num_heads=2, global_pool="token", **overrides)


def dinov2(**overrides) -> VisionTransformer:
    """DINOv2-style: class token + 4 registers, layer scale (random gammas), no_embed_class."""
    return _build(VisionTransformer, 3, embed_dim=48, num_heads=4, global_pool="token",
                  reg_tokens=4, init_values=1e-5, no_embed_class=True, **overrides)


def noclass(**overrides) -> VisionTransformer:
    """No class token, average pooling (fc_norm on, final norm Identity)."""
    return _build(VisionTransformer, 4, embed_dim=32, num_heads=4, class_token=False,
                  global_pool="avg", **overrides)


def qknorm(**overrides) -> VisionTransformer:
    """Class token, qk_norm, average pooling with fc_norm."""
    return _build(VisionTransformer, 5, embed_dim=48, num_heads=4, qk_norm=True,
                  global_pool="avg", fc_norm=True, **overrides)


BACKBONES: Dict[str, Callable[[], nn.Module]] = {
    "vit": vit,
    "deit": deit,
    "dinov2": dinov2,
    "noclass": noclass,
    "qknorm": qknorm,
}


def make_images(batch: int, img_size: int = IMG_SIZE, seed: int = 0) -> torch.Tensor:
    """Deterministic random float32 images [batch, 3, img_size, img_size]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, img_size, img_size, generator=g, dtype=torch.float32)


def vit_with_dropout() -> VisionTransformer:
    """Like ``vit`` but with every backbone dropout / drop-path rate non-zero (0.3), to
    check that the prompted backbone stays in eval mode while the prompts train.
    Not in ``BACKBONES``."""
    return _build(VisionTransformer, 1, embed_dim=48, num_heads=4, global_pool="token",
                  drop_rate=0.3, pos_drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3,
                  drop_path_rate=0.3)
