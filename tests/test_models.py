"""Whole prompted models on every backend, by value against the independent float64 spec
(tests/spec_model.py, written from METHOD.md only): logits and the gradient of every trainable
tensor, fp32 <= 1e-4 (float64 <= 1e-10 where a backend computes float64 itself).

Every supported backbone variant: the tiny models of tests/backbones.py (class token, DeiT's two
prefix tokens, DINOv2 registers with layer scale, no class token, qk-norm), the timm registry
models (ViT-Ti/16, DeiT-Ti distilled, DINOv2-S/14 with registers, ViT-M/16 with average pooling;
their architecture at two blocks), and a model with a dynamic image size run at two sizes. Every
method (SVPT with both saliency sources, CVPT at every position). Every backend with the devices it
runs on here (Triton in its CPU interpreter). Each run asserts by svpt.backends.trace() that the
ops ran where the backend declares, and, for SVPT, that AE selected the spec's patches in every
block (the selection on its own; the values then compare with the same rows on both sides).
"""
from __future__ import annotations

import pytest
import timm
import torch

import svpt
from svpt import backends

import opcheck
from backbones import BACKBONES, make_images, randomize_
from numerics import bound, rel_err
from spec_model import num_topk, reference_copy, spec_forward
from test_spec_parity import randomize_trainables

TINY = {"depth": 2, "img_size": 24}  # 9 patches of 8: the Triton interpreter is slow
# name: (timm model, its options, image size)
REGISTRY = {
    "vit-ti16": ("vit_tiny_patch16_224", {}, 48),
    "deit-ti16-distilled": ("deit_tiny_distilled_patch16_224", {}, 48),
    "dinov2-s14-registers": ("vit_small_patch14_reg4_dinov2", {}, 42),
    "vit-m16-average-pool": ("vit_medium_patch16_gap_256", {}, 48),
}
DYNAMIC_SIZES = (32, 64)  # patch 16: 4 and 16 patch tokens, so AE's k follows N
METHODS = {
    "vpt-shallow": ("vpt-shallow", {}),
    "vpt-deep": ("vpt-deep", {}),
    "svpt": ("svpt", {}),
    "svpt-prompt-source": ("svpt", {"ae_source": "prompt", "ae_ratio": 0.4}),
    "cvpt": ("cvpt", {}),
}
CVPT_POSITIONS = {f"cvpt-position-{p}": ("cvpt", {"cvpt_position": p}) for p in (1, 2, 4, 5)}


def runs_on() -> list:
    """(backend, device, dtype): each backend on each device here, in fp32 and, where it computes
    some op in float64 itself, float64."""
    cases = []
    for backend in opcheck.BACKENDS:
        for device in opcheck.DEVICES:
            own = {row["dtype"] for row in backends.table((device,), (backend,)) if row["runs"] == backend}
            for dtype in ("float32", "float64"):
                if dtype in own and (backend, dtype) != ("eager", "float64"):  # eager float64: test_spec_parity
                    cases.append(pytest.param(backend, device, opcheck.DTYPES[dtype], id=f"{backend}-{device}-{dtype}"))
    return cases


def registry_model(name: str) -> torch.nn.Module:
    model_name, options, img = REGISTRY[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, num_classes=4, img_size=img, depth=2, **options)
    return randomize_(model, 3).eval()


def dynamic_model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=48, depth=2,
                                  dynamic_img_size=True)
    return randomize_(model, 4).eval()


def options_for(model: torch.nn.Module, method: str, options: dict) -> dict:
    if method == "svpt" and not getattr(model, "has_class_token", True):
        return {**options, "ae_source": "prompt"}  # METHOD.md: "cls" needs a class token
    return options


