"""Prompt-only checkpoints: the trainable tensors under METHOD.md's keys, in safetensors."""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .prompting import classifier_modules, is_prompted

__all__ = ["load_prompt_state_dict", "load_prompts", "prompt_state_dict", "save_prompts"]

_FORMAT = "svpt-prompts-1"


def _require_prompted(model) -> None:
    if not is_prompted(model):
        raise ValueError(f"{type(model).__name__} is not prompted; call svpt.prompt(model, ...) first")


def _live_tensors(model) -> OrderedDict[str, torch.nn.Parameter]:
    tensors = OrderedDict(model.prompter.named_parameters())
    for name, head in classifier_modules(model).items():
        tensors.update((f"{name}.{key}", p) for key, p in head.named_parameters())
    return tensors


def prompt_state_dict(model, keep_vars: bool = False) -> OrderedDict[str, torch.Tensor]:
    """The trainable tensors of a prompted model under METHOD.md's keys (``prompts``,
    ``da.weight``, ``da.bias``, ``ae.scale``, ``head.weight``, ``head.bias``). With
    ``keep_vars=True`` the values are the parameters themselves."""
    _require_prompted(model)
    return OrderedDict((k, p if keep_vars else p.detach()) for k, p in _live_tensors(model).items())


def load_prompt_state_dict(model, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a prompt state dict strictly: every key present, no extra key, same shapes.
    Everything is checked before anything is copied."""
    _require_prompted(model)
    live = _live_tensors(model)
    missing = [k for k in live if k not in state_dict]
    extra = [k for k in state_dict if k not in live]
    if missing or extra:
        raise ValueError(f"prompt state dict does not fit this model ({model.prompter.describe()}): "
                         f"missing keys {missing}, unexpected keys {extra}; expected exactly {list(live)}")
    for key, param in live.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"prompt state dict key {key!r} holds {type(value).__name__}, expected a tensor")
        if value.shape != param.shape:
            raise ValueError(f"prompt state dict key {key!r} has shape {tuple(value.shape)}, "
                             f"this model expects {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(state_dict[key])


def _metadata(model) -> dict[str, str]:
    prompter = model.prompter
    options = {name: getattr(prompter, name) for name in prompter.options}
    return {"format": _FORMAT, "method": prompter.method, "num_prompts": str(prompter.num_prompts),
            "options": json.dumps(options, sort_keys=True)}


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either the old or the new file:
    a temporary file in the same directory, fsync'd, then renamed over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_prompts(model, path: str | os.PathLike) -> None:
    """Write the prompt state dict to ``path`` (safetensors) atomically: a crash leaves the
    previous file intact, never a half-written one."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in prompt_state_dict(model).items()}
    atomic_write(path, save_safetensors(tensors, metadata=_metadata(model)))


def load_prompts(model, path: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_prompts` into a model prompted the same way."""
    _require_prompted(model)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")  # safetensors: u64 header size, JSON header
        saved = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a readable safetensors prompt checkpoint: {exc}") from exc
    if saved.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an svpt prompt checkpoint (no '{_FORMAT}' metadata)")
    expected = _metadata(model)
    for field in ("method", "num_prompts", "options"):
        if saved.get(field) != expected[field]:
            raise ValueError(f"{os.fspath(path)!r} was saved from {field}={saved.get(field)}, this model has "
                             f"{field}={expected[field]}; prompt the model the same way, or load the tensors "
                             "with svpt.load_prompt_state_dict to bypass this check")
    load_prompt_state_dict(model, tensors)
