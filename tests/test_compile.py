"""torch.compile(fullgraph=True) traces every method on every kernel backend: the ops are
registered torch.library ops with fake kernels (svpt_kernels/triton/_common.define_op, the C++
extension's register_fake), so no graph breaks; the compiled model computes what the eager
one does, forward and backward. On CPU the aot_eager backend traces forward and backward
through the registered ops (Inductor would compile CPU code the Triton interpreter cannot serve);
on a GPU, Inductor. Also ``svpt.fused.apply``, which prompts and selects the backend in one call.
"""
from __future__ import annotations

import pytest
import torch

import svpt
import svpt.fusible
from svpt import backends

import opcheck
from backbones import BACKBONES, make_images
from numerics import rel_err
from test_spec_parity import randomize_trainables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKENDS = [name for name in opcheck.BACKENDS if name != "eager"
                   and any(row["runs"] == name for row in backends.table((DEVICE,), (name,)))]


def step(model, run, images):
    """``run(images)``'s logits and the gradients it leaves in ``model``'s trainable tensors."""
    model.zero_grad(set_to_none=True)
    logits = run(images)
    logits.square().sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["svpt", "vpt-deep", "cvpt"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph(backend, method):
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    model = svpt.prompt(BACKBONES["vit"](depth=2, img_size=24), method, 3).to(DEVICE)
    randomize_trainables(model, seed=1)
    images = make_images(2, 24, seed=10).to(DEVICE)
    with svpt.backend(backend):
        want_logits, want_grads = step(model, model, images)
        compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor", fullgraph=True)
        got_logits, got_grads = step(model, compiled, images)
    torch._dynamo.reset()
    assert rel_err(got_logits, want_logits) < 1e-5
    assert set(got_grads) == set(want_grads)
    for name, grad in got_grads.items():
        assert want_grads[name].abs().max() > 0 and rel_err(grad, want_grads[name]) < 1e-5, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fused_apply_selects_the_backend(backend):
    previous = svpt.get_backend()
    try:
        model = svpt.fused.apply(BACKBONES["vit"](depth=2, img_size=24), "svpt", 3, backend=backend).to(DEVICE)
        assert svpt.get_backend() == backend
        with backends.trace() as log:
            model(make_images(2, 24, seed=4).to(DEVICE))
        assert any(impl == backend for _, impl in log), log
    finally:
        svpt.set_backend(previous)


def test_cpp_host_checks_are_constants_to_torch_compile(monkeypatch):
    """The cpp backend's checks of the extension and the GPU (CUDA kernels built, and for this GPU?
    which of ATen's fused attention kernels?) run inside the forward torch.compile traces. They ask the
    extension's info ops and torch's C flags, which return no tensors and which Dynamo cannot trace
    (on an H100 every cpp model failed to compile: benchmarks/results/test_compile_gpu_h100.txt), so
    the compiler must take their answers as the constants they are. An sm90 GPU is faked for the choice
    of attention kernel (torch.cuda stays unavailable: Dynamo itself asks it)."""
    from svpt_kernels import aten_attention, cpp
    if cpp.why_unusable() is not None:
        pytest.skip(f"the C++ extension is not usable here: {cpp.why_unusable()}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    gpu = torch.device("cuda", 0)

    def checks(x):
        return (x + len(cpp.why_unusable(gpu) or "")
                + len(aten_attention.kernel_for(gpu, torch.bfloat16, 64) or ""))

    monkeypatch.setattr(cpp, "_WHY_NOT_CUDA", {})  # the faked GPU's answers stay out of the real caches
    monkeypatch.setattr(aten_attention, "_KERNELS", {})
    want = checks(torch.zeros(1)).item()
    cpp._WHY_NOT_CUDA.clear()  # first asked while tracing, as in a fresh process
    aten_attention._KERNELS.clear()
    got = torch.compile(checks, fullgraph=True, backend="eager")(torch.zeros(1))
    torch._dynamo.reset()
    assert got.item() == want


FIRST_CALL_COMPILED = """
import sys, torch, svpt
sys.path.insert(0, {tests!r})
from backbones import BACKBONES, make_images
torch._dynamo.config.error_on_recompile = True
svpt.set_backend({backend!r})
for method in ("svpt", "vpt-deep", "cvpt"):
    model = svpt.prompt(BACKBONES["vit"](depth=2, img_size=24), method, 3).to({device!r})
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for seed in (1, 2):
        compiled(make_images(2, 24, seed=seed).to({device!r}))
    torch._dynamo.reset()  # the next model runs the same timm forward: a new compilation, not a recompile
print("one graph each")
"""


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_first_call_compiled_in_a_fresh_process(backend):
    """The common script: compile a freshly prompted model and call it. Its first forward is the
    traced one, so nothing in it may import a backend (a graph break the compiled model keeps) or
    fill a cache the guards read (a second compilation on the next call)."""
    import subprocess
    import sys
    from pathlib import Path

    script = FIRST_CALL_COMPILED.format(tests=str(Path(__file__).parent), backend=backend, device=DEVICE)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "one graph each" in done.stdout, done.stderr[-3000:]
    assert "lru_cache" not in done.stderr, done.stderr[-3000:]  # Dynamo's warning: a cache it traces through


def test_compiling_rules_hand_over_while_torch_compile_traces(monkeypatch):
    """A PREFER rule marked "compiling" (the Triton backend's: svpt.fusible on CUDA) applies only while
    torch.compile traces: the kernels resolved then name it, those of an eager forward do not, and the
    compiled model, which ran it, computes what the eager one does. Here on this machine's first kernel
    backend and device, with such a rule added for the test."""
    op = "folded_cross_attention"
    backend = KERNEL_BACKENDS[0]
    module = backends._REGISTRY[backend].load()  # noqa: SLF001
    rule = {"devices": (DEVICE,), "use": "fusible", "compiling": True, "why": "test"}
    monkeypatch.setattr(module, "PREFER", {**module.PREFER, op: [rule]})
    calls = []
    fused = getattr(svpt.fusible, op)
    monkeypatch.setattr(svpt.fusible, op, lambda *args: calls.append(op) or fused(*args))
    backends._KERNELS.clear()  # noqa: SLF001
    sizes = {"head_dim": 8, "logit_columns": 6}
    with svpt.backend(backend):
        eager = backends.kernels(torch.device(DEVICE), torch.float32, **sizes)
        with monkeypatch.context() as tracing:
            tracing.setattr(torch.compiler, "is_compiling", lambda: True)
            traced = backends.kernels(torch.device(DEVICE), torch.float32, **sizes)
    assert eager.names[op] == backend
    assert traced.names[op] == "fusible"
    assert "while torch.compile traces" in traced.why[op]
    test_compile_fullgraph(backend, "cvpt")
    backends._KERNELS.clear()  # noqa: SLF001
    assert set(calls) == {op}, calls


def _norm_op_calls():
    """One call of each Triton op behind da_mix's and ae_update's ``norm=`` variants (forward, backward)."""
    import importlib
    da, ae = (importlib.import_module(f"svpt_kernels.triton.{name}") for name in ("da_mix", "ae_update"))
    gen = torch.Generator().manual_seed(0)
    r = lambda *s, dtype=torch.float32: torch.randn(*s, generator=gen).to(DEVICE, dtype)  # noqa: E731
    residual, branch, prompts, weight, bias = r(2, 13, 40), r(2, 13, 40, dtype=torch.float16), r(1, 3, 40), r(2, 40), r(())
    norm = (r(40), r(40), 1e-5, torch.float16)
    index = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(2)]).to(DEVICE)
    scale = r(())
    out, y, mean, rstd, prev = da._da_mix_norm_op(branch, prompts, weight, bias, 1, residual, *norm)
    ae_out, ae_y, ae_mean, ae_rstd, prompt_mean = ae._ae_update_norm_op(branch, index, scale, 1, 3, residual, *norm)
    return [
        (da._da_mix_norm_op.op, (branch, prompts, weight, bias, 1, residual, *norm)),
        (da._da_mix_norm_backward_op.op, (y, out.clone(), out, mean, rstd, norm[0], prev, prompts, weight, bias, 1,
                                          torch.float32, torch.float16)),
        (ae._ae_update_norm_op.op, (branch, index, scale, 1, 3, residual, norm[0], None, 1e-5, torch.float16)),
        (ae._ae_update_norm_backward_op.op, (ae_y, None, ae_out, ae_mean, ae_rstd, norm[0], prompt_mean, index, scale,
                                             1, 3, torch.float32, torch.float16)),
    ]


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="the Triton backend is not usable here")
def test_fused_norm_ops_pass_opcheck():
    """The functional ops of the norm= variants: schema, fake kernels against the real ones (what
    torch.compile traces with), dynamic shapes through AOTAutograd."""
    for op, args in _norm_op_calls():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
