"""svpt: visual prompt tuning (VPT, SVPT/iVPT, CVPT) of frozen timm Vision Transformers."""
import importlib

from .backends import available_backends, backend, get_backend, set_backend
from .checkpoint import load_prompt_state_dict, load_prompts, prompt_state_dict, save_prompts
from .methods import METHODS
from .prompting import is_prompted, prompt, summary
from . import fused

__version__ = "0.1.0"

__all__ = [
    "METHODS", "available_backends", "backend", "get_backend", "is_prompted", "load_prompt_state_dict",
    "load_prompts", "prompt", "prompt_state_dict", "save_prompts", "set_backend", "summary",
]

_LAZY_MODULES = ("timm_support",)  # imports timm.utils: loaded on first use, `svpt.timm_support.X` works


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
