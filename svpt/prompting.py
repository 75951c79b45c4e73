"""``svpt.prompt``: validate, freeze, attach a method to a timm VisionTransformer."""
from __future__ import annotations

import copyreg
import logging
import math
import numbers
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from .backends import caller_stacklevel, preload
from .checks import check_model_input
from .methods import METHODS, PromptMethod
from .methods.base import import_timm_layers

__all__ = ["is_prompted", "prompt", "summary"]

log = logging.getLogger("svpt")

_CLASSIFIERS = ("head", "head_dist")  # head_dist: DeiT's distillation head


def _vit_classes():
    # Attention lives in vision_transformer (timm 1.0.9) or timm.layers (re-exported there later)
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    return VisionTransformer, Block, Attention


# ---------------------------------------------------------------- option checks
def _real(name, value, accept, ok):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
        raise ValueError(f"{name}={value!r} is not accepted; {name} must be {accept}")
    return float(value)


def _check_ae_layers(value, depth):
    if value is None:
        return tuple(range(depth))
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"ae_layers={value!r} is not accepted; ae_layers must be None (all blocks) "
                        f"or a sequence of block indices in 0..{depth - 1}")
    layers = tuple(value)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < depth]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"ae_layers={value!r} is not accepted; it must list distinct block indices "
                         f"in 0..{depth - 1} (this model has {depth} blocks)")
    return tuple(sorted(int(i) for i in layers))


def _check_option(name: str, value: Any, depth: int) -> Any:
    if name == "prompt_dropout":
        return _real(name, value, "a number in [0, 1)", lambda v: 0 <= v < 1)
    if name == "da_init_bias":
        return _real(name, value, "a real number (-inf allowed, not NaN)", lambda v: not math.isnan(v) and v != math.inf)
    if name == "ae_init":
        return _real(name, value, "a finite real number", math.isfinite)
    if name == "ae_ratio":
        return _real(name, value, "a number in (0, 1]", lambda v: 0 < v <= 1)
    if name == "ae_source":
        if value not in ("cls", "prompt"):
            raise ValueError(f"ae_source={value!r} is not accepted; ae_source must be 'cls' or 'prompt'")
        return value
    if name == "ae_layers":
        return _check_ae_layers(value, depth)
    if name == "cdc":
        if not isinstance(value, bool):
            raise TypeError(f"cdc={value!r} is not accepted; cdc must be True or False")
        return value
    if name == "cvpt_position":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= 5:
            raise ValueError(f"cvpt_position={value!r} is not accepted; cvpt_position must be an "
                             "integer in 1..5 (1 before SA, 2 parallel to SA, 3 after SA, "
                             "4 added to the MLP input, 5 after the MLP)")
        return int(value)
    raise AssertionError(name)  # every declared option has a check above


def _resolve_options(cls: type[PromptMethod], options: dict, depth: int, has_class_token: bool) -> dict:
    all_options = sorted({name for m in METHODS.values() for name in m.options})
    for name in options:
        if name not in all_options:
            raise TypeError(f"unknown option {name!r}; svpt options are: {', '.join(all_options)}")
        if name not in cls.options:
            raise ValueError(f"option {name!r} does not apply to method {cls.method!r}; "
                             f"its options are: {', '.join(cls.options)}")
    resolved = {name: _check_option(name, value, depth) for name, value in {**cls.options, **options}.items()}
    if resolved.get("ae_layers") and resolved.get("ae_source") == "cls" and not has_class_token:
        raise ValueError("ae_source='cls' needs a class token, and this model has none "
                         "(class_token=False); use ae_source='prompt' (or ae_layers=() for no AE)")
    return resolved


