"""Whole prompted ViT-B/16 models on every backend that runs on CUDA, under bf16 autocast (run
through the device tool: ``python -m pytest -q tests/gpu -x``).

Every method with M = 50 (and CVPT with M = 10, where its fold runs), batch 32, random well-spread
weights (tests/backbones.randomize_): logits and every trainable gradient of the backend under bf16
autocast within 2x the eager backend's error under the same autocast, both against the float64
model (METHOD.md). AE's selection is fixed to the float64 model's in both bf16 runs (its saliency
injected, opcheck.saliency_tap): near-ties that 16-bit q/k flip would otherwise make the scalar
ae.scale gradient jump for either backend; the selection itself is tested on its own in
test_ops_gpu.py. The fast paths, where the backend lists them, run in every block (trace). And
torch.compile(fullgraph=True) with Inductor on the Triton kernels.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import svpt
from svpt import backends
from svpt.methods.cvpt import fold_pays

import opcheck
from backbones import randomize_
from numerics import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BATCH = 32
CASES = {  # name: (method, M, options)
    "vpt-shallow": ("vpt-shallow", 50, {}),
    "vpt-deep": ("vpt-deep", 50, {}),
    "svpt": ("svpt", 50, {}),
    "svpt-prompt-source": ("svpt", 50, {"ae_source": "prompt"}),
    "cvpt-M50": ("cvpt", 50, {}),
    "cvpt-M10-folded": ("cvpt", 10, {}),
    "cvpt-M10-folded-position-2": ("cvpt", 10, {"cvpt_position": 2}),
}
FAST_OP = {"vpt-deep": "prompt_kv_attention", "cvpt": "folded_cross_attention"}
KERNEL_BACKENDS = [name for name in opcheck.BACKENDS if name != "eager"
                   and any(row["runs"] == name for row in backends.table(("cuda",), (name,)))]
_BACKBONE: dict = {}


def vit_b16() -> torch.nn.Module:
    """A fresh copy of one random ViT-B/16 (re-drawing 86M weights takes seconds: built once)."""
    if not _BACKBONE:
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
        _BACKBONE["model"] = randomize_(model, 0).eval()
    return copy.deepcopy(_BACKBONE["model"])


def prompted(method: str, num_prompts: int, options: dict) -> torch.nn.Module:
    model = svpt.prompt(vit_b16(), method, num_prompts, **options).cuda()
    with torch.no_grad():  # non-default trainables, so that every gradient path carries signal
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name == "prompter.da.weight":
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif name == "prompter.ae.scale":
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=gen))
    return model


def run(model, images, backend, autocast: bool, inject=None):
    """(logits, trainable gradients, trace, the saliency AE ranked in each block)."""
    model.zero_grad(set_to_none=True)
    with opcheck.saliency_tap(model, inject) as saliency, svpt.backend(backend), backends.trace() as log, \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(images.to(next(model.parameters()).dtype))
    weights = torch.linspace(-1, 1, logits.numel(), device=logits.device).reshape(logits.shape)
    (logits.float() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, list(log), saliency


def check_trace(backend: str, log: list) -> None:
    """Under autocast each op ran exactly what the backend declares for the dtype it computes in
    (bf16 for the products, fp32 for the row-local ops on the fp32 residual stream). A method whose
    every op the backend hands over (VPT-shallow on Triton: all SDPA) tests the hand-over only."""
    with svpt.backend(backend):
        declared = {op: backends.implementation(op, "cuda", torch.bfloat16 if op in backends.PRODUCT_OPS
                                                else torch.float32).name for op, _ in log}
    assert log and all(impl == declared[op] for op, impl in log), (log, declared)


def fast_path_calls(model, method: str, backend: str) -> int:
    """How often the method's fast-path op must run: in every block where the backend lists it
    (and, for CVPT, the fold pays at this M), else never."""
    op = FAST_OP.get(method)
    if op is None:
        return 0
    with svpt.backend(backend):
        listed = backends.has_fast_path(op, torch.device("cuda"))
    pays = method != "cvpt" or fold_pays(model.blocks[0], model.prompter.num_prompts)
    return len(model.blocks) if listed and pays else 0


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_vit_b16_under_bf16_autocast(backend, case):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    method, num_prompts, options = CASES[case]
    model = prompted(method, num_prompts, options)
    images = torch.randn(BATCH, 3, 224, 224, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    want_logits, want_grads, _, saliency = run(copy.deepcopy(model).double(), images, "eager", autocast=False)
    inject = saliency if method == "svpt" else None
    eager_logits, eager_grads, _, _ = run(model, images, "eager", autocast=True, inject=inject)
    got_logits, got_grads, log, _ = run(model, images, backend, autocast=True, inject=inject)
    check_trace(backend, log)
    if method in FAST_OP:
        assert sum(1 for op, _ in log if op == FAST_OP[method]) == fast_path_calls(model, method, backend)
    rows = [("logits", got_logits, eager_logits, want_logits)]
    rows += [(name, got_grads[name], eager_grads[name], want_grads[name]) for name in want_grads]
    print(f"\nViT-B/16 {case} B={BATCH} under bf16 autocast on {backend} (eager's error):")
    bad = []
    for name, got, eager, want in rows:
        err, eager_err = rel_err(got, want), rel_err(eager, want)
        print(f"  {name:<28} {err:.3e}  ({eager_err:.3e})")
        if not err <= 2 * eager_err:
            bad.append(f"{name}: {err:.3g} > 2 x {eager_err:.3g}")
    assert not bad, bad


def test_compile_fullgraph_inductor():
    model = prompted("svpt", 7, {})
    model.blocks = model.blocks[:2]  # two blocks: the point is tracing, not the depth
    images = torch.randn(4, 3, 224, 224, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with svpt.backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(images).float()
        got = torch.compile(model, fullgraph=True)(images).float()
    got.sum().backward()
    assert rel_err(got, expected) < 2e-2  # bf16 products: Inductor fuses and rounds differently
    assert model.prompter.prompts.grad.abs().max() > 0
