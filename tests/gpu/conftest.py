import pytest
import torch


@pytest.fixture(autouse=True)
def _full_fp32():
    """fp32 means full fp32 on the GPU too (METHOD.md): no tf32 in eager's products."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
