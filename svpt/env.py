"""``svpt env``: versions, compilers, for each backend whether it is usable here and why not, and
which implementation runs each op in each dtype (svpt.backends.table(), compact)."""
from __future__ import annotations

import platform
import shutil
import subprocess

import torch

from . import backends


def _selected() -> str:
    """The selection, and for "auto" what it runs on each device type."""
    selected = backends.get_backend()
    if selected != "auto":
        return selected
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return "auto (" + "; ".join(f"{d}: {backends.auto_choice(d)[0] or 'none usable'}" for d in devices) + ")"


def _tool_version(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        return "not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path}: {exc}"
    lines = [line for line in out.splitlines() if line.strip()]
    return f"{lines[-1] if cmd == 'nvcc' else lines[0]} ({path})" if lines else path


def _extension_info() -> str:
    try:
        from svpt_kernels.cpp import build_info, fused_kv_kernel, why_unusable
    except Exception as exc:  # the loader itself failed to import; say so rather than crash
        return f"svpt_kernels.cpp not importable ({type(exc).__name__}: {exc})"
    info = build_info()
    if torch.cuda.is_available() and why_unusable("cuda") is None:
        kernel = fused_kv_kernel("cuda")
        info += ("; 16-bit prompt_kv_attention on cuda: " +
                 (f"ATen's {kernel} attention" if kernel else "this extension's kernels"))
    return info


_TABLE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _implementations() -> list[tuple[str, str]]:
    """Rows of svpt.backends.table(), compact: per backend and device here, the ops grouped by
    which implementation runs each dtype."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    cells: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for row in backends.table(devices):
        cells.setdefault((row["backend"], row["device"]), {}).setdefault(row["op"], {})[row["dtype"]] = row["runs"]
    rows = [("ops run by", " / ".join(_TABLE_DTYPES) + " (svpt.backends.table() says why)")]
    for (backend, device), ops in cells.items():
        groups: dict[tuple[str, ...], list[str]] = {}
        for op, runs in ops.items():
            groups.setdefault(tuple(runs[d] for d in _TABLE_DTYPES), []).append(op)
        if list(groups) == [("-",) * len(_TABLE_DTYPES)]:
            rows.append((f"  {backend} on {device}", "not usable"))
            continue
        for runs, names in groups.items():
            which = "every op" if len(names) == len(ops) else ", ".join(names)
            rows.append((f"  {backend} on {device}", f"{which}: {' / '.join(runs)}"))
    return rows + _compiled_hand_overs(devices)


def _compiled_hand_overs(devices: tuple[str, ...]) -> list[tuple[str, str]]:
    """What runs otherwise while torch.compile traces (svpt.backends.compile_table), per backend,
    device and implementation."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for row in backends.compile_table(devices):
        ops = groups.setdefault((row["backend"], row["device"], row["runs"]), [])
        if row["op"] not in ops:
            ops.append(row["op"])
    return [("under torch.compile", f"{backend} on {device}: {', '.join(ops)}: {runs}")
            for (backend, device, runs), ops in groups.items()]


def report() -> str:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # triton is optional; say why it is not there
        triton_version = f"not importable ({type(exc).__name__}: {exc})"
    import timm

    from . import __version__
    rows = [
        ("svpt", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("timm", timm.__version__),
        ("triton", triton_version),
        ("CUDA device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        ("c++", _tool_version("c++")),
        ("nvcc", _tool_version("nvcc")),
        ("selected backend", _selected()),
    ]
    for name, reason in backends.describe().items():
        rows.append((f"backend {name}", "usable" if reason is None else f"not usable: {reason}"))
    rows.append(("C++ extension", _extension_info()))
    rows += _implementations()
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
