import pytest
import torch


@pytest.fixture(scope="module")
def triton_ops():
    """The Triton backend on the GPU, with tf32 off so that eager fp32 is full fp32 too."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import svpt_kernels.triton as ops
    assert ops.why_unusable(torch.device("cuda")) is None
    return ops