def compare(backbone: torch.nn.Module, method: str, options: dict, backend: str, device: str, dtype: torch.dtype,
            sizes: tuple[int, ...], num_prompts: int = 3) -> None:
    """The prompted ``backbone`` on ``backend`` against spec_forward, at each image size."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means full fp32
    options = options_for(backbone, method, options)
    spec_backbone = reference_copy(backbone)
    model = svpt.prompt(backbone, method, num_prompts, **options)
    randomize_trainables(model, seed=num_prompts)
    model.to(device, dtype)
    live = svpt.prompt_state_dict(model, keep_vars=True)
    for size in sizes:
        images = make_images(2, size, seed=size)
        leaves = {k: v.detach().cpu().double().requires_grad_() for k, v in live.items()}
        spec_saliency: list = []
        want = spec_forward(spec_backbone, method, leaves, options, images.double(), spec_saliency)
        for p in live.values():
            p.grad = None
        with opcheck.saliency_tap(model) as got_saliency, svpt.backend(backend), backends.trace() as log:
            logits = model(images.to(device, dtype))
        opcheck.check_model_trace(backend, device, dtype, log)
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
        (want * weights).sum().backward()
        (logits * weights.to(logits)).sum().backward()
        if method == "svpt":
            k = num_topk(options.get("ae_ratio", 0.25), want_patches := spec_saliency[0].shape[1])
            assert len(got_saliency) == len(spec_saliency) > 0 and k <= want_patches
            for layer, (got, ref) in enumerate(zip(got_saliency, spec_saliency)):
                assert torch.equal(opcheck.top_k(got, k), opcheck.top_k(ref, k)), f"AE's selection differs in block {layer}"
        errors = {"logits": rel_err(logits, want)}
        errors.update({f"grad {k}": rel_err(p.grad, leaves[k].grad) for k, p in live.items()})
        bad = {k: f"{e:.3g}" for k, e in errors.items() if not e <= bound(dtype, None)}
        assert not bad, f"{method} {options} on {backend}/{device}/{dtype} at {size}px: {bad}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", BACKBONES)
@pytest.mark.parametrize("backend,device,dtype", runs_on())
def test_tiny_backbones(backend, device, dtype, variant, method):
    compare(BACKBONES[variant](**TINY), *METHODS[method], backend, device, dtype, (TINY["img_size"],))


@pytest.mark.parametrize("method", CVPT_POSITIONS)
@pytest.mark.parametrize("backend,device,dtype", runs_on())
def test_cvpt_positions(backend, device, dtype, method):
    compare(BACKBONES["dinov2"](**TINY), *CVPT_POSITIONS[method], backend, device, dtype, (TINY["img_size"],))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", REGISTRY)
@pytest.mark.parametrize("backend,device,dtype", runs_on())
def test_timm_registry_models(backend, device, dtype, variant, method):
    compare(registry_model(variant), *METHODS[method], backend, device, dtype, (REGISTRY[variant][2],))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend,device,dtype", runs_on())
def test_dynamic_image_size(backend, device, dtype, method):
    compare(dynamic_model(), *METHODS[method], backend, device, dtype, DYNAMIC_SIZES)


@pytest.mark.parametrize("method", ["svpt", "vpt-deep", "cvpt"])
@pytest.mark.parametrize("backend,device,dtype", [p for p in runs_on() if p.values[2] == torch.float32])
def test_gradient_accumulation_over_micro_batches(backend, device, dtype, method):
    """Two backward passes without zero_grad add up to the whole batch's gradient (float64 spec
    model): nothing a backward consumes or writes in place leaks from one micro-batch to the next."""
    backbone = BACKBONES["vit"](**TINY)
    spec_backbone = reference_copy(backbone)
    model = svpt.prompt(backbone, method, 3)
    randomize_trainables(model, seed=5)
    live = svpt.prompt_state_dict(model, keep_vars=True)
    leaves = {k: v.detach().double().requires_grad_() for k, v in live.items()}
    images = make_images(4, TINY["img_size"], seed=12)
    weights = torch.linspace(-1, 1, 4 * model.num_classes, dtype=torch.float64).reshape(4, -1)
    (spec_forward(spec_backbone, method, leaves, {}, images.double()) * weights).sum().backward()
    model.to(device)
    with svpt.backend(backend):
        for half in (slice(0, 2), slice(2, 4)):
            (model(images[half].to(device)) * weights[half].to(device, dtype)).sum().backward()
    for name, p in live.items():
        assert rel_err(p.grad, leaves[name].grad) <= bound(dtype, None), name
