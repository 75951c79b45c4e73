import os

import pytest
import torch

# Triton kernels run on CPU only through the interpreter, which is read when @triton.jit
# decorates: set it before any test imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second OpenMP thread only waits, and on a busy machine costs 100x (modules
    that use it: ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