# ---------------------------------------------------------------- model checks
def _check_model(model: Any, method: str) -> None:
    vit_cls, block_cls, attn_cls = _vit_classes()
    if is_prompted(model):
        raise ValueError(f"this model is already prompted ({model.prompter.describe()}); "
                         "prompt a fresh timm model instead")
    if not isinstance(model, vit_cls):
        raise TypeError(f"svpt.prompt takes a timm VisionTransformer, got {type(model).__name__}; "
                        "create one with timm.create_model('vit_...')")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not block_cls or type(blk.attn) is not attn_cls:
            raise TypeError(f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                            "svpt supports timm's pre-norm Block with timm.layers.Attention "
                            "(the ViT, DeiT and DINOv2 families)")
        if method == "cvpt" and (not isinstance(getattr(blk.attn, "norm", nn.Identity()), nn.Identity)
                                 or getattr(blk.attn, "gate", None) is not None):
            raise TypeError(f"block {i}'s attention normalises or gates its output before the projection; "
                            "CVPT's cross-attention (heads concatenated, then the output projection) is "
                            "defined for attention without scale_norm or gating")


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; {name} must be an integer >= {minimum}")
    return int(value)


# ---------------------------------------------------------------- the prompted model
class PromptedViTMixin:
    """Mixed into the model's own class by :func:`prompt`, so ``isinstance`` still holds and
    timm's ``forward``, ``forward_head``, ``reset_classifier`` and state dict keys are kept.
    Prompts are inserted after ``_pos_embed`` and removed before ``norm``, so pooling and
    the head see exactly the tokens of the unprompted model."""

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # before any check reads x, which a Proxy cannot answer
            raise RuntimeError(FX_UNSUPPORTED)
        if attn_mask is not None or is_causal:
            raise ValueError("a prompted model does not take attn_mask or is_causal")
        check_model_input(self, x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.prompter(x, self.blocks, use_checkpoint=self.grad_checkpointing)
        return self.norm(x)

    def train(self, mode: bool = True):
        """The backbone (and the rest of timm's model) stays in eval mode; ``mode`` only
        switches the prompts' training behaviour (prompt dropout)."""
        nn.Module.train(self, False)
        self.training = mode
        self.prompter.train(mode)
        return self

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, which also takes a prompt-only state dict: exactly the keys of
        :func:`svpt.prompt_state_dict` (``prompts``, ..., ``head.weight``), plus the metadata that
        :class:`svpt.timm_support.PromptCheckpointSaver` adds, checked against this model. So timm's
        ``load_checkpoint`` / ``resume_checkpoint`` and EMA loading read prompt-only checkpoints; those
        load strictly whatever ``strict`` says. A full state dict whose ``prompter.*`` tensors were made by
        another method or prompt count is a ValueError saying so (with ``strict=True``)."""
        from . import timm_support  # it imports this module
        if timm_support.is_prompt_only(state_dict):
            return timm_support.load_prompt_only(self, state_dict)
        if strict:
            timm_support.check_prompter_tensors(self, state_dict)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: one sentence instead of TorchScript's errors from deep inside
        raise RuntimeError(SCRIPT_UNSUPPORTED)

    def forward_intermediates(self, x, indices=None, return_prefix_tokens=False, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False, output_dict=False, attn_mask=None,
                              is_causal=False):
        """timm's ``forward_intermediates`` through the prompted blocks (:mod:`svpt.dense`)."""
        from . import dense  # dense imports this module
        return dense.forward_intermediates(self, x, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                           intermediates_only, output_dict, attn_mask, is_causal)

    def get_intermediate_layers(self, x, n=1, reshape=False, return_prefix_tokens=False, norm=False,
                                attn_mask=None):
        """timm's ``get_intermediate_layers`` through the prompted blocks (:mod:`svpt.dense`)."""
        from . import dense
        return dense.get_intermediate_layers(self, x, n, reshape, return_prefix_tokens, norm, attn_mask)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """timm's ``prune_intermediate_layers``; the prompts of dropped blocks are kept (:mod:`svpt.dense`)."""
        from . import dense
        return dense.prune_intermediate_layers(self, indices, prune_norm, prune_head)


SCRIPT_UNSUPPORTED = ("torch.jit.script does not support svpt's prompted models (their blocks call kernels chosen "
                      "at run time); use torch.jit.trace, torch.export or torch.compile")
FX_UNSUPPORTED = ("torch.fx symbolic tracing does not support svpt's prompted models (their forward reads the "
                  "input's shape, device and dtype); use torch.export, torch.compile or torch.jit.trace")


class PromptedClass(type):
    """Metaclass of the prompted classes. They are made at run time, one per timm class
    (``PromptedVisionTransformer`` for ``VisionTransformer``, ...), so that ``isinstance`` and timm's
    own methods keep working; a prompted class pickles as "the prompted class of <timm class>"
    (copyreg below), so ``torch.save(model)``, ``pickle`` and multiprocessing spawn work, and
    unpickling makes the class again in the receiving process."""


_PROMPTED_CLASSES: dict[type, type] = {}


def prompted_class(cls: type) -> type:
    """The prompted class of timm class ``cls`` (made once per process, with the backends and
    the timm layers the blocks recognise imported, so no forward, compiled or not, imports them)."""
    if cls not in _PROMPTED_CLASSES:
        preload()
        import_timm_layers()
        name = f"Prompted{cls.__name__}"
        _PROMPTED_CLASSES[cls] = PromptedClass(name, (PromptedViTMixin, cls),
                                               {"__module__": __name__, "__qualname__": name})
    return _PROMPTED_CLASSES[cls]


copyreg.pickle(PromptedClass, lambda cls: (prompted_class, (cls.__bases__[1],)))


def is_prompted(model: Any) -> bool:
    return isinstance(model, PromptedViTMixin)


def classifier_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's classifier heads (trainable), by attribute name."""
    return {name: getattr(model, name) for name in _CLASSIFIERS
            if isinstance(getattr(model, name, None), nn.Module)}


def summary(model: nn.Module) -> str:
    """One line: the method, its options, trainable and total parameter counts (what
    :func:`prompt` logs)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"svpt: {model.prompter.describe()} on {type(model).__bases__[1].__name__} "
            f"({len(model.blocks)} blocks, width {model.embed_dim}): "
            f"{trainable:,} trainable / {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)")


def prompt(model: nn.Module, method: str, num_prompts: int, num_classes: int | None = None,
           **options: Any) -> nn.Module:
    """Prompt a timm ``VisionTransformer`` in place with ``method`` and return it.

    ``method``: ``"vpt-shallow"``, ``"vpt-deep"``, ``"svpt"`` or ``"cvpt"``; ``num_prompts``:
    M >= 1 prompts (per layer); ``num_classes``: re-create the classifier head with this
    many classes. ``options`` are the method's options of METHOD.md. The backbone is
    frozen and kept in eval mode; the prompts and the classifier head are trainable. The ops
    run on the selected backend (default ``"auto"``: the fastest usable one for each device).
    Nothing is printed: the one-line :func:`summary` goes to the ``svpt`` logger (INFO), and a
    warning names timm dropout / drop-path settings that eval mode leaves without effect.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    _check_model(model, method)
    num_prompts = _check_count("num_prompts", num_prompts, 1)
    if num_classes is not None:
        num_classes = _check_count("num_classes", num_classes, 0)
    depth = len(model.blocks)
    has_class_token = getattr(model, "cls_token", None) is not None
    cls = METHODS[method]
    opts = _resolve_options(cls, options, depth, has_class_token)

    reference = model.pos_embed if model.pos_embed is not None else next(model.parameters())
    prompter = cls(depth=depth, width=model.embed_dim, num_prefix=model.num_prefix_tokens,
                   patch_size=tuple(model.patch_embed.patch_size),
                   num_prompts=num_prompts, **opts).to(device=reference.device, dtype=reference.dtype)
    model.requires_grad_(False)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    for head in classifier_modules(model).values():
        head.to(device=reference.device, dtype=reference.dtype).requires_grad_(True)
    model.prompter = prompter
    model.__class__ = prompted_class(type(model))
    model.train(model.training)
    _warn_inactive_regularisers(model)
    log.info(summary(model))
    return model


def _warn_inactive_regularisers(model: nn.Module) -> None:
    """Say once per call which of the model's dropout / drop-path settings (timm's ``drop_rate``,
    ``drop_path_rate``, ...) do nothing: the prompted model keeps every timm layer in eval mode."""
    from .timm_support import inactive_regularisers  # it imports this module

    found = inactive_regularisers(model)
    if found:
        warnings.warn(f"svpt: these settings of the model have no effect: {'; '.join(found)}; svpt keeps the "
                      "frozen backbone, the head's dropout with it, in eval mode while the prompts train "
                      "(docs/method.md); regularise the prompts with the prompt_dropout option", UserWarning,
                      stacklevel=caller_stacklevel())
