"""``svpt env``: versions, compilers and, for each backend, whether it is usable here and why not."""
from __future__ import annotations

import platform
import shutil
import subprocess

import torch

from . import backends


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
        from svpt_kernels.cpp import build_info
    except Exception as exc:  # the loader itself failed to import; say so rather than crash
        return f"svpt_kernels.cpp not importable ({type(exc).__name__}: {exc})"
    return build_info()


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
        ("selected backend", backends.get_backend()),
    ]
    for name, reason in backends.describe().items():
        rows.append((f"backend {name}", "usable" if reason is None else f"not usable: {reason}"))
    rows.append(("C++ extension", _extension_info()))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
