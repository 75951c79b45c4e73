"""The exact fast paths (METHOD.md, "Fast path"): VPT-deep KV-only, CVPT folded cross-attention.

* The rewrite itself, on the eager reference ops in float64: fast path == plain path to
  rounding, for every CVPT position and the backbones with registers, layer scale, two
  prefix tokens (cheap: no kernels).
* The Triton ops against the reference (forward and every gradient), through
  test_triton_ops.check: fp32 < 1e-4, fp16 within 2x eager fp16's error.
* Whole models on the Triton backend (interpreter on CPU): fast path vs the plain path of the
  same method (eager fp32) and the eager float64 reference, logits and every trainable
  gradient < 1e-4; the fast-path op is spied on, so the test knows which path ran.
* When a fast path must not run: prompt dropout in training (plain path, one warning), q_norm
  for CVPT (plain path, one warning), the eager backend or fast_paths(False) (plain, silent).
* The same on the C++ backend's CPU kernels (backend "cpp", which lists both fast paths on CPU):
  fast path vs its own plain path (fp32 and float64) and vs eager float64, and the fallbacks.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import svpt
from svpt import reference
from backbones import BACKBONES, make_images
from test_triton_ops import check, gen
from numerics import rel_err

triton_backend = pytest.importorskip("svpt_kernels.triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_OP = {"vpt-deep": "prompt_kv_attention", "cvpt": "folded_cross_attention"}


def spy_on(monkeypatch, module) -> dict:
    """Counts the calls of each fast-path op of the backend ``module`` (name -> calls)."""
    calls = {}
    for name in FAST_OP.values():
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args)
        monkeypatch.setattr(module, name, counted)
    return calls


def cpp_module():
    from svpt_kernels import cpp
    reason = cpp.why_unusable("cpu")
    assert reason is None, f"the C++ extension must be built for these tests: {reason}"
    return cpp


def backend_spy(monkeypatch, backend: str) -> tuple[dict, str]:
    """(calls of each fast-path op, device to run on) for ``backend`` with the fast paths it
    ships: Triton on DEVICE (both), cpp on CPU (both, CPU only)."""
    if backend == "triton":
        return spy_on(monkeypatch, triton_backend), DEVICE
    return spy_on(monkeypatch, cpp_module()), "cpu"


@pytest.fixture
def spy(monkeypatch):
    return backend_spy(monkeypatch, "triton")[0]


def prompted(backbone: str, method: str, num_prompts: int = 3, device: str = DEVICE, **options) -> torch.nn.Module:
    return svpt.prompt(BACKBONES[backbone](), method, num_prompts, **options).to(device)


def logits_and_grads(model, images, backend, fast=True):
    model.zero_grad(set_to_none=True)
    with svpt.backend(backend), svpt.backends.fast_paths(fast):
        logits = model(images)
    (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape).to(logits)).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(got, want, bound, label):
    logits, grads = got
    want_logits, want_grads = want
    assert rel_err(logits, want_logits) < bound, (label, "logits", rel_err(logits, want_logits))
    assert set(grads) == set(want_grads) and "prompter.prompts" in grads
    for name, grad in grads.items():
        assert want_grads[name].abs().max() > 0, name  # the comparison below can fail
        assert rel_err(grad, want_grads[name]) < bound, (label, name, rel_err(grad, want_grads[name]))


# ------------------------------------------------------------------ the rewrite, float64
@pytest.mark.parametrize("backbone,method,options", [
    ("vit", "vpt-deep", {}), ("dinov2", "vpt-deep", {}), ("deit", "vpt-deep", {}), ("qknorm", "vpt-deep", {}),
    *[("dinov2", "cvpt", {"cvpt_position": p}) for p in range(1, 6)],
    ("deit", "cvpt", {}), ("noclass", "cvpt", {"cvpt_position": 2, "num_prompts": 3}),
])
def test_rewrite_is_exact_on_reference_ops(monkeypatch, backbone, method, options):
    # The eager reference lists no fast paths (it computes the plain path); listing them here
    # runs the fast path's model code on the reference ops, in float64.
    num_prompts = options.pop("num_prompts", 4)  # within fold_pays for CVPT
    assert_fast_is_plain_on_reference_ops(monkeypatch, prompted(backbone, method, num_prompts, **options).double(),
                                          method)


def test_fold_with_k_norm_alone_is_exact(monkeypatch):
    """k_norm acts on the prompt keys only, so the CVPT fold (computed for all blocks at once)
    applies and stays exact; it is q_norm that stops it."""
    model = prompted("qknorm", "cvpt", 4).double()
    for blk in model.blocks:
        blk.attn.q_norm = torch.nn.Identity()
    assert_fast_is_plain_on_reference_ops(monkeypatch, model, "cvpt")


def assert_fast_is_plain_on_reference_ops(monkeypatch, model, method):
    images = make_images(2, seed=7).double().to(DEVICE)
    plain = logits_and_grads(model, images, "eager")
    monkeypatch.setattr(reference, "FAST_PATHS", tuple(FAST_OP.values()), raising=False)
    calls = {}
    real = getattr(reference, FAST_OP[method])
    monkeypatch.setattr(reference, FAST_OP[method],
                        lambda *a: calls.setdefault("n", []).append(1) or real(*a))
    fast = logits_and_grads(model, images, "eager")
    assert len(calls["n"]) == len(model.blocks)
    assert_close(fast, plain, 1e-12, "float64 fast vs plain")


# ------------------------------------------------------------------ the ops
KV_CASES = {
    # name: (batch, Tq, heads, dim, prompt batch, M)
    "shared-prompts": (3, 17, 2, 32, 1, 5),
    "one-prompt": (2, 18, 2, 64, 1, 1),
    "per-sample-prompts": (2, 9, 1, 80, 2, 20),  # two prompt key blocks, D padded
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(KV_CASES))
def test_prompt_kv_attention_matches_reference(case, dtype):
    batch, tq, heads, dim, prompt_batch, m = KV_CASES[case]
    g = gen(len(case))
    base = [torch.randn(batch, tq, heads, dim, generator=g, dtype=torch.float64) for _ in range(3)]
    base += [torch.randn(prompt_batch, m, heads, dim, generator=g, dtype=torch.float64) for _ in range(2)]
    check("prompt_kv_attention", lambda: base, (dim ** -0.5,), dtype)


def test_prompt_kv_attention_reads_strided_views():
    # q/k/v as the model passes them: views of one [B, T, 3, H, D] projection
    g = gen(3)
    qkv = torch.randn(2, 11, 3, 2, 32, generator=g).to(DEVICE)
    pkv = torch.randn(1, 4, 2, 2, 32, generator=g).to(DEVICE)
    q, k, v = qkv.unbind(2)
    pk, pv = pkv.unbind(2)
    out = triton_backend.prompt_kv_attention(q, k, v, pk, pv, 0.2)
    want = reference.prompt_kv_attention(*(t.double() for t in (q, k, v, pk, pv)), 0.2)
    assert rel_err(out, want) < 1e-5


CA_CASES = {
    # name: (leading shape, width, heads, M, with b_logits, with bias, residual: None / "x" / "other")
    "residual-is-x": ((2, 9), 48, 4, 3, True, True, "x"),
    "other-residual": ((2, 9), 64, 2, 5, True, True, "other"),
    "no-residual-no-biases": ((3, 7), 40, 2, 7, False, False, None),
    "one-prompt-one-head": ((1, 20), 32, 1, 1, True, False, "x"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CA_CASES))
def test_folded_cross_attention_matches_reference(monkeypatch, case, dtype):
    lead, width, heads, m, with_bl, with_bias, residual = CA_CASES[case]
    g = gen(width + m)
    x = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    w_logits = torch.randn(heads, m, width, generator=g, dtype=torch.float64) / width ** 0.25
    b_logits = torch.randn(heads, m, generator=g, dtype=torch.float64)
    w_values = torch.randn(heads, m, width, generator=g, dtype=torch.float64)
    bias = torch.randn(width, generator=g, dtype=torch.float64)
    other = torch.randn(*lead, width, generator=g, dtype=torch.float64)
    keep = [True, True, with_bl, True, with_bias, residual == "other"]

    class Case:  # the op with this case's optional arguments, as check() calls ops by name
        def __init__(self, module):
            self.module = module

        def folded_cross_attention(self, *tensors):
            it = iter(tensors)
            args = [next(it) if k else None for k in keep]
            if residual == "x":
                args[5] = args[0]
            return self.module.folded_cross_attention(*args)

    import test_triton_ops
    monkeypatch.setattr(test_triton_ops, "reference", Case(reference))
    monkeypatch.setattr(test_triton_ops, "triton_backend", Case(triton_backend))
    base = [t for t, k in zip([x, w_logits, b_logits, w_values, bias, other], keep) if k]
    check("folded_cross_attention", lambda: base, (), dtype)


@pytest.mark.parametrize("heads,num_prompts,fused", [(4, 32, True), (3, 43, False)])
def test_wide_folds_run_as_gemms_and_softmax(monkeypatch, heads, num_prompts, fused):
    """Up to 128 logit columns the fused kernels run; wider, the cuBLAS composition (reference)."""
    calls = []
    real = reference.folded_cross_attention
    monkeypatch.setattr(reference, "folded_cross_attention", lambda *a: calls.append(1) or real(*a))
    g = gen(heads)
    x = torch.randn(1, 2, 32, generator=g).requires_grad_()
    w_logits, w_values = (torch.randn(heads, num_prompts, 32, generator=g) / 8 for _ in range(2))
    out = triton_backend.folded_cross_attention(x, w_logits, None, w_values, None, x)
    out.sum().backward()
    assert len(calls) == (0 if fused else 1)
    assert rel_err(out, real(x.double(), w_logits.double(), None, w_values.double(), None, x.double())) < 1e-5


def test_folded_cross_attention_follows_autocast_like_linear():
    # Under autocast the eager op's products run in the autocast dtype (F.linear); the Triton op
    # must too, and, with an fp32 residual, return fp32 like ``h + ca``.
    g = gen(1)
    x, other = (torch.randn(2, 5, 32, generator=g, dtype=torch.float64) for _ in range(2))
    w_logits, w_values = (torch.randn(2, 3, 32, generator=g, dtype=torch.float64) for _ in range(2))
    for residual in (None, other):
        want = reference.folded_cross_attention(x, w_logits.half().double(), None, w_values.half().double(),
                                                None, residual)
        with torch.autocast(DEVICE, dtype=torch.float16):
            args = (x.float().to(DEVICE), w_logits.float().to(DEVICE), None, w_values.float().to(DEVICE), None,
                    None if residual is None else residual.float().to(DEVICE))
            eager = reference.folded_cross_attention(*args)
            got = triton_backend.folded_cross_attention(*args)
        assert got.dtype == eager.dtype == (torch.float16 if residual is None else torch.float32)
        assert rel_err(got, want) <= 2 * rel_err(eager, want) + 2e-3


# ------------------------------------------------------------------ whole models, Triton
MODEL_CASES = [
    ("dinov2", "vpt-deep", {}),               # registers + layer scale
    ("deit", "vpt-deep", {}),                 # two prefix tokens, two heads
    ("dinov2", "cvpt", {}),                   # position 3: residual = the kernel's own input
    ("vit", "cvpt", {"cvpt_position": 2}),    # separate residual
    ("vit", "cvpt", {"cvpt_position": 4}),    # residual = LN2(h)
]


@pytest.mark.parametrize("backbone,method,options", MODEL_CASES,
                         ids=[f"{b}-{m}-{'-'.join(map(str, o.values())) or 'default'}" for b, m, o in MODEL_CASES])
def test_fast_path_model_matches_plain_and_reference(spy, backbone, method, options):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = prompted(backbone, method, **options)
    images = make_images(2, seed=3).to(DEVICE)
    want = logits_and_grads(copy.deepcopy(model).double(), images.double(), "eager")
    plain = logits_and_grads(model, images, "eager")  # the same method's plain path, fp32
    fast = logits_and_grads(model, images, "triton")
    assert spy.get(FAST_OP[method]) == len(model.blocks)
    assert_close(fast, want, 1e-4, "fast vs float64")
    assert_close(fast, plain, 1e-4, "fast vs plain fp32")
    assert_close(plain, want, 1e-4, "plain vs float64")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_cvpt_falls_back_with_q_norm(monkeypatch, backend):
    spy, device = backend_spy(monkeypatch, backend)
    model = prompted("qknorm", "cvpt", device=device)
    images = make_images(2, seed=4).to(device)
    want = logits_and_grads(copy.deepcopy(model).double(), images.double(), "eager")
    with pytest.warns(RuntimeWarning, match="q_norm") as record:
        got = logits_and_grads(model, images, backend)
        logits_and_grads(model, images, backend)
    assert len([w for w in record if "fast path" in str(w.message)]) == 1  # once, not per block or step
    assert "folded_cross_attention" not in spy
    assert_close(got, want, 1e-4, f"qknorm cvpt plain ({backend}) vs float64")


def test_vpt_deep_fast_path_with_qk_norm_model(spy):
    # k_norm / q_norm act per token in self-attention: the KV-only path stays exact
    model = prompted("qknorm", "vpt-deep")
    images = make_images(2, seed=5).to(DEVICE)
    want = logits_and_grads(copy.deepcopy(model).double(), images.double(), "eager")
    got = logits_and_grads(model, images, "triton")
    assert spy.get("prompt_kv_attention") == len(model.blocks)
    assert_close(got, want, 1e-4, "qknorm vpt-deep fast vs float64")


@pytest.mark.parametrize("backend", ["triton", "cpp"])
@pytest.mark.parametrize("method", ["vpt-deep", "cvpt"])
def test_prompt_dropout_in_training_falls_back_once(monkeypatch, backend, method):
    spy, device = backend_spy(monkeypatch, backend)
    model = prompted("vit", method, prompt_dropout=0.5, device=device).train()
    images = make_images(2, seed=6).to(device)
    with svpt.backend(backend), pytest.warns(RuntimeWarning, match="prompt dropout") as record:
        model(images)
        model(images)
    assert len([w for w in record if "fast path" in str(w.message)]) == 1
    assert FAST_OP[method] not in spy
    # eval: dropout is off, prompts are shared again -> fast path, no warning, same as eager
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = logits_and_grads(model, images, backend)
    assert spy.get(FAST_OP[method]) == len(model.blocks)
    want = logits_and_grads(copy.deepcopy(model).double(), images.double(), "eager")
    assert_close(got, want, 1e-4, f"eval with dropout ({backend})")


def test_triton_lists_both_fast_paths():
    assert triton_backend.FAST_PATHS == ("prompt_kv_attention", "folded_cross_attention")


def test_fast_paths_off_and_eager_backend_run_the_plain_path_silently(spy):
    model = prompted("vit", "vpt-deep", prompt_dropout=0.5).train()
    images = make_images(2, seed=8).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with svpt.backend("eager"):
            model(images)
        with svpt.backend("triton"), svpt.backends.fast_paths(False):
            model.eval()(images)
    assert not spy
    assert svpt.ops.fast_path("prompt_kv_attention", torch.device(DEVICE)) is False  # eager default
    with svpt.backend("triton"):
        assert svpt.ops.fast_path("prompt_kv_attention", torch.device(DEVICE))
        assert svpt.ops.fast_path("folded_cross_attention", torch.device(DEVICE))
        with svpt.backends.fast_paths(False):
            assert not svpt.ops.fast_path("folded_cross_attention", torch.device(DEVICE))


@pytest.mark.parametrize("heads,width,most_prompts", [(12, 768, 23), (6, 384, 25), (4, 48, 5), (1, 48, 10 ** 6)])
def test_fold_pays_up_to_half_the_training_step_break_even(heads, width, most_prompts):
    """ViT-B/16 folds up to M = 23, ViT-S/16 up to 25; a single head always pays (no extra columns)."""
    from svpt.methods.cvpt import fold_pays
    block = torch.nn.Module()
    block.attn = torch.nn.Module()
    block.attn.num_heads, block.attn.qkv = heads, torch.nn.Linear(width, 3 * width, device="meta")
    assert fold_pays(block, most_prompts) and (heads == 1 or not fold_pays(block, most_prompts + 1))


def test_cvpt_keeps_the_plain_path_where_the_fold_costs_more(spy):
    # 3 (H - 1) M >= d: the fold (with its weight gradients) would not pay
    model = prompted("vit", "cvpt", num_prompts=16)  # width 48, 4 heads: 3 * 3 * 16 = 144 >= 48
    with svpt.backend("triton"):
        model(make_images(1, seed=9).to(DEVICE))
    assert "folded_cross_attention" not in spy


@pytest.mark.parametrize("method", ["vpt-deep", "cvpt"])
def test_fast_paths_compile_fullgraph(method):
    model = prompted("vit", method)
    model.blocks = model.blocks[:1]
    images = make_images(2, seed=10).to(DEVICE)
    with svpt.backend("triton"):
        expected = model(images)
        compiled = torch.compile(model, backend="aot_eager" if DEVICE == "cpu" else "inductor", fullgraph=True)
        got = compiled(images)
        got.sum().backward()
    assert rel_err(got.detach(), expected.detach()) < 1e-5
    assert model.prompter.prompts.grad.abs().max() > 0


# ------------------------------------------------------------------ whole models, cpp (CPU kernels)
@pytest.fixture
def cpp_spy(monkeypatch):
    """Counts the calls of the C++ backend's fast-path ops, with the FAST_PATHS it ships (CPU)."""
    return backend_spy(monkeypatch, "cpp")[0]


