"""The exact fast paths (METHOD.md, "Fast path"): VPT-deep's KV-only attention, CVPT's folded
cross-attention. The ops themselves are tested in tests/ops/test_prompt_kv_attention.py and
tests/ops/test_folded_cross_attention.py; whole models on every backend against the spec in
tests/test_models.py. Here, the methods' use of them:

* the rewrite itself, on the eager reference ops in float64: fast path == plain path to rounding,
  for every CVPT position and the backbones with registers, layer scale, two prefix tokens;
* on each backend that lists a fast path (its FAST_PATHS): the fast path runs in every block
  (svpt.backends.trace()), and fast path, the same backend's plain path and the float64 model
  agree (fp32 <= 1e-4; float64 fast == plain to rounding where the backend computes float64);
* when a fast path must not run: prompt dropout in training (plain path, one warning), q_norm for
  CVPT (plain path, one warning), a fold that would cost more, fast_paths(False), the eager
  backend (plain, silent).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import svpt
from svpt import backends, reference

from backbones import BACKBONES, make_images
from numerics import FP32_BOUND, rel_err

FAST_OP = {"vpt-deep": "prompt_kv_attention", "cvpt": "folded_cross_attention"}
CPU = torch.device("cpu")


def listing(op: str) -> list[str]:
    """The backends (not eager) whose FAST_PATHS list ``op`` on CPU."""
    names = []
    for name in backends.describe():
        with svpt.backend(name):
            if name != "eager" and backends.has_fast_path(op, CPU):
                names.append(name)
    return names


def prompted(backbone: str, method: str, num_prompts: int = 3, **options) -> torch.nn.Module:
    return svpt.prompt(BACKBONES[backbone](depth=2), method, num_prompts, **options)


def run(model, images, backend, fast=True):
    """(logits, trainable gradients, trace) of one forward and backward."""
    model.zero_grad(set_to_none=True)
    with svpt.backend(backend), backends.fast_paths(fast), backends.trace() as log:
        logits = model(images)
    (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape).to(logits)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, list(log)


def calls(log, op: str) -> int:
    return sum(1 for name, _ in log if name == op)


def assert_close(got, want, bound, label):
    (logits, grads, _), (want_logits, want_grads, _) = got, want
    assert rel_err(logits, want_logits) <= bound, (label, "logits", rel_err(logits, want_logits))
    assert set(grads) == set(want_grads) and "prompter.prompts" in grads
    for name, grad in grads.items():
        assert want_grads[name].abs().max() > 0, name  # the comparison below can fail
        assert rel_err(grad, want_grads[name]) <= bound, (label, name, rel_err(grad, want_grads[name]))


# ------------------------------------------------------------------ the rewrite, float64
@pytest.mark.parametrize("backbone,method,options", [
    ("vit", "vpt-deep", {}), ("dinov2", "vpt-deep", {}), ("deit", "vpt-deep", {}), ("qknorm", "vpt-deep", {}),
    *[("dinov2", "cvpt", {"cvpt_position": p}) for p in range(1, 6)],
    ("deit", "cvpt", {}), ("noclass", "cvpt", {"cvpt_position": 2}),
])
def test_rewrite_is_exact_on_reference_ops(monkeypatch, backbone, method, options):
    # The eager reference lists no fast paths (it computes the plain path); listing them here
    # runs the fast path's model code on the reference ops, in float64. M = 3: within fold_pays.
    assert_fast_is_plain_on_reference_ops(monkeypatch, prompted(backbone, method, 3, **options).double(), method)


def test_fold_with_k_norm_alone_is_exact(monkeypatch):
    """k_norm acts on the prompt keys only, so the CVPT fold applies and stays exact; it is q_norm
    (nonlinear in x) that stops it."""
    model = prompted("qknorm", "cvpt", 4).double()
    for blk in model.blocks:
        blk.attn.q_norm = torch.nn.Identity()
    assert_fast_is_plain_on_reference_ops(monkeypatch, model, "cvpt")


def assert_fast_is_plain_on_reference_ops(monkeypatch, model, method):
    images = make_images(2, seed=7).double()
    plain = run(model, images, "eager")
    assert calls(plain[2], FAST_OP[method]) == 0
    monkeypatch.setattr(reference, "FAST_PATHS", tuple(FAST_OP.values()), raising=False)
    fast = run(model, images, "eager")
    assert calls(fast[2], FAST_OP[method]) == len(model.blocks)
    assert_close(fast, plain, 1e-12, "float64 fast vs plain")


# ------------------------------------------------------------------ on the backends that list them
MODEL_CASES = [
    ("dinov2", "vpt-deep", {}),               # registers + layer scale
    ("deit", "vpt-deep", {}),                 # two prefix tokens, two heads
    ("qknorm", "vpt-deep", {}),               # q/k norms act per token: the KV-only path stays exact
    ("dinov2", "cvpt", {}),                   # position 3: residual = the kernel's own input
    ("vit", "cvpt", {"cvpt_position": 2}),    # separate residual
    ("vit", "cvpt", {"cvpt_position": 4}),    # residual = LN2(h)
]
MODEL_RUNS = [pytest.param(backend, *case, id=f"{backend}-{case[0]}-{case[1]}-{case[2].get('cvpt_position', 3)}")
              for case in MODEL_CASES for backend in listing(FAST_OP[case[1]])]


@pytest.mark.parametrize("backend,backbone,method,options", MODEL_RUNS)
def test_fast_path_matches_plain_path_and_float64(backend, backbone, method, options):
    model = prompted(backbone, method, **options)
    images = make_images(2, seed=3)
    want = run(copy.deepcopy(model).double(), images.double(), "eager")
    plain = run(model, images, backend, fast=False)
    fast = run(model, images, backend)
    assert calls(plain[2], FAST_OP[method]) == 0 and calls(fast[2], FAST_OP[method]) == len(model.blocks)
    assert all(impl == backend for op, impl in fast[2] if op == FAST_OP[method])
    assert_close(fast, want, FP32_BOUND, "fast vs float64")
    assert_close(fast, plain, FP32_BOUND, "fast vs plain fp32")
    assert_close(plain, want, FP32_BOUND, "plain vs float64")


FLOAT64_RUNS = [pytest.param(backend, method, options, id=f"{backend}-{method}-{options.get('cvpt_position', 3)}")
                for method, options in [("vpt-deep", {}), ("cvpt", {}), ("cvpt", {"cvpt_position": 4})]
                for backend in listing(FAST_OP[method])
                if any(r["runs"] == backend for r in backends.table(("cpu",), (backend,))
                       if (r["op"], r["dtype"]) == (FAST_OP[method], "float64"))]


@pytest.mark.parametrize("backend,method,options", FLOAT64_RUNS)
def test_fast_path_equals_plain_path_in_float64(backend, method, options):
    """Where a backend computes the fast-path op in float64 itself, the rewrite is exact to rounding there too."""
    model = prompted("dinov2", method, 4, **options).double()
    images = make_images(2, seed=11).double()
    plain, fast = run(model, images, backend, fast=False), run(model, images, backend)
    assert calls(fast[2], FAST_OP[method]) == len(model.blocks)
    assert_close(fast, plain, 1e-12, f"{backend} float64 fast vs plain")


@pytest.mark.parametrize("backend", listing("folded_cross_attention"))
def test_cvpt_falls_back_with_q_norm(backend):
    model = prompted("qknorm", "cvpt")
    images = make_images(2, seed=4)
    want = run(copy.deepcopy(model).double(), images.double(), "eager")
    with pytest.warns(RuntimeWarning, match="q_norm") as record:
        got = run(model, images, backend)
        run(model, images, backend)
    assert len([w for w in record if "fast path" in str(w.message)]) == 1  # once, not per block or step
    assert calls(got[2], "folded_cross_attention") == 0
    assert_close(got, want, FP32_BOUND, f"qknorm cvpt plain ({backend}) vs float64")


@pytest.mark.parametrize("method", ["vpt-deep", "cvpt"])
@pytest.mark.parametrize("backend", sorted(set(listing("prompt_kv_attention")) & set(listing("folded_cross_attention"))))
def test_prompt_dropout_in_training_falls_back_once(backend, method):
    model = prompted("vit", method, prompt_dropout=0.5).train()
    images = make_images(2, seed=6)
    with pytest.warns(RuntimeWarning, match="prompt dropout") as record:
        first, second = run(model, images, backend), run(model, images, backend)
    assert len([w for w in record if "fast path" in str(w.message)]) == 1
    assert calls(first[2], FAST_OP[method]) == calls(second[2], FAST_OP[method]) == 0
    # eval: dropout is off, prompts are shared again -> fast path, no warning, same as float64
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(model, images, backend)
    assert calls(got[2], FAST_OP[method]) == len(model.blocks)
    assert_close(got, run(copy.deepcopy(model).double(), images.double(), "eager"), FP32_BOUND,
                 f"eval with dropout ({backend})")


@pytest.mark.parametrize("backend", sorted(set(listing("prompt_kv_attention")) & set(listing("folded_cross_attention"))))
def test_fast_paths_off_and_a_fold_that_costs_more_run_the_plain_path_silently(backend):
    images = make_images(1, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logs = [run(prompted("vit", "vpt-deep"), images, backend, fast=False)[2],
                run(prompted("vit", "cvpt"), images, backend, fast=False)[2],
                # 3 (H - 1) M >= d: the fold would not pay (width 48, 4 heads: 3 * 3 * 16 = 144)
                run(prompted("vit", "cvpt", num_prompts=16), images, backend)[2],
                run(prompted("vit", "vpt-deep", prompt_dropout=0.5).train(), images, "eager")[2]]
    assert all(calls(log, op) == 0 for log in logs for op in FAST_OP.values())
    with svpt.backend(backend):
        assert backends.has_fast_path("prompt_kv_attention", CPU)
        with backends.fast_paths(False):
            assert not backends.has_fast_path("folded_cross_attention", CPU)
    with svpt.backend("eager"):
        assert not backends.has_fast_path("prompt_kv_attention", CPU)


@pytest.mark.parametrize("heads,width,most_prompts", [(12, 768, 23), (6, 384, 25), (4, 48, 5), (1, 48, 10 ** 6)])
def test_fold_pays_up_to_half_the_training_step_break_even(heads, width, most_prompts):
    """ViT-B/16 folds up to M = 23, ViT-S/16 up to 25; a single head always pays (no extra columns)."""
    from svpt.methods.cvpt import fold_pays
    block = torch.nn.Module()
    block.attn = torch.nn.Module()
    block.attn.num_heads, block.attn.qkv = heads, torch.nn.Linear(width, 3 * width, device="meta")
    assert fold_pays(block, most_prompts) and (heads == 1 or not fold_pays(block, most_prompts + 1))


def test_fast_paths_per_device_type(monkeypatch):
    """A backend's FAST_PATHS may be a dict {device type: ops}: a device type missing from it has
    none; a tuple applies to every device type."""
    module = backends._REGISTRY["eager"].load()  # noqa: SLF001 - the reference: usable everywhere
    with svpt.backend("eager"):
        monkeypatch.setattr(module, "FAST_PATHS", {"cuda": ("prompt_kv_attention",)}, raising=False)
        with backends.trace():  # a fresh resolution of the kernels
            assert not backends.has_fast_path("prompt_kv_attention", CPU)
        monkeypatch.setattr(module, "FAST_PATHS", {"cpu": ("prompt_kv_attention",)})
        with backends.trace():
            assert backends.has_fast_path("prompt_kv_attention", CPU)
        monkeypatch.setattr(module, "FAST_PATHS", ("folded_cross_attention",))
        with backends.trace():
            assert backends.has_fast_path("folded_cross_attention", CPU)
            assert not backends.has_fast_path("prompt_kv_attention", CPU)
