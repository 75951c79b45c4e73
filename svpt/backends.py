"""The one place that decides which implementation runs svpt's ops.

A backend is a module that implements every op of :mod:`svpt.ops` with the same signature
(``da_mix``, ``prompt_attention``, ``ae_update``) and, optionally, ``why_unusable(device)``
returning ``None`` when it can run on that device (any device when ``None``) or a sentence
saying why not, and ``AUTO_DEVICE_TYPES``, the device types on which ``"auto"`` may pick it
(e.g. Triton's interpreter runs on CPU for tests, but ``"auto"`` must not choose it there).
A backend also lists in ``FAST_PATHS`` the exact fast-path ops (``prompt_kv_attention``,
``folded_cross_attention``) that the methods should call on it instead of their plain path;
the eager reference implements them but lists none, since it is the plain path's ground truth.
A backend opts in by implementing the op and adding its name there; nothing else changes.
``fast_paths(False)`` (or ``SVPT_FAST_PATHS=0``) turns them off everywhere, to compare.

Select with ``svpt.set_backend(name)``, ``with svpt.backend(name):`` or the environment
variable ``SVPT_BACKEND`` (read at import). Model code never chooses a backend itself: it
calls :mod:`svpt.ops`, which asks :func:`resolve` for the module to use.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Iterator

import torch

__all__ = ["available_backends", "backend", "fast_paths", "get_backend", "has_fast_path",
           "register_backend", "set_backend"]


@dataclass
class _Backend:
    name: str
    module_path: str
    description: str
    _module: ModuleType | None = field(default=None, repr=False)
    _import_error: str | None = field(default=None, repr=False)

    def load(self) -> ModuleType | None:
        if self._module is None and self._import_error is None:
            try:
                self._module = importlib.import_module(self.module_path)
            except Exception as exc:  # any import failure makes the backend unusable, with the reason
                self._import_error = f"importing {self.module_path} failed: {type(exc).__name__}: {exc}"
        return self._module

    def why_unusable(self, device: torch.device | None = None) -> str | None:
        module = self.load()
        if module is None:
            return self._import_error
        check = getattr(module, "why_unusable", None)
        return None if check is None else check(device)

    def why_not_auto(self, device: torch.device) -> str | None:
        auto_types = getattr(self.load(), "AUTO_DEVICE_TYPES", None)
        if auto_types is not None and device.type not in auto_types:
            return f"'auto' uses it on {'/'.join(auto_types)} only"
        return self.why_unusable(device)


_REGISTRY: dict[str, _Backend] = {}


def register_backend(name: str, module_path: str, description: str) -> None:
    """Register a backend implemented by the module at ``module_path`` (imported lazily)."""
    _REGISTRY[name] = _Backend(name, module_path, description)


register_backend("eager", "svpt.reference", "plain PyTorch; the reference every backend must match")
register_backend("triton", "svpt_kernels.triton", "Triton kernels: fused CDC+DA, flash attention with AE saliency, fused AE update")
register_backend("cpp", "svpt_kernels.cpp", "C++/CUDA extension (csrc/)")

_AUTO = "auto"


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or (name != _AUTO and name not in _REGISTRY):
        accepted = ", ".join([*_REGISTRY, _AUTO])
        raise ValueError(f"{source} {name!r} is not an svpt backend; accepted: {accepted}")
    return name


_current = _check_name(os.environ.get("SVPT_BACKEND", "eager"), "SVPT_BACKEND=")


def set_backend(name: str) -> None:
    """Use backend ``name`` for every op from now on (``"auto"`` picks per device)."""
    global _current
    name = _check_name(name, "backend")
    if name != _AUTO:
        reason = _REGISTRY[name].why_unusable(None)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not usable here: {reason}")
    _current = name


def get_backend() -> str:
    """The name of the selected backend (possibly ``"auto"``)."""
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside the block on backend ``name``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable here (on ``device`` when given), best first."""
    device = None if device is None else torch.device(device)
    return [name for name in _auto_order() if _REGISTRY[name].why_unusable(device) is None]


def _auto_order() -> list[str]:
    # Fastest first; eager is registered first but is the last resort.
    return [name for name in _REGISTRY if name != "eager"] + ["eager"]


_auto_warned: set[tuple[str, str]] = set()


def _resolve_auto(device: torch.device) -> ModuleType:
    skipped = []
    for name in _auto_order():
        entry = _REGISTRY[name]
        reason = entry.why_not_auto(device)
        if reason is None:
            if skipped and (device.type, name) not in _auto_warned:
                _auto_warned.add((device.type, name))
                warnings.warn(f"svpt backend 'auto' on {device.type}: using {name!r}; "
                              + "; ".join(skipped), RuntimeWarning, stacklevel=4)
            return entry.load()
        skipped.append(f"{name!r} not usable: {reason}")
    raise RuntimeError("no svpt backend is usable: " + "; ".join(skipped))


def resolve(device: torch.device) -> ModuleType:
    """The backend module that runs ops on tensors of ``device``."""
    if _current == _AUTO:
        return _resolve_auto(device)
    entry = _REGISTRY[_current]
    module = entry.load()
    reason = entry.why_unusable(device)
    if reason is not None:
        raise RuntimeError(f"svpt backend {_current!r} cannot run on {device}: {reason}; "
                           f"usable here: {available_backends(device)}")
    return module


_fast_paths_on = os.environ.get("SVPT_FAST_PATHS", "1") != "0"


def has_fast_path(op: str, device: torch.device) -> bool:
    """Whether the backend that runs ops on ``device`` lists ``op`` in its ``FAST_PATHS``: a tuple
    of op names, or a dict ``{device type: tuple}`` for a backend whose fast paths pay on some
    devices only (a device type missing from the dict has none)."""
    if not _fast_paths_on:
        return False
    listed = getattr(resolve(device), "FAST_PATHS", ())
    if isinstance(listed, dict):
        listed = listed.get(torch.device(device).type, ())
    return op in listed


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Context manager: let the methods use their backend's fast paths (``True``, the default)
    or always run their plain path (``False``)."""
    global _fast_paths_on
    previous, _fast_paths_on = _fast_paths_on, bool(enabled)
    try:
        yield
    finally:
        _fast_paths_on = previous


def describe() -> dict[str, str | None]:
    """For each registered backend, ``None`` if usable on this machine, else why not."""
    return {name: entry.why_unusable(None) for name, entry in _REGISTRY.items()}