CPP_MODEL_CASES = MODEL_CASES + [
    ("qknorm", "vpt-deep", {}),               # q/k norms act per token: the KV-only path stays exact
    ("vit", "cvpt", {"cvpt_position": 1}),    # before SA
    ("deit", "cvpt", {"cvpt_position": 5}),   # after the MLP, two prefix tokens
]


@pytest.mark.parametrize("backbone,method,options", CPP_MODEL_CASES,
                         ids=[f"{b}-{m}-{'-'.join(map(str, o.values())) or 'default'}" for b, m, o in CPP_MODEL_CASES])
def test_cpp_fast_path_model_matches_plain_and_reference(cpp_spy, backbone, method, options):
    model = prompted(backbone, method, device="cpu", **options)
    images = make_images(2, seed=3)
    want = logits_and_grads(copy.deepcopy(model).double(), images.double(), "eager")
    plain = logits_and_grads(model, images, "cpp", fast=False)
    assert not cpp_spy
    fast = logits_and_grads(model, images, "cpp")
    assert cpp_spy.get(FAST_OP[method]) == len(model.blocks)
    assert_close(fast, want, 1e-4, "cpp fast vs float64")
    assert_close(fast, plain, 1e-4, "cpp fast vs cpp plain fp32")
    assert_close(plain, want, 1e-4, "cpp plain vs float64")


