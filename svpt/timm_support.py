"""What users of timm's training scripts (``train.py``, ``validate.py``) and helpers need.

The patch timm's ``train.py`` takes, right after ``create_model``::

    import svpt; svpt.fused.apply(model, "svpt", num_prompts=50, num_classes=args.num_classes)

and, to keep prompt-only checkpoints (the prompts and the head: 2.2 MB for SVPT with M = 50 on ViT-B,
against 344 MB of backbone) instead of the whole model, ``utils.CheckpointSaver(`` becomes
:class:`PromptCheckpointSaver` (same arguments).
timm's ``resume_checkpoint`` / ``resume_task_checkpoint``, ``load_checkpoint`` and EMA loading read
those files as they are: the prompted model's ``load_state_dict`` takes prompt-only state dicts.

To start from or evaluate a prompt checkpoint without repeating how it was prompted (its metadata
says the method, the prompt count and the options), after ``create_model``::

    import svpt; svpt.timm_support.prompt_from_checkpoint(model, args.checkpoint)   # validate.py

The backbone must be the one the prompts were trained on (``validate.py --pretrained``): the
checkpoint names it by weights fingerprint, and another backbone is an error.

timm's dropout and drop-path settings (``--drop``, ``--drop-path``, ``drop_rate``, ...) do nothing on
a prompted model, whose timm layers (the head's dropout too) stay in eval mode: :func:`svpt.prompt`
warns when the model has any (:func:`inactive_regularisers`).
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import nn
from timm.utils import CheckpointSaver, unwrap_model

from .checkpoint import (_metadata, backbone_identity, check_backbone, check_same_prompting, load_prompt_state_dict,
                         prompt_state_dict, read_prompt_metadata)
from .prompting import is_prompted, prompt

__all__ = ["METADATA_KEY", "PromptCheckpointSaver", "inactive_regularisers", "prompt_from_checkpoint",
           "prompt_only_state_dict"]

# The state-dict entry of a prompt-only state dict that holds its metadata: JSON bytes as a uint8
# tensor, so the dict stays all tensors (torch.load(weights_only=True), safetensors).
METADATA_KEY = "svpt_metadata"
_IN_STATE_DICT = "the prompt-only state dict"


# ---------------------------------------------------------------- timm settings that do nothing here
def inactive_regularisers(model: nn.Module) -> list[str]:
    """timm's dropout / drop-path layers with a non-zero rate outside the prompts, one line per kind:
    ``"DropPath (drop_path_rate, up to 0.1) at blocks.*.drop_path1, blocks.*.drop_path2"``."""
    from timm.layers import DropPath, PatchDropout

    kinds = ((DropPath, "drop_prob", "DropPath (drop_path_rate)"),
             (PatchDropout, "prob", "PatchDropout (patch_drop_rate)"),
             (nn.Dropout, "p", "Dropout (drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate)"))
    found: dict[str, tuple[float, list[str]]] = {}
    for name, module in model.named_modules():
        if name.startswith("prompter"):
            continue
        for kind, attr, label in kinds:
            rate = getattr(module, attr, 0.0) if isinstance(module, kind) else 0.0
            if rate > 0:
                top, places = found.setdefault(label, (0.0, []))
                where = re.sub(r"\.\d+(?=\.|$)", ".*", name)
                found[label] = (max(top, rate), places if where in places else [*places, where])
    return [f"{label[:-1]}, up to {top:g}) at {', '.join(places)}" for label, (top, places) in found.items()]


# ---------------------------------------------------------------- prompt-only state dicts
def _model_metadata(model: nn.Module) -> dict[str, str]:
    """What a prompt checkpoint records (as svpt.save_prompts writes it): method, num_prompts, options
    (JSON) and the backbone's name and weights fingerprint."""
    return {**_metadata(model), **backbone_identity(model)}


def prompt_only_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """:func:`svpt.prompt_state_dict` plus ``METADATA_KEY``: the state dict a timm-style saver
    writes for a prompted model; the prompted model's ``load_state_dict`` reads it back."""
    state = prompt_state_dict(model)
    text = json.dumps(_model_metadata(model), sort_keys=True).encode()
    state[METADATA_KEY] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return state


def _decode_metadata(value: torch.Tensor) -> dict[str, str]:
    return json.loads(bytes(value.tolist()).decode())


