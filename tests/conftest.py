import os

import torch

# Triton kernels run on CPU only through the interpreter, which is read when @triton.jit
# decorates: set it before any test imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
