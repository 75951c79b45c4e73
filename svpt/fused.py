"""``svpt.fused.apply``: the one-liner that prompts a model and selects the fused kernels.

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    svpt.fused.apply(model, "svpt", num_prompts=50, num_classes=100)

The backend choice is process-wide (it is :func:`svpt.set_backend`): every prompted model in
the process runs on it afterwards, until ``svpt.set_backend`` is called again. With the default
``backend="auto"`` this is :func:`svpt.prompt` (whose default is ``"auto"`` too) with the
selection reset to ``"auto"``: the line a training script needs, whatever was selected before.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .backends import set_backend
from .prompting import prompt

__all__ = ["apply"]


def apply(model: nn.Module, method: str, num_prompts: int, num_classes: int | None = None,
          backend: str = "auto", **options: Any) -> nn.Module:
    """Prompt ``model`` in place as :func:`svpt.prompt` does and run its ops on ``backend``.

    ``backend="auto"`` (default, as for :func:`svpt.prompt`) uses the Triton kernels on CUDA
    tensors and the C++ extension on CPU tensors where they work, otherwise the next usable
    backend, warning once with the reason; ``"triton"`` insists (an error here if Triton cannot
    run in this process). The choice is process-wide:
    it is made with :func:`svpt.set_backend`, before the model is touched, so an unusable
    backend leaves the model unprompted. Returns the model.
    """
    set_backend(backend)
    return prompt(model, method, num_prompts, num_classes, **options)
