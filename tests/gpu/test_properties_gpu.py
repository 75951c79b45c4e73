"""The property tests of tests/test_properties.py on a CUDA GPU (run through the device tool:
``python -m pytest -q tests/gpu -x``; the long run: ``SVPT_GPU_EXAMPLES=300``).

``SVPT_GPU_EXAMPLES`` (default 20) is the number of hypothesis examples per (backend, op), and a
quarter of it per backend for whole models; examples are random (not derandomized), so each run
explores new cases; a failure prints the drawn case and a ``@reproduce_failure`` blob. Compared with
the CPU run: every backend draws the full shape range (M up to 128, up to 4 heads, 25 patches) and
the dtypes it declares on CUDA (bf16 included); the bounds are the same (fp32 <= 1e-4 with tf32 off,
fp16/bf16 <= 2x eager's error on the GPU).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import assume, given, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import test_properties as props  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EXAMPLES = int(os.environ.get("SVPT_GPU_EXAMPLES", "20"))


def gpu_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=False, print_blob=True,
                    suppress_health_check=list(props.HealthCheck))


@pytest.mark.parametrize("name,op", props.op_rows("cuda"))
def test_op_matches_float64_on_gpu(name, op):
    @gpu_settings(EXAMPLES)
    @given(drawn=props.CASES[op](name, "cuda"))
    def prop(drawn):
        props.check_drawn(name, op, "cuda", drawn)

    prop()


@pytest.mark.filterwarnings("ignore:svpt vpt-deep. the prompt_kv_attention fast path does not apply")
@pytest.mark.parametrize("name", [name for name in props.BACKENDS if props.model_dtypes(name, "cuda")])
def test_model_matches_eager_float64_on_gpu(name):
    @gpu_settings(max(1, EXAMPLES // 4))
    @given(case=props.model_case(name, "cuda"))
    def prop(case):
        # CUDA's dropout masks differ between float32 and float64: prompt dropout is compared on CPU only.
        assume(case[1].get("prompt_dropout", 0.0) == 0.0)
        props.check_model_case(name, case, "cuda")

    prop()
