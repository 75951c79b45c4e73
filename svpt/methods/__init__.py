"""One module per method; each block forward is written with :mod:`svpt.ops` only."""
from .base import PromptMethod
from .cvpt import CVPT
from .svpt import SVPT
from .vpt import VPTDeep, VPTShallow

METHODS: dict[str, type[PromptMethod]] = {cls.method: cls for cls in (VPTShallow, VPTDeep, SVPT, CVPT)}

__all__ = ["CVPT", "METHODS", "PromptMethod", "SVPT", "VPTDeep", "VPTShallow"]
