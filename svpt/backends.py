"""The one place that decides which implementation runs each of svpt's ops.

A *backend* is a module implementing every op of :mod:`svpt.ops` with the same signature. It
declares, as plain data (kernel modules never import :mod:`svpt`):

``SUPPORTS``
    ``{op: {"devices": (device types...), "dtypes": (torch dtypes...), "limits": {size: max}}}``:
    what the module computes itself. A call outside it (another dtype, device or size) is
    *handed over* here, to the eager reference, and the hand-over is recorded with its reason.
    ``"jit_trace": False`` marks an op that ``torch.jit.trace`` cannot record (an in-place
    autograd.Function): while tracing it is handed to the reference too.
    A module without ``SUPPORTS`` (the reference) computes every op for every input.
``PREFER``
    ``{op: [{"devices": ..., "dtypes": ..., "use": implementation, "why": reason}, ...]}``:
    cases inside ``SUPPORTS`` where another implementation was measured faster (e.g. PyTorch's
    SDPA for 16-bit attention on CUDA); also a hand-over, declared and visible. A rule marked
    ``"nondeterministic": True`` is skipped under ``torch.use_deterministic_algorithms(True)``; one
    marked ``"compiling": True`` applies only while torch.compile traces (:func:`compile_table`).
``FAST_PATHS``
    the exact fast-path ops (``prompt_kv_attention``, ``folded_cross_attention``) the methods
    should use on it instead of their plain path; a tuple, or ``{device type: tuple}``.
``AUTO_DEVICE_TYPES`` and ``why_unusable(device)``
    where ``"auto"`` may pick it, and ``None`` or why it cannot run here.

Besides the selectable backends there are *providers* (``sdpa``, ``fusible``, ``split``): implementations of a
few ops that a backend's ``PREFER`` may name; they cannot be selected on their own.

Select with ``svpt.set_backend(name)``, ``with svpt.backend(name):`` or ``SVPT_BACKEND``; the default
is ``"auto"``: per device, the first usable of triton, cpp, eager among those its ``AUTO_DEVICE_TYPES``
lets it pick there (triton on CUDA, cpp on CPU), warning once where it skips one of those, saying why.
The methods resolve their kernels once per forward (:func:`kernels`, cached per device, dtype
and sizes) and call them directly; :mod:`svpt.ops` resolves per call (:func:`implementation`).
:func:`trace` records which implementation ran for each op, and :func:`table` lists
op x device x dtype -> implementation (``svpt env`` prints it).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Iterator

import torch

__all__ = ["Implementation", "Kernels", "OPS", "PRODUCT_OPS", "auto_choice", "available_backends", "backend",
           "compile_table", "fast_paths",
           "get_backend", "has_fast_path", "implementation", "kernels", "register_backend",
           "set_backend", "table", "trace"]

# The ops of svpt.ops. The attention-like ones route on the dtype their products run in.
OPS = ("da_mix", "prompt_attention", "attention_saliency", "ae_update", "prompt_kv_attention",
       "folded_cross_attention")
PRODUCT_OPS = ("prompt_attention", "attention_saliency", "prompt_kv_attention", "folded_cross_attention")
REFERENCE = "eager"


@dataclass
class _Entry:
    name: str
    module_path: str
    description: str
    selectable: bool = True
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
        """Why ``"auto"`` does not take it on ``device``; ``""`` when it is not meant for that
        device type at all (nothing to warn about)."""
        module = self.load()
        auto_types = getattr(module, "AUTO_DEVICE_TYPES", None)
        if module is not None and auto_types is not None and device.type not in auto_types:
            return ""
        return self.why_unusable(device)


_REGISTRY: dict[str, _Entry] = {}


def preload() -> None:
    """Import every registered backend module now; one that fails to import is unusable, with
    that reason. Prompting a model (and unpickling one) calls this, so no forward imports a
    backend: inside a torch.compile'd forward an import is a graph break the compiled model keeps."""
    for entry in _REGISTRY.values():
        entry.load()


