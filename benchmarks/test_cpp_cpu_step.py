"""CPU training step, eager vs the C++ extension (backend "cpp").

ViT-Tiny shapes (timm vit_tiny_patch16_224, random init), SVPT with M=10 prompts, batch 32,
float32: forward, backward and an AdamW step over the trainable tensors.

Run (about 2-3 minutes on 2 cores):
    PYTHONPATH=. python -m pytest benchmarks/test_cpp_cpu_step.py -q \\
        --benchmark-json=benchmarks/results/cpp_cpu_step.raw.json
"""
from __future__ import annotations

import pytest
import timm
import torch

import svpt

BATCH, PROMPTS = 32, 10


def _setup():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100)
    model = svpt.prompt(model, "svpt", PROMPTS, ae_init=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images = torch.randn(BATCH, 3, 224, 224)
    labels = torch.randint(0, 100, (BATCH,))
    return model, optimizer, images, labels


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_train_step(benchmark, backend):
    if backend == "cpp":
        from svpt_kernels import cpp
        assert cpp.why_unusable("cpu") is None, cpp.why_unusable("cpu")
    model, optimizer, images, labels = _setup()

    def step():
        with svpt.backend(backend):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step()  # warm-up (allocator, lazy init)
    benchmark.extra_info.update(backend=backend, batch=BATCH, prompts=PROMPTS, threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=6, iterations=1)
