"""Property tests: every backend agrees with float64 on every shape (hypothesis).

Each op of svpt.backends.OPS, and small whole prompted models, run on every selectable backend
other than eager, on shapes, dtypes, memory layouts and method options drawn by hypothesis, in the
dtypes the backend declares for the op on the device (a dtype it hands over would test eager, not
it), against the float64 reference on the same rounded inputs with METHOD.md's bounds
(opcheck.check, numerics.bound): fp32 <= 1e-4, float64 <= 1e-10, fp16/bf16 <= 2x eager's error in
the same dtype (plus FlashAttention's D term for the attention backward, numerics.flash_delta_moves).
Every example asserts, by svpt.backends.trace(), that the backend ran what it declares.

Inputs come in several memory layouts (opcheck.laid_out: padded rows, every other element,
permuted); the buffers of the in-place ops in the ones the kernels write in place (contiguous or
padded rows). On CPU the Triton kernels run in the interpreter (tests/conftest.py), which is slow,
so Triton draws smaller shapes there (M <= 7, T <= ~32); tests/gpu/test_properties_gpu.py runs the
same properties on the GPU with the full ranges.

Run size: the hypothesis profile ``SVPT_HYPOTHESIS_PROFILE`` (``ci``, the default: few examples,
derandomized so every run checks the same cases; ``long``: many random examples; ``dev``: one
example per test).
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer

import svpt
from svpt import backends

import opcheck
from backbones import randomize_
from numerics import bound, rel_err
from opcheck import LAYOUTS, Case, flash_floors, randn

settings.register_profile("ci", max_examples=1, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("dev", max_examples=1, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
PROFILE = os.environ.get("SVPT_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long", "dev"):
    raise ValueError(f"SVPT_HYPOTHESIS_PROFILE={PROFILE!r} is not accepted; accepted: ci, long, dev")
settings.load_profile(PROFILE)
SCALE = {"ci": 1, "long": 25, "dev": 0}[PROFILE]


def examples(n: int):
    """``n`` examples per test in the ci profile (x25 in long, 1 in dev)."""
    return settings(max_examples=max(1, n * SCALE))


BACKENDS = [name for name in opcheck.BACKENDS if name != "eager"]
HEAD_DIMS = [24, 32, 64, 80]
WIDTHS = [24, 40, 48, 64, 160]
FLOORS = {"prompt_attention": flash_floors("q", [("k", "v")]),
          "prompt_kv_attention": flash_floors("q", [("prompt_k", "prompt_v"), ("k", "v")])}


def own_dtypes(name: str, op: str, device: str) -> list[torch.dtype]:
    """The dtypes backend ``name`` computes ``op`` in itself on ``device`` (its declarations)."""
    return [opcheck.DTYPES[row["dtype"]] for row in opcheck.declared(op)
            if (row["backend"], row["device"]) == (name, device) and row["runs"] == name]


def op_rows(device: str = "cpu") -> list:
    return [pytest.param(name, op, id=f"{name}-{op}") for name in BACKENDS for op in backends.OPS
            if own_dtypes(name, op, device)]


def small(name: str, device: str) -> bool:
    """Triton on CPU runs in the interpreter: small shapes."""
    return name == "triton" and device == "cpu"


# ---------------------------------------------------------------- strategies: (Case, dtype)
def num_prompts(name: str, device: str):
    few = st.sampled_from([1, 2, 3, 5, 7])
    return few if small(name, device) else st.one_of(few, st.sampled_from([13, 31, 50, 64, 100, 127, 128]))


@st.composite
def common(draw, name: str, op: str, device: str):
    """dtype (one the backend declares), a layout for the inputs and one for a buffer, a seed."""
    dtype = draw(st.sampled_from(own_dtypes(name, op, device)))
    return (dtype, draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(["contiguous", "padded"])),
            torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1))))


@st.composite
def da_mix_case(draw, name, device):
    dtype, layout, buffer_layout, gen = draw(common(name, "da_mix", device))
    batch, m = draw(st.integers(1, 3)), draw(num_prompts(name, device))
    prefix, patches, width = draw(st.sampled_from([0, 1, 5])), draw(st.integers(1, 9)), draw(st.sampled_from(WIDTHS))
    prompt_batch = batch if draw(st.booleans()) else 1  # per-sample prompts: prompt dropout
    bias = draw(st.sampled_from([-2.0, 0.4, -math.inf]))
    rows = (prefix, prefix + m)
    case = Case("da_mix", {"tokens": randn(gen, batch, prefix + m + patches, width),
                           "prompts": randn(gen, prompt_batch, m, width),
                           "weight": randn(gen, 2, width, std=width ** -0.5),
                           "bias": torch.tensor(bias, dtype=torch.float64)},
                (prefix,), grads=("tokens", "prompts", "weight", "bias"), buffer="tokens",
                rows={"out": rows, "tokens": rows},
                layouts={"tokens": buffer_layout, "prompts": layout, "weight": layout})
    return case, dtype


@st.composite
def ae_update_case(draw, name, device):
    dtype, _, buffer_layout, gen = draw(common(name, "ae_update", device))
    batch, m = draw(st.integers(1, 3)), draw(num_prompts(name, device))
    prefix, patches, width = draw(st.sampled_from([0, 1, 5])), draw(st.integers(1, 25)), draw(st.sampled_from(WIDTHS))
    k = max(1, round(draw(st.sampled_from([0.1, 0.25, 0.5, 1.0])) * patches))
    first_patch = prefix + m
    case = Case("ae_update", {"h": randn(gen, batch, first_patch + patches, width),
                              "saliency": torch.rand(batch, patches, generator=gen, dtype=torch.float64).float(),
                              "scale": torch.tensor(draw(st.sampled_from([0.7, -1.3])), dtype=torch.float64)},
                (prefix, m, k), grads=("h", "scale"), own_dtype=("saliency",), buffer="h",
                rows={"out": (first_patch, first_patch + patches), "h": (prefix, first_patch)},
                layouts={"h": buffer_layout})
    return case, dtype


@st.composite
def attention_shape(draw, name, device):
    """(batch, heads, head dim, num_prefix, M, patches) of a prompted sequence."""
    heads = draw(st.integers(1, 2 if small(name, device) else 4))
    return (draw(st.integers(1, 3)), heads, draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from([0, 1, 5])),
            draw(num_prompts(name, device)), draw(st.integers(1, 9 if small(name, device) else 25)))


@st.composite
def prompt_attention_case(draw, name, device):
    dtype, layout, _, gen = draw(common(name, "prompt_attention", device))
    batch, heads, dim, prefix, m, patches = draw(attention_shape(name, device))
    cvpt = draw(st.booleans())  # CVPT: the image tokens attend to the M prompts (batch 1)
    queries = prefix + patches if cvpt else prefix + m + patches
    keys, key_batch = (m, 1) if cvpt else (queries, batch)
    case = Case("prompt_attention", {"q": randn(gen, batch, queries, heads, dim),
                                     "k": randn(gen, key_batch, keys, heads, dim),
                                     "v": randn(gen, key_batch, keys, heads, dim)},
                (dim ** -0.5,), grads=("q", "k", "v"), layouts=dict.fromkeys("qkv", layout))
    return case, dtype


@st.composite
def attention_saliency_case(draw, name, device):
    dtype, layout, _, gen = draw(common(name, "attention_saliency", device))
    batch, heads, dim, prefix, m, patches = draw(attention_shape(name, device))
    source = draw(st.sampled_from(["cls", "prompt"] if prefix else ["prompt"]))
    tokens = prefix + m + patches
    key_batch = draw(st.sampled_from([1, batch]))
    case = Case("attention_saliency", {"q": randn(gen, batch, tokens, heads, dim),
                                       "k": randn(gen, key_batch, tokens, heads, dim)},
                (dim ** -0.5, (0, 1) if source == "cls" else (prefix, m), prefix + m),
                layouts=dict.fromkeys("qk", layout))
    return case, dtype


@st.composite
def prompt_kv_attention_case(draw, name, device):
    dtype, layout, _, gen = draw(common(name, "prompt_kv_attention", device))
    batch, heads, dim, _, m, _ = draw(attention_shape(name, device))
    tokens = draw(st.integers(1, 12 if small(name, device) else 30))
    prompt_batch = 1 if draw(st.booleans()) else batch
    names = ("q", "k", "v", "prompt_k", "prompt_v")
    values = [randn(gen, batch, tokens, heads, dim) for _ in range(3)]
    values += [randn(gen, prompt_batch, m, heads, dim) for _ in range(2)]
    case = Case("prompt_kv_attention", dict(zip(names, values)), (dim ** -0.5,), grads=names,
                layouts=dict.fromkeys(names, layout))
    return case, dtype


@st.composite
def folded_cross_attention_case(draw, name, device):
    dtype, layout, _, gen = draw(common(name, "folded_cross_attention", device))
    m = draw(num_prompts(name, device))
    # up to 128 logit columns (H * M): the fused kernels' range; wider folds are a routing case
    # (tests/ops/test_folded_cross_attention.py)
    heads = draw(st.integers(1, max(1, min(2 if small(name, device) else 4, 128 // m))))
    lead, width = (draw(st.integers(1, 3)), draw(st.integers(1, 12 if small(name, device) else 30))), \
        draw(st.sampled_from(WIDTHS))
    residual = draw(st.sampled_from(["none", "x", "other"]))
    values = {"x": randn(gen, *lead, width), "w_logits": randn(gen, heads, m, width, std=width ** -0.5),
              "b_logits": randn(gen, heads, m, std=0.3) if draw(st.booleans()) else None,
              "w_values": randn(gen, heads, m, width, std=0.5),
              "bias": randn(gen, width, std=0.2) if draw(st.booleans()) else None,
              "residual": randn(gen, *lead, width) if residual == "other" else None}
    case = Case("folded_cross_attention", values, grads=tuple(n for n, v in values.items() if v is not None),
                same={"residual": "x"} if residual == "x" else {}, layouts=dict.fromkeys(values, layout))
    return case, dtype


CASES = {"da_mix": da_mix_case, "prompt_attention": prompt_attention_case, "ae_update": ae_update_case,
         "attention_saliency": attention_saliency_case, "prompt_kv_attention": prompt_kv_attention_case,
         "folded_cross_attention": folded_cross_attention_case}
# Examples per (backend, op) in the ci profile; Triton's interpreter is the slow one.
BUDGET = {"triton": {"da_mix": 25, "prompt_attention": 20, "ae_update": 25, "attention_saliency": 20,
                     "prompt_kv_attention": 20, "folded_cross_attention": 25}}
DEFAULT_BUDGET = 60


def check_drawn(name: str, op: str, device: str, drawn: tuple[Case, torch.dtype]) -> None:
    case, dtype = drawn
    opcheck.check(case, name, device, dtype, floors=FLOORS.get(op), zeros=True)


# ---------------------------------------------------------------- op properties
@pytest.mark.parametrize("name,op", op_rows())
def test_op_matches_float64(name, op):
    @examples(BUDGET.get(name, {}).get(op, DEFAULT_BUDGET))
    @given(drawn=CASES[op](name, "cpu"))
    def prop(drawn):
        check_drawn(name, op, "cpu", drawn)

    prop()


# ---------------------------------------------------------------- whole models
METHOD_CASES = st.one_of(
    st.just(("vpt-shallow", {})),
    st.builds(lambda d: ("vpt-deep", {"prompt_dropout": d}), st.sampled_from([0.0, 0.0, 0.3])),
    st.builds(lambda src, ratio, layers, cdc: ("svpt", {"ae_source": src, "ae_ratio": ratio, "ae_layers": layers,
                                                        "cdc": cdc}),
              st.sampled_from(["cls", "prompt"]), st.sampled_from([0.1, 0.25, 0.5, 1.0]),
              st.sampled_from([None, (), (0,), (1,)]), st.booleans()),
    st.builds(lambda pos: ("cvpt", {"cvpt_position": pos}), st.integers(1, 5)),
)


def model_dtypes(name: str, device: str) -> list[torch.dtype]:
    """fp32 and float64, where the backend computes at least one op in it itself."""
    return [dtype for dtype in (torch.float32, torch.float64)
            if any(dtype in own_dtypes(name, op, device) for op in backends.OPS)]


@st.composite
def model_case(draw, name, device):
    method, options = draw(METHOD_CASES)
    prefix = draw(st.sampled_from([0, 1, 5]))
    if method == "svpt" and prefix == 0 and options["ae_source"] == "cls":
        options = {**options, "ae_source": "prompt"}
    backbone = dict(depth=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dim=draw(st.sampled_from(HEAD_DIMS)),
                    prefix=prefix, img=draw(st.sampled_from([16, 24])), qk_norm=draw(st.booleans()),
                    layer_scale=draw(st.booleans()))
    if method == "svpt" and options["ae_layers"] and max(options["ae_layers"]) >= backbone["depth"]:
        options = {**options, "ae_layers": None}
    m = draw(st.sampled_from([1, 2, 3, 5]) if small(name, device) else num_prompts(name, device))
    return (method, options, backbone, m, draw(st.integers(1, 3)), draw(st.sampled_from(model_dtypes(name, device))),
            draw(st.integers(0, 2 ** 31 - 1)))


def build_model(method, options, backbone, m, seed):
    width = backbone["heads"] * backbone["dim"]
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=backbone["img"], patch_size=8, embed_dim=width, depth=backbone["depth"],
                            num_heads=backbone["heads"], mlp_ratio=2.0, num_classes=3,
                            class_token=backbone["prefix"] > 0, reg_tokens=max(0, backbone["prefix"] - 1),
                            global_pool="token" if backbone["prefix"] else "avg", qk_norm=backbone["qk_norm"],
                            init_values=0.5 if backbone["layer_scale"] else None)
    randomize_(net, seed % 1000).eval()
    model = svpt.prompt(net, method, m, **options)
    with torch.no_grad():  # non-default DA/AE values, so that every gradient path carries signal
        gen = torch.Generator().manual_seed(seed)
        for pname, p in model.named_parameters():
            if p.requires_grad and pname.startswith(("prompter.da", "prompter.ae")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def logits_and_grads(model, images, backend, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # prompt dropout draws the same masks on every backend
    with svpt.backend(backend), backends.trace() as log:
        logits = model(images)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).reshape(logits.shape).to(logits)
    (logits * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, list(log)


@pytest.mark.filterwarnings("ignore:svpt vpt-deep. the prompt_kv_attention fast path does not apply")
@pytest.mark.parametrize("name", BACKENDS)
def test_model_matches_eager_float64(name):
    @examples({"triton": 15}.get(name, 40))
    @given(case=model_case(name, "cpu"))
    def prop(case):
        check_model_case(name, case)

    prop()


def check_model_case(name, case, device="cpu"):
    """Logits and every trainable gradient of the prompted model on backend ``name`` in the drawn
    dtype against the same model in float64 on eager (with the same prompt-dropout masks)."""
    method, options, backbone, m, batch, dtype, seed = case
    model = build_model(method, options, backbone, m, seed).to(device)
    model.train()  # prompt dropout (when drawn) is active: per-sample prompts, the plain path
    images = torch.randn(batch, 3, backbone["img"], backbone["img"], generator=torch.Generator().manual_seed(seed))
    images = images.to(device)
    want_logits, want_grads, _ = logits_and_grads(copy.deepcopy(model).double(), images.double(), "eager", seed)
    got_logits, got_grads, log = logits_and_grads(model.to(dtype), images.to(dtype), name, seed)
    opcheck.check_model_trace(name, device, dtype, log)
    assert got_logits.dtype == dtype and set(got_grads) == set(want_grads)
    errors = {"logits": rel_err(got_logits, want_logits)}
    errors.update({key: rel_err(grad, want_grads[key]) for key, grad in got_grads.items()})
    bad = {key: err for key, err in errors.items() if not err <= bound(dtype, None)}
    assert not bad, f"{method} {options} on {name} {dtype}: relative errors over {bound(dtype, None)}: {bad}"
