"""Whole prompted models on backend "cpp" (CPU kernels) against the eager backend.

All four methods (and SVPT's prompt-sourced AE) on a tiny timm VisionTransformer (img 32,
patch 8, width 64, 2 heads, depth 2): logits and the gradient of every trainable tensor
(svpt.prompt_state_dict(model, keep_vars=True)). float32 against eager float64: relative
error < 1e-4 (METHOD.md); float64 against eager float64: < 1e-10. VPT-deep and CVPT run both
their fast path (cpp lists both on CPU) and their plain path (fast_paths(False)). Fails (does
not skip) when the extension is not built.

Run: PYTHONPATH=/work/main python -m pytest tests/test_cpp_model.py -q
"""
from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import svpt
from tests.backbones import make_images, randomize_
from numerics import rel_err

CASES = {
    "vpt-shallow": ("vpt-shallow", 5, {}),
    "vpt-deep": ("vpt-deep", 5, {}),
    "svpt-M1": ("svpt", 1, {}),
    "svpt-M5": ("svpt", 5, {}),
    "svpt-prompt-source": ("svpt", 5, {"ae_source": "prompt", "ae_ratio": 0.4}),
    "cvpt-pos3": ("cvpt", 5, {}),
    "cvpt-pos1": ("cvpt", 3, {"cvpt_position": 1}),
}
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
# (case, path): "default" runs what the backend chooses; "plain" turns the fast paths off.
RUNS = [(case, path) for case, (method, _, _) in CASES.items()
        for path in (("default", "plain") if method in ("vpt-deep", "cvpt") else ("default",))]


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    from svpt_kernels import cpp
    reason = cpp.why_unusable("cpu")
    assert reason is None, f"the C++ extension must be built for these tests: {reason}"


def tiny_vit() -> VisionTransformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, num_heads=2, depth=2,
                                  num_classes=5, mlp_ratio=2.0, global_pool="token")
    return randomize_(model, 11).float().eval()


def prompted(method: str, num_prompts: int, options: dict) -> torch.nn.Module:
    model = svpt.prompt(tiny_vit(), method, num_prompts, **options)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-default values, so that DA's gate and AE's update both matter
        for name, p in svpt.prompt_state_dict(model, keep_vars=True).items():
            if name == "ae.scale":
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name == "da.bias":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def logits_and_grads(model, images, backend, fast=True):
    params = svpt.prompt_state_dict(model, keep_vars=True)
    with svpt.backend(backend), svpt.backends.fast_paths(fast):
        logits = model(images)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    grads = torch.autograd.grad((logits * weights).sum(), list(params.values()))
    return logits.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("case,path", RUNS, ids=[f"{c}-{p}" for c, p in RUNS])
def test_model_cpp_vs_eager(case, path, dtype):
    method, num_prompts, options = CASES[case]
    model = prompted(method, num_prompts, options)
    reference = copy.deepcopy(model).double()
    images = make_images(3, 32, seed=1)
    want_logits, want_grads = logits_and_grads(reference, images.double(), "eager")
    got_logits, got_grads = logits_and_grads(model.to(dtype), images.to(dtype), "cpp", fast=path == "default")
    assert got_logits.dtype == dtype
    errors = {"logits": rel_err(got_logits, want_logits)}
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert got_grads[name].shape == want_grads[name].shape
        errors[name] = rel_err(got_grads[name], want_grads[name])
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v < TOL[dtype]}
    assert not bad, f"{case} {path} {dtype}: relative errors over {TOL[dtype]:.0e}: {bad}"
    if method == "svpt":  # every SVPT parameter got a gradient through the fused ops
        assert {"prompts", "ae.scale"} <= set(got_grads)
        assert all(g.abs().sum() > 0 for g in got_grads.values())
