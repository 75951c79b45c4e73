"""Prompt-only checkpoints: the trainable tensors under METHOD.md's keys, in safetensors."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .prompting import classifier_modules, is_prompted

__all__ = ["backbone_fingerprint", "backbone_identity", "check_backbone", "check_same_prompting", "load_prompt_state_dict", "load_prompts",
           "prompt_state_dict", "read_prompt_metadata", "save_prompts", "save_prompts_with_run"]

_FORMAT = "svpt-prompts-1"
_UMASK = os.umask(0)  # read once: reading the umask means setting it, which is not thread-safe
os.umask(_UMASK)


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


def check_same_prompting(saved: Mapping[str, str], model, where: str, remedy: str) -> None:
    """The method, prompt count and options that ``saved`` (a checkpoint's metadata) records are
    ``model``'s; else a ValueError naming ``where`` the checkpoint is and ``remedy``."""
    expected = _metadata(model)
    for field in ("method", "num_prompts", "options"):
        if saved.get(field) != expected[field]:
            raise ValueError(f"{where} was saved from {field}={saved.get(field)}, this model has "
                             f"{field}={expected[field]}; {remedy}")


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a run's files get the usual mode
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
    save_prompts_with_run(model, path, None)


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
    check_backbone(saved, model, path)
    check_same_prompting(saved, model, repr(os.fspath(path)), "prompt the model the same way, or load the tensors "
                         "with svpt.load_prompt_state_dict to bypass this check")
    load_prompt_state_dict(model, tensors)


# ---------------------------------------------------------------- what a checkpoint was made for
_FINGERPRINT_ATTR = "_svpt_backbone_fingerprint"


def _backbone_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """The frozen backbone's state: the model's state dict without prompts and classifier heads."""
    heads = tuple(f"{name}." for name in classifier_modules(model))
    return [(k, v) for k, v in model.state_dict(keep_vars=True).items()
            if not k.startswith(("prompter.", *heads))]


def backbone_fingerprint(model) -> str:
    """SHA-256 over the backbone's tensors (names, shapes, dtypes and bytes), prompts and
    heads excluded. Cached on the model until one of those tensors is replaced or changed
    in place (``Tensor._version``), so saving every epoch does not re-hash the backbone."""
    tensors = _backbone_tensors(model)
    key = tuple((k, v.data_ptr(), v._version, v.dtype, str(v.device)) for k, v in tensors)
    cached = model.__dict__.get(_FINGERPRINT_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    for name, value in tensors:
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    model.__dict__[_FINGERPRINT_ATTR] = (key, digest.hexdigest())
    return digest.hexdigest()


def backbone_identity(model) -> dict[str, str]:
    """``backbone`` (timm's model name) and ``backbone_fingerprint`` (of its weights)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    return {"backbone": name, "backbone_fingerprint": backbone_fingerprint(model)}


def check_backbone(saved: Mapping[str, str], model, path: str | os.PathLike) -> None:
    """Refuse prompts saved for another backbone (name or weights); checkpoints written
    before svpt recorded the backbone carry no identity and pass."""
    if "backbone_fingerprint" not in saved:
        return
    ours = backbone_identity(model)
    if (saved.get("backbone"), saved["backbone_fingerprint"]) != (ours["backbone"], ours["backbone_fingerprint"]):
        same = " (same architecture, other weights)" if saved.get("backbone") == ours["backbone"] else ""
        raise ValueError(f"{os.fspath(path)!r} holds prompts trained on backbone {saved.get('backbone')} "
                         f"(weights fingerprint {saved['backbone_fingerprint'][:12]}); this model is "
                         f"{ours['backbone']} (weights fingerprint {ours['backbone_fingerprint'][:12]}){same}: "
                         "prompts do not transfer between backbones; load the tensors with "
                         "svpt.load_prompt_state_dict to bypass this check")


def save_prompts_with_run(model, path: str | os.PathLike, run: Mapping[str, Any] | None) -> None:
    """:func:`save_prompts`, plus ``run`` (JSON: protocol, splits, epoch, how it was selected)
    in the file's metadata when given. Every checkpoint names its backbone (timm name and
    weights fingerprint), which :func:`load_prompts` checks."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in prompt_state_dict(model).items()}
    metadata = {**_metadata(model), **backbone_identity(model)}
    if run is not None:
        metadata["run"] = json.dumps(dict(run), sort_keys=True)
    atomic_write(path, save_safetensors(tensors, metadata=metadata))


def read_prompt_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a prompt checkpoint, ``options`` and ``run`` decoded from JSON; the
    tensors are not read."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not a safetensors prompt checkpoint: {exc}") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an svpt prompt checkpoint (no '{_FORMAT}' metadata)")
    for key in ("options", "run"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta
