"""METHOD.md's error measure, shared by the backend tests."""
import torch

# Below this relative error the 2x-eager rule compares rounding noise: bf16's unit roundoff is
# 2^-8, and a result that is one rounded value (a scalar gradient, one rounded sum; at tiny
# shapes, a fused kernel's output) may by chance be rounded closer by eager.
LOW_PRECISION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 2.0 ** -8}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (``b``: the reference)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
