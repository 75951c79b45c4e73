"""METHOD.md's error measure, shared by the backend tests."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (``b``: the reference)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()