def register_backend(name: str, module_path: str, description: str, selectable: bool = True) -> None:
    """Register the module at ``module_path`` as backend or provider ``name`` (imported when first
    needed, or by :func:`preload`)."""
    _REGISTRY[name] = _Entry(name, module_path, description, selectable)


register_backend("eager", "svpt.reference", "plain PyTorch; the reference every backend must match")
register_backend("triton", "svpt_kernels.triton", "Triton kernels: row-local DA and AE, saliency rows, "
                 "flash attention, the fast paths")
register_backend("cpp", "svpt_kernels.cpp", "C++/CUDA extension (csrc/)")
register_backend("sdpa", "svpt.sdpa", "PyTorch's scaled_dot_product_attention (cuDNN / FlashAttention)",
                 selectable=False)
register_backend("split", "svpt_kernels.triton.prompt_kv_split", "VPT-deep attention split in two: ATen's fused "
                 "attention over the token keys, Triton kernels for the prompt keys, merged by log-sum-exp",
                 selectable=False)
register_backend("fusible", "svpt.fusible", "plain PyTorch ops that torch.compile fuses with their neighbours",
                 selectable=False)

_AUTO = "auto"


def _selectable() -> list[str]:
    return [name for name, entry in _REGISTRY.items() if entry.selectable]


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str) or (name != _AUTO and name not in _selectable()):
        accepted = ", ".join([*_selectable(), _AUTO])
        raise ValueError(f"{source} {name!r} is not an svpt backend; accepted: {accepted}")
    return name


_current = _check_name(os.environ.get("SVPT_BACKEND", _AUTO), "SVPT_BACKEND=")
_fast_paths_on = os.environ.get("SVPT_FAST_PATHS", "1") != "0"


def set_backend(name: str) -> None:
    """Use backend ``name`` for every op from now on (``"auto"`` picks per device)."""
    global _current
    name = _check_name(name, "backend")
    if name != _AUTO:
        reason = _REGISTRY[name].why_unusable(None)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not usable here: {reason}")
    _current = name
    _KERNELS.clear()


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


def _auto_order() -> list[str]:
    # Fastest first; eager is registered first but is the last resort.
    return [name for name in _selectable() if name != REFERENCE] + [REFERENCE]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable here (on ``device`` when given), best first."""
    device = None if device is None else torch.device(device)
    return [name for name in _auto_order() if _REGISTRY[name].why_unusable(device) is None]


_auto_warned: set[tuple[str, str]] = set()


def _backend_name(device: torch.device) -> str:
    """The backend that runs ops on ``device`` under the current selection."""
    if _current != _AUTO:
        reason = _REGISTRY[_current].why_unusable(device)
        if reason is not None:
            raise RuntimeError(f"svpt backend {_current!r} cannot run on {device}: {reason}; "
                               f"usable here: {available_backends(device)}")
        return _current
    name, skipped = auto_choice(device)
    if name is None:
        raise RuntimeError("no svpt backend is usable: " + "; ".join(skipped))
    if skipped and (device.type, name) not in _auto_warned:
        _auto_warned.add((device.type, name))
        warnings.warn(f"svpt backend 'auto' runs {name!r} on {device.type}, not the faster " + "; ".join(skipped)
                      + " (svpt env lists what each backend needs)", RuntimeWarning, stacklevel=caller_stacklevel())
    return name


def auto_choice(device: torch.device | str) -> tuple[str | None, list[str]]:
    """(the backend ``"auto"`` runs on ``device``, or None if none can; why each better backend meant
    for that device was skipped)."""
    device, skipped = torch.device(device), []
    for name in _auto_order():
        reason = _REGISTRY[name].why_not_auto(device)
        if reason is None:
            return name, skipped
        if reason:  # meant for this device but unusable: worth saying
            skipped.append(f"{name!r}: {reason}")
    return None, skipped


_LIBRARIES = ("svpt", "svpt_kernels", "timm", "torch")


@functools.lru_cache(maxsize=None)
def _library_dirs() -> tuple[str, ...]:
    specs = (importlib.util.find_spec(name) for name in _LIBRARIES)
    return tuple(os.path.dirname(spec.origin) + os.sep for spec in specs if spec is not None and spec.origin)


def caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the function calling this: the first frame outside
    svpt, timm and torch (the user's line, whichever way the call came through the model)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_library_dirs()):
        frame, level = frame.f_back, level + 1
    return level


def resolve(device: torch.device) -> ModuleType:
    """The backend module that runs ops on tensors of ``device``."""
    return _REGISTRY[_backend_name(torch.device(device))].load()


# ------------------------------------------------------------------ routing one op
@dataclass(frozen=True)
class Implementation:
    """What runs ``op``: ``name`` (a backend or provider), its function, and, when it is not the
    selected backend's own kernel, ``why`` it was handed over."""
    op: str
    name: str
    fn: Callable
    why: str | None = None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _matches(rule: dict, device_type: str, dtype: torch.dtype) -> bool:
    return device_type in rule.get("devices", (device_type,)) and dtype in rule.get("dtypes", (dtype,))


