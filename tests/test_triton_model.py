"""Whole prompted models on the Triton backend (interpreter on CPU) against eager float64.

METHOD.md's fp32 bound: relative error < 1e-4 for the logits and every trainable gradient.
"""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import svpt
from backbones import make_images, randomize_
from numerics import rel_err

# On a CUDA machine the same checks run on the GPU (tf32 off: fp32 means full fp32 there too).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    ("vpt-shallow", {}),
    ("vpt-deep", {}),
    ("svpt", {}),
    ("svpt", {"ae_source": "prompt", "ae_ratio": 0.3}),
    ("cvpt", {}),
    ("cvpt", {"cvpt_position": 1}),
]


def tiny_vit() -> VisionTransformer:
    # img 32 / patch 8 -> 16 patches; width 64 = 2 heads of 32; depth 2
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              mlp_ratio=2.0, num_classes=5, global_pool="token")
    return randomize_(model, 11).eval()


def prompted(method: str, options: dict, num_prompts: int = 3) -> torch.nn.Module:
    model = svpt.prompt(tiny_vit(), method, num_prompts, **options).to(DEVICE)
    with torch.no_grad():  # non-default trainables, so every gradient path carries signal
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if p.requires_grad and (name.startswith("prompter.da") or name.startswith("prompter.ae")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def logits_and_grads(model, images, backend):
    model.zero_grad(set_to_none=True)
    with svpt.backend(backend):
        logits = model(images)
    (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape).to(logits)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o in CASES])
def test_triton_model_matches_eager_float64(method, options):
    model = prompted(method, options)
    torch.backends.cuda.matmul.allow_tf32 = False
    images = make_images(2, seed=3).to(DEVICE)
    reference = copy.deepcopy(model).double()
    ref_logits, ref_grads = logits_and_grads(reference, images.double(), "eager")
    logits, grads = logits_and_grads(model, images, "triton")
    assert logits.dtype == torch.float32
    assert rel_err(logits, ref_logits) < 1e-4
    assert set(grads) == set(ref_grads) and len(grads) >= 3
    for name, grad in grads.items():
        assert ref_grads[name].abs().max() > 0, name  # the check below must be able to fail
        assert rel_err(grad, ref_grads[name]) < 1e-4, name


def test_fused_apply_selects_triton_and_compiles_fullgraph():
    previous = svpt.get_backend()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = svpt.fused.apply(tiny_vit(), "svpt", 3, backend="triton").to(DEVICE)
        assert svpt.get_backend() == "triton"
        images = make_images(2, seed=4).to(DEVICE)
        expected = model(images)
        # On CPU, aot_eager: traces forward and backward through the registered ops with
        # fullgraph (Inductor would compile the CPU graph, which the interpreter cannot serve).
        compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor",
                                 fullgraph=True)
        got = compiled(images)
        got.sum().backward()
        assert rel_err(got.detach(), expected.detach()) < (1e-6 if DEVICE == "cpu" else 1e-5)
        assert model.prompter.prompts.grad is not None and model.prompter.prompts.grad.abs().max() > 0
    finally:
        svpt.set_backend(previous)


def test_gradient_accumulation_over_micro_batches():
    # Two backward passes without zero_grad must add up to the gradient of the whole batch.
    model = prompted("svpt", {})
    images = make_images(4, seed=12).to(DEVICE)
    weights = torch.linspace(-1, 1, 4 * 5, device=DEVICE).reshape(4, 5)
    whole = copy.deepcopy(model).double()
    with svpt.backend("eager"):
        whole(images.double()).mul(weights.double()).sum().backward()
    with svpt.backend("triton"):
        model.zero_grad(set_to_none=True)
        for half in (slice(0, 2), slice(2, 4)):
            model(images[half]).mul(weights[half]).sum().backward()
    want = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, want[name]) < 1e-4, name
