"""pytest set-up of the benchmarks: the harness on the path, and the run's provenance in the JSON."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CUDA, SETTING  # noqa: E402


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep with the results what produced them: the command and the library versions
    (pytest-benchmark already stores the machine and the git commit)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    output_json["svpt"] = {
        "command": " ".join(["python -m pytest", *sys.argv[1:]]),
        "versions": versions,
        "device": torch.cuda.get_device_name(0) if CUDA else platform.processor() or "cpu",
        "setting": {"model": SETTING.model, "batch": SETTING.batch, "autocast": str(SETTING.autocast)},
    }