def _route(backend_name: str, op: str, device_type: str, dtype: torch.dtype, sizes: dict,
           compiling: bool = False) -> tuple[str, str | None]:
    """(implementation name, why handed over or None) for ``op`` on the backend's declarations, in a
    forward that torch.compile traces (``compiling``) or not."""
    module = _REGISTRY[backend_name].load()
    deterministic = torch.are_deterministic_algorithms_enabled()
    for rule in getattr(module, "PREFER", {}).get(op, ()):
        if (_matches(rule, device_type, dtype) and not (deterministic and rule.get("nondeterministic"))
                and rule.get("compiling", compiling) == compiling):
            when = " while torch.compile traces" if rule.get("compiling") else ""
            return rule["use"], f"{backend_name} prefers {rule['use']}{when} here: {rule['why']}"
    supports = getattr(module, "SUPPORTS", None)
    if supports is None:
        return backend_name, None
    spec = supports.get(op)
    if spec is None:
        return REFERENCE, f"{backend_name} does not implement {op}"
    if device_type not in spec["devices"]:
        return REFERENCE, f"{backend_name}'s {op} runs on {'/'.join(spec['devices'])}, not {device_type}"
    if dtype not in spec["dtypes"]:
        accepted = ", ".join(_dtype_name(d) for d in spec["dtypes"])
        return REFERENCE, f"{backend_name}'s {op} computes {accepted}, not {_dtype_name(dtype)}"
    if torch.jit.is_tracing() and not spec.get("jit_trace", True):
        return REFERENCE, f"torch.jit.trace cannot record {backend_name}'s in-place {op} (it marks its buffer dirty)"
    for size, limit in spec.get("limits", {}).items():
        if size in sizes and sizes[size] > limit:
            return REFERENCE, f"{backend_name}'s {op} takes {size} <= {limit}, here {sizes[size]}"
    return backend_name, None


_tracing: list[list[tuple[str, str]]] = []


def _recorded(impl: Implementation) -> Callable:
    def run(*args):
        for log in _tracing:
            log.append((impl.op, impl.name))
        return impl.fn(*args)
    return run


