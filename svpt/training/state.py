"""Run-directory files that must never be half-written: the resume state and its writes.

``resume.pt`` holds everything a resumed run needs to continue exactly as if it had not
stopped: the trainable tensors, optimizer and scheduler state, the number of finished
epochs, the best and last epochs' metrics and the RNG states of every process. It is the
last file an epoch writes: the epoch counts as done once it is there. It is written to a
temporary file and renamed, so a crash leaves the previous epoch's file intact.
"""
from __future__ import annotations

import copy
import io
import os
from typing import Any

import torch

from ..checkpoint import atomic_write

RESUME_FILE = "resume.pt"
_FORMAT = "svpt-resume-1"


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _on_host(value):
    """A copy with every tensor on the host: the run keeps changing the originals in place."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _on_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_host(v) for v in value)
    return copy.deepcopy(value)


def resume_state(*, epoch: int, step: int, trainable: dict, optimizer, scheduler, rng: list[dict], best: dict,
                 last: dict, config: dict) -> dict[str, Any]:
    """What ``resume.pt`` holds, as a host copy of the run's state now."""
    return _on_host({"format": _FORMAT, "epoch": epoch, "step": step, "trainable": trainable,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rng, "world_size": len(rng), "best": best, "last": last, "config": config})


def write_resume(path: str, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def save_resume(path: str, **state) -> None:
    write_resume(path, resume_state(**state))


def load_resume(path: str) -> dict[str, Any]:
    from .config import ConfigError

    if not os.path.isfile(path):
        raise ConfigError(f"cannot resume: {path} does not exist (the run has not finished an epoch yet?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors vary; the file is unusable either way
        raise ConfigError(f"cannot resume: {path} is not readable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ConfigError(f"cannot resume: {path} is not an svpt resume file ({_FORMAT})")
    return state
