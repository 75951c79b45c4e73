"""Compiled and JIT kernels behind svpt's backends (``svpt_kernels.triton``: Triton)."""