def implementation(op: str, device: torch.device, dtype: torch.dtype, sizes: dict | None = None) -> Implementation:
    """The implementation that runs ``op`` for inputs of ``dtype`` (the dtype its arithmetic runs
    in) on ``device`` under the current selection, with ``sizes`` checked against declared limits."""
    device = torch.device(device)
    chosen = _backend_name(device)
    name, why = _route(chosen, op, device.type, dtype, sizes or {}, torch.compiler.is_compiling())
    fn = getattr(_REGISTRY[name].load(), op)
    impl = Implementation(op, name, fn, why)
    return Implementation(op, name, _recorded(impl), why) if _tracing else impl


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Record ``(op, implementation)`` for every op call inside the block (tests use it to check
    that the implementation they name is the one that ran)."""
    log: list[tuple[str, str]] = []
    _tracing.append(log)
    _KERNELS.clear()
    try:
        yield log
    finally:
        _tracing.remove(log)
        _KERNELS.clear()


# ------------------------------------------------------------------ kernels for a forward
class Kernels:
    """The ops resolved once for a forward: ``kernels.da_mix(...)`` etc. call the chosen
    implementation directly (inputs were validated at the model's entry). ``names[op]`` and
    ``why[op]`` say what runs and why it was handed over; ``fast_path(op)`` whether the backend
    offers that exact fast path."""

    def __init__(self, device: torch.device, dtype: torch.dtype, product_dtype: torch.dtype, sizes: dict) -> None:
        self.backend = _backend_name(device)
        self.names: dict[str, str] = {}
        self.why: dict[str, str | None] = {}
        for op in OPS:
            impl = implementation(op, device, product_dtype if op in PRODUCT_OPS else dtype, sizes)
            setattr(self, op, impl.fn)
            self.names[op], self.why[op] = impl.name, impl.why
        listed = getattr(_REGISTRY[self.backend].load(), "FAST_PATHS", ())
        if isinstance(listed, dict):
            listed = listed.get(device.type, ())
        self._fast = tuple(listed) if _fast_paths_on else ()

    def fast_path(self, op: str) -> bool:
        return op in self._fast


_KERNELS: dict[tuple, Kernels] = {}


def kernels(device: torch.device, dtype: torch.dtype, **sizes: int) -> Kernels:
    """The ops for a forward on ``device`` whose token stream has ``dtype``; attention products
    run in autocast's dtype where it is on. Cached per (device, dtype, autocast, sizes)."""
    product = dtype
    if dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        product = torch.get_autocast_dtype(device.type)
    key = (device, dtype, product, tuple(sorted(sizes.items())), _current, _fast_paths_on,
           torch.are_deterministic_algorithms_enabled(), torch.jit.is_tracing(), torch.compiler.is_compiling())
    found = _KERNELS.get(key)
    if found is None:
        found = Kernels(device, dtype, product, sizes)
        # Not cached while torch.compile traces: the compiled forward's guards would see the
        # cache changed on the next call and compile the model a second time.
        if not torch.compiler.is_compiling():
            _KERNELS[key] = found
    return found


def has_fast_path(op: str, device: torch.device) -> bool:
    """Whether the backend that runs ops on ``device`` lists ``op`` in its ``FAST_PATHS`` and
    fast paths are on."""
    return kernels(torch.device(device), torch.float32).fast_path(op)


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


# ------------------------------------------------------------------ what runs where
_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def table(device_types: tuple[str, ...] = ("cpu", "cuda"),
          backends: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """Rows ``{backend, op, device, dtype, runs, why}``: for each usable selectable backend
    (or ``backends``), op, device type and dtype, the implementation that runs and why it was
    handed over (empty when the backend runs it itself)."""
    rows = []
    for name in backends or _selectable():
        for device_type in device_types:
            device = torch.device(device_type)
            reason = _REGISTRY[name].why_unusable(device)
            for op in OPS:
                for dtype in _TABLE_DTYPES:
                    if reason is not None:
                        runs, why = "-", f"{name} not usable on {device_type}: {reason}"
                    else:
                        runs, why = _route(name, op, device_type, dtype, {})
                    rows.append({"backend": name, "op": op, "device": device_type,
                                 "dtype": _dtype_name(dtype), "runs": runs, "why": why or ""})
    return rows


def compile_table(device_types: tuple[str, ...] = ("cpu", "cuda"),
                  backends: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """The rows of :func:`table` that differ while torch.compile traces a forward (PREFER rules marked
    ``"compiling"``): ``{backend, op, device, dtype, runs, why}`` with what runs then."""
    rows = []
    for row in table(device_types, backends):
        if row["runs"] == "-":
            continue
        runs, why = _route(row["backend"], row["op"], row["device"], _TABLE_DTYPE_BY_NAME[row["dtype"]], {}, True)
        if runs != row["runs"]:
            rows.append({**row, "runs": runs, "why": why or ""})
    return rows


_TABLE_DTYPE_BY_NAME = {_dtype_name(d): d for d in _TABLE_DTYPES}


def describe() -> dict[str, str | None]:
    """For each selectable backend, ``None`` if usable on this machine, else why not."""
    return {name: _REGISTRY[name].why_unusable(None) for name in _selectable()}