def is_prompt_only(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is a prompt-only one (METHOD.md's keys; a full state dict has
    ``prompter.prompts`` instead of ``prompts``)."""
    return "prompts" in state_dict or METADATA_KEY in state_dict


def load_prompt_only(model: nn.Module, state_dict: Mapping[str, Any]):
    """Load a prompt-only state dict (the prompted model's ``load_state_dict`` calls this): its
    metadata, when present, must name this model's method, prompt count, options and backbone."""
    tensors = {k: v for k, v in state_dict.items() if k != METADATA_KEY}
    if METADATA_KEY in state_dict:
        saved = _decode_metadata(state_dict[METADATA_KEY])
        check_same_prompting(saved, model, _IN_STATE_DICT, "prompt the model as the checkpoint was "
                             "(svpt.timm_support.prompt_from_checkpoint does it from the file)")
        check_backbone(saved, model, _IN_STATE_DICT)
    load_prompt_state_dict(model, tensors)
    return nn.modules.module._IncompatibleKeys([], [])


def _prompter_shapes(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if k.startswith("prompter.")}


def _shapes_text(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {list(s)}" for k, s in shapes.items())


def check_prompter_tensors(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """A full state dict loaded strictly: its ``prompter.*`` tensors must be this model's (a clear
    error instead of torch's list of missing and unexpected keys)."""
    theirs, ours = _prompter_shapes(state_dict), _prompter_shapes(model.state_dict())
    if theirs == ours:
        return
    if not theirs:
        raise ValueError("this state dict has no prompter.* tensors: it is an unprompted timm checkpoint; load it "
                         "into the model before svpt.prompt (timm.create_model(..., checkpoint_path=...)), or "
                         "pass strict=False")
    raise ValueError(f"this state dict's prompts ({_shapes_text(theirs)}) were made another way than this model's "
                     f"({model.prompter.describe()}: {_shapes_text(ours)}); prompt the model as the checkpoint was")


class PromptCheckpointSaver(CheckpointSaver):
    """timm's ``CheckpointSaver`` (same arguments, same files, history and resume) writing prompt-only
    state dicts (:func:`prompt_only_state_dict`, and the EMA's) instead of the whole model's."""

    def __init__(self, *args: Any, unwrap_fn=unwrap_model, **kwargs: Any) -> None:
        # timm's savers take every state dict as unwrap_fn(model).state_dict()
        super().__init__(*args, unwrap_fn=lambda model: _PromptOnlyView(unwrap_fn(model)), **kwargs)


class _PromptOnlyView:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> OrderedDict[str, torch.Tensor]:
        return prompt_only_state_dict(self.model)


# ---------------------------------------------------------------- prompting as a checkpoint says
def _read(path: str, use_ema: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a prompt checkpoint: an svpt ``.safetensors`` file or a timm-style
    checkpoint of :class:`PromptCheckpointSaver`; metadata as :func:`svpt.checkpoint.read_prompt_metadata`
    gives it (``options`` decoded)."""
    from timm.models import load_state_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        return read_prompt_metadata(path), dict(load_state_dict(path))
    tensors = dict(load_state_dict(path, use_ema=use_ema))
    if METADATA_KEY not in tensors:
        found = _prompter_shapes(tensors)
        what = (f"a whole-model state dict with prompts ({_shapes_text(found)})" if found
                else "an unprompted model's state dict")
        raise ValueError(f"{path!r} holds {what} and no svpt metadata (timm's CheckpointSaver does not record how "
                         "the model was prompted): prompt the model by hand before timm loads it "
                         "(svpt.fused.apply(model, method, num_prompts, ...)), or save prompt-only checkpoints "
                         "with svpt.timm_support.PromptCheckpointSaver")
    metadata = _decode_metadata(tensors.pop(METADATA_KEY))
    metadata["options"] = json.loads(metadata["options"])
    return metadata, tensors


def prompt_from_checkpoint(model: nn.Module, path: str | os.PathLike, use_ema: bool = False,
                           load: bool = True) -> nn.Module:
    """Prompt the timm ViT ``model`` in place as the prompt checkpoint at ``path`` says (method,
    prompt count, options, classes of its head) and, with ``load``, load its tensors (the EMA's
    with ``use_ema``, where the file has them); returns ``model``. ``path``: an svpt
    ``.safetensors`` prompt file (``svpt.save_prompts``, ``svpt train``) or a checkpoint of
    :class:`PromptCheckpointSaver`. The model must carry the backbone the prompts were trained on
    (checked by weights fingerprint, before the model is touched)."""
    path = os.fspath(path)
    if is_prompted(model):
        raise ValueError(f"this model is already prompted ({model.prompter.describe()}); "
                         "prompt_from_checkpoint takes the timm model as timm.create_model made it")
    metadata, tensors = _read(path, use_ema)
    check_backbone(metadata, model, path)
    head = tensors.get("head.weight")
    prompt(model, metadata["method"], int(metadata["num_prompts"]),
           num_classes=0 if head is None else head.shape[0], **metadata["options"])
    if load:
        load_prompt_state_dict(model, tensors)
    return model