@pytest.mark.parametrize("method,options", [("vpt-deep", {}), ("cvpt", {}), ("cvpt", {"cvpt_position": 4})])
def test_cpp_fast_path_equals_plain_path_in_float64(cpp_spy, method, options):
    # The C++ CPU kernels compute float64: the rewrite is exact up to rounding there too.
    model = prompted("dinov2", method, 4, device="cpu", **options).double()
    images = make_images(2, seed=11).double()
    plain = logits_and_grads(model, images, "cpp", fast=False)
    fast = logits_and_grads(model, images, "cpp")
    assert cpp_spy.get(FAST_OP[method]) == len(model.blocks)
    assert_close(fast, plain, 1e-12, "cpp float64 fast vs plain")


def test_cpp_fast_paths_off_and_fold_that_costs_more_run_the_plain_path(cpp_spy):
    images = make_images(1, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with svpt.backend("cpp"), svpt.backends.fast_paths(False):
            prompted("vit", "vpt-deep", device="cpu")(images)
            prompted("vit", "cvpt", device="cpu")(images)
        with svpt.backend("cpp"):  # 3 (H - 1) M >= d: the fold would not pay
            prompted("vit", "cvpt", num_prompts=16, device="cpu")(images)
    assert not cpp_spy


def test_fast_paths_per_device_type(monkeypatch):
    """A backend's FAST_PATHS may be a dict {device type: ops}: the cpp backend lists its fast
    paths for CPU only; a device type missing from the dict has none."""
    cpp = cpp_module()
    cpu = torch.device("cpu")
    with svpt.backend("cpp"):
        assert svpt.ops.fast_path("prompt_kv_attention", cpu) and svpt.ops.fast_path("folded_cross_attention", cpu)
        with svpt.backends.fast_paths(False):
            assert not svpt.ops.fast_path("prompt_kv_attention", cpu)
        monkeypatch.setattr(cpp, "FAST_PATHS", {"cuda": ("prompt_kv_attention",)})
        assert not svpt.ops.fast_path("prompt_kv_attention", cpu)
        monkeypatch.setattr(cpp, "FAST_PATHS", ("folded_cross_attention",))  # a tuple: every device type
        assert svpt.ops.fast_path("folded_cross_attention", cpu)
        assert not svpt.ops.fast_path("prompt_kv_attention", cpu)
