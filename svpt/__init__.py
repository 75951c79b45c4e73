"""svpt: visual prompt tuning (VPT, SVPT/iVPT, CVPT) of frozen timm Vision Transformers."""
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
