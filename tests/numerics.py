"""METHOD.md's error measure, shared by the backend tests."""
import torch

# One rounding in the dtype: errors this small are not held against a kernel (e.g. a scalar
# gradient, one rounded sum, which eager may by chance round closer).
LOW_PRECISION_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 2.0 ** -8}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (``b``: the reference)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
