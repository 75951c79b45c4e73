"""Parity of the ``svpt`` package against the independent float64 reference
(tests/spec_model.py, written from /work/shared/METHOD.md only).

Run:  cd /work/main && PYTHONPATH=/work/main python -m pytest tests/test_spec_parity.py -q
CPU only, float64 (the prompted model is cast with ``.double()``), tiny backbones.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import svpt
from tests.backbones import BACKBONES, make_images, vit_with_dropout
from tests.spec_model import reference_copy, spec_forward

TOL = 1e-10
BACKBONE_NAMES = tuple(BACKBONES)  # vit, deit, dinov2, noclass, qknorm
M_VALUES = (1, 3, 7)
BATCH = 3
HEAD_KEYS = ("head.weight", "head.bias")
HEAD_DIST_KEYS = ("head_dist.weight", "head_dist.bias")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threading only costs time (restored after this module)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = b.norm().item()
    diff = (a - b).norm().item()
    if nb == 0.0:
        return diff  # absolute when the reference is exactly zero
    return diff / nb


def has_class_token(model) -> bool:
    return getattr(model, "cls_token", None) is not None


def build(backbone: str, method: str, M: int, num_classes=None, factory=None, double=True,
          **options):
    """(prompted package model, float64 reference copy of the unprompted backbone)."""
    bb = (factory or BACKBONES[backbone])()
    ref = reference_copy(bb)
    model = svpt.prompt(bb, method, M, num_classes=num_classes, **options)
    if double:
        model = model.double()
    return model, ref


def expected_shapes(ref, method: str, M: int, options: dict, num_classes=None) -> dict:
    L, d = len(ref.blocks), ref.embed_dim
    C = num_classes if num_classes is not None else ref.num_classes
    shapes = {"prompts": (1 if method == "vpt-shallow" else L, M, d),
              "head.weight": (C, d), "head.bias": (C,)}
    if getattr(ref, "dist_token", None) is not None:
        shapes.update({"head_dist.weight": (C, d), "head_dist.bias": (C,)})
    if method == "svpt":
        if options.get("cdc", True):
            shapes.update({"da.weight": (L - 1, 2, d), "da.bias": (L - 1,)})
        ae_layers = options.get("ae_layers", None)
        if ae_layers is None or len(tuple(ae_layers)) > 0:
            shapes["ae.scale"] = (L,)
    return shapes


@torch.no_grad()
def randomize_trainables(model, seed: int, keys=None):
    """Set every (or the listed) trainable tensor to random non-default values, in place."""
    g = torch.Generator().manual_seed(seed)
    sd = svpt.prompt_state_dict(model, keep_vars=True)
    for k in sorted(sd):
        if keys is not None and k not in keys:
            continue
        p = sd[k]
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if k == "prompts":
            v = r
        elif k == "da.weight":
            v = 0.3 * r
        elif k == "da.bias":
            v = r
        elif k == "ae.scale":
            v = 0.5 * r + 0.3
        elif k.endswith(".weight"):  # heads
            v = r / math.sqrt(p.shape[-1])
        else:
            v = 0.2 * r
        p.copy_(v.to(p.dtype))


def parity(model, ref, method: str, options: dict, images: torch.Tensor, seed: int = 0,
           train: bool = False, tol: float = TOL):
    """Compare logits and the gradient of every trainable tensor with the reference."""
    model.train(train)
    live = svpt.prompt_state_dict(model, keep_vars=True)
    leaves = {k: v.detach().clone().double().requires_grad_(True) for k, v in live.items()}
    for p in live.values():
        p.grad = None
    y = model(images.to(next(iter(live.values())).dtype))
    y_ref = spec_forward(ref, method, leaves, options, images.double())
    assert y.shape == y_ref.shape
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1000 + seed),
                    dtype=torch.float64)
    (y.double() * w).sum().backward()
    (y_ref * w).sum().backward()
    errs = {"logits": rel_err(y, y_ref)}
    for k in live:
        assert live[k].grad is not None, f"no gradient for trainable {k!r}"
        assert leaves[k].grad is not None, k
        errs["grad " + k] = rel_err(live[k].grad, leaves[k].grad)
    bad = {k: e for k, e in errs.items() if not (e < tol)}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errs})"
    return errs


# ----------------------------------------------------------------------------- cases
def _parity_cases():
    cases = []
    for bi, b in enumerate(BACKBONE_NAMES):
        for method in ("vpt-shallow", "vpt-deep"):
            for M in M_VALUES:
                nc = 7 if M == 3 else None
                cases.append(pytest.param(b, method, M, {}, nc, True,
                                          id=f"{method}-{b}-M{M}" + ("-nc7" if nc else "")))
        for pos in (1, 2, 3, 4, 5):
            M = M_VALUES[(pos + bi) % 3]
            nc = 7 if pos == 2 else None
            cases.append(pytest.param(b, "cvpt", M, {"cvpt_position": pos}, nc, True,
                                      id=f"cvpt-pos{pos}-{b}-M{M}" + ("-nc7" if nc else "")))
        cases.append(pytest.param(b, "cvpt", 3, {}, None, True, id=f"cvpt-default-{b}-M3"))
    return cases


SVPT_CONFIGS = [
    # (id, options, randomize da/ae/prompts/head)
    ("defaults-initvalues", {}, False),
    ("defaults-random", {}, True),
    ("cls-r0.25", dict(ae_source="cls", ae_ratio=0.25), True),
    ("prompt-r0.1", dict(ae_source="prompt", ae_ratio=0.1), True),
    ("cls-r0.5-layers02", dict(ae_source="cls", ae_ratio=0.5, ae_layers=(0, 2)), True),
    ("prompt-r1.0", dict(ae_source="prompt", ae_ratio=1.0), True),
    ("cls-r0.15625-k2", dict(ae_source="cls", ae_ratio=0.15625), True),  # round(2.5) == 2
    ("prompt-r0.40625-k6", dict(ae_source="prompt", ae_ratio=0.40625), True),  # round(6.5)==6
    ("prompt-r0.01-k1", dict(ae_source="prompt", ae_ratio=0.01), True),  # max(1, 0) == 1
    ("prompt-layers1", dict(ae_source="prompt", ae_layers=[1]), True),
    ("cls-layers2", dict(ae_source="cls", ae_layers=(2,)), True),
    ("nocdc-cls", dict(cdc=False), True),
    ("nocdc-prompt-r0.5", dict(cdc=False, ae_source="prompt", ae_ratio=0.5), True),
    ("noae-cls", dict(ae_layers=()), True),
    ("noae-prompt", dict(ae_layers=(), ae_source="prompt"), True),
    ("noae-nocdc", dict(ae_layers=(), cdc=False, ae_source="prompt"), True),
]


def _svpt_cases():
    cases = []
    for bi, b in enumerate(BACKBONE_NAMES):
        for ci, (cid, opts, rnd) in enumerate(SVPT_CONFIGS):
            M = M_VALUES[(ci + bi) % 3]
            if b == "noclass" and opts.get("ae_source", "cls") == "cls":
                # AE from the class token: covered by
                # test_svpt_cls_source_without_class_token_raises (with AE off, i.e.
                # ae_layers=(), METHOD.md does not say whether 'cls' must raise).
                continue
            nc = 7 if ci % 5 == 1 else None
            cases.append(pytest.param(b, opts, rnd, M, nc,
                                      id=f"svpt-{cid}-{b}-M{M}" + ("-nc7" if nc else "")))
    return cases


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("backbone,method,M,options,num_classes,rnd", _parity_cases())
def test_parity_vpt_cvpt(backbone, method, M, options, num_classes, rnd):
    model, ref = build(backbone, method, M, num_classes=num_classes, **options)
    sd = svpt.prompt_state_dict(model)
    shapes = expected_shapes(ref, method, M, options, num_classes)
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    if rnd:
        randomize_trainables(model, seed=M)
    parity(model, ref, method, options, make_images(BATCH, seed=M))


@pytest.mark.parametrize("backbone,options,rnd,M,num_classes", _svpt_cases())
def test_parity_svpt(backbone, options, rnd, M, num_classes):
    model, ref = build(backbone, "svpt", M, num_classes=num_classes, **options)
    sd = svpt.prompt_state_dict(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(
        ref, "svpt", M, options, num_classes)
    if rnd:
        randomize_trainables(model, seed=10 + M)
    parity(model, ref, "svpt", options, make_images(BATCH, seed=M))


@pytest.mark.parametrize("options", [{}, dict(ae_source="cls"), dict(ae_source="cls", cdc=False),
                                     dict(ae_source="cls", ae_layers=(1,))],
                         ids=["default", "cls", "cls-nocdc", "cls-layers1"])
def test_svpt_cls_source_without_class_token_raises(options):
    bb = BACKBONES["noclass"]()
    with pytest.raises(ValueError):
        svpt.prompt(bb, "svpt", 3, **options)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "svpt", "cvpt"])
def test_default_values(backbone, method):
    opts = dict(ae_source="prompt") if (method == "svpt" and backbone == "noclass") else {}
    model, ref = build(backbone, method, 7, double=False, **opts)
    sd = svpt.prompt_state_dict(model)
    p = ref.patch_embed.patch_size
    p = p[0] if isinstance(p, (tuple, list)) else p
    bound = math.sqrt(6.0 / (3 * p * p + ref.embed_dim))
    P = sd["prompts"]
    assert P.abs().max().item() <= bound + 1e-7
    assert P.abs().max().item() > 0.5 * bound  # uniform over the whole range, not tiny
    assert P.std().item() > 0.3 * bound
    if method == "svpt":
        assert torch.all(sd["da.weight"] == 0)
        assert torch.all(sd["da.bias"] == -2.0)
        assert torch.all(sd["ae.scale"] == 0)


@pytest.mark.parametrize("backbone", ["vit", "dinov2"])
def test_svpt_init_options(backbone):
    """da_init_bias / ae_init set the initial da.bias / ae.scale; the result matches the reference."""
    opts = dict(da_init_bias=-1.5, ae_init=0.25, ae_source="prompt", ae_ratio=0.5)
    model, ref = build(backbone, "svpt", 3, **opts)
    sd = svpt.prompt_state_dict(model)
    assert torch.all(sd["da.weight"] == 0)
    assert torch.all(sd["da.bias"] == -1.5)
    assert torch.all(sd["ae.scale"] == 0.25)
    parity(model, ref, "svpt", opts, make_images(BATCH, seed=11))


# ----------------------------------------------------------------------------- reductions
def _copy_shared(src, dst):
    """Copy prompts + heads of model ``src`` into ``dst`` (strict load of dst's keys)."""
    s = svpt.prompt_state_dict(src)
    d = svpt.prompt_state_dict(dst)
    svpt.load_prompt_state_dict(dst, {k: s[k].clone() for k in d})


def _logits_and_grads(model, images, keys, seed=0):
    model.eval()
    live = svpt.prompt_state_dict(model, keep_vars=True)
    for p in live.values():
        p.grad = None
    y = model(images)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * w).sum().backward()
    return y.detach(), {k: live[k].grad for k in keys}, live


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_svpt_no_cdc_no_ae_is_vpt_deep(backbone):
    M = 3
    a, ref = build(backbone, "svpt", M, cdc=False, ae_layers=(), ae_source="prompt")
    b, _ = build(backbone, "vpt-deep", M)
    randomize_trainables(a, seed=3)
    assert set(svpt.prompt_state_dict(a)) == set(svpt.prompt_state_dict(b))
    _copy_shared(a, b)
    x = make_images(BATCH, seed=5).double()
    keys = list(svpt.prompt_state_dict(b))
    ya, ga, _ = _logits_and_grads(a, x, keys)
    yb, gb, _ = _logits_and_grads(b, x, keys)
    assert rel_err(ya, yb) < TOL
    for k in keys:
        assert rel_err(ga[k], gb[k]) < TOL, k


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_svpt_neg_inf_bias_zero_scale_is_vpt_deep(backbone):
    M = 7
    opts = dict(ae_source="prompt") if backbone == "noclass" else {}
    a, ref = build(backbone, "svpt", M, **opts)
    b, _ = build(backbone, "vpt-deep", M)
    randomize_trainables(a, seed=4)
    live = svpt.prompt_state_dict(a, keep_vars=True)
    with torch.no_grad():
        live["da.bias"].fill_(-math.inf)
        live["ae.scale"].zero_()
    _copy_shared(a, b)
    x = make_images(BATCH, seed=6).double()
    keys = list(svpt.prompt_state_dict(b))
    ya, ga, la = _logits_and_grads(a, x, keys)
    yb, gb, _ = _logits_and_grads(b, x, keys)
    assert torch.isfinite(ya).all()
    assert rel_err(ya, yb) < TOL
    for k in keys:
        assert rel_err(ga[k], gb[k]) < TOL, k
    # the gate is exactly 0 and saturated: its gradients are exactly zero (and finite)
    assert torch.all(la["da.weight"].grad == 0)
    assert torch.all(la["da.bias"].grad == 0)
    assert torch.isfinite(la["ae.scale"].grad).all()


def test_spec_reductions_selfcheck():
    """The reference itself satisfies the ablation identities (sanity of the ground truth)."""
    bb = reference_copy(BACKBONES["dinov2"]())
    L, d, M = len(bb.blocks), bb.embed_dim, 3
    g = torch.Generator().manual_seed(0)
    sd = {"prompts": torch.randn(L, M, d, generator=g, dtype=torch.float64),
          "da.weight": torch.randn(L - 1, 2, d, generator=g, dtype=torch.float64),
          "da.bias": torch.full((L - 1,), -math.inf, dtype=torch.float64),
          "ae.scale": torch.zeros(L, dtype=torch.float64),
          "head.weight": bb.head.weight, "head.bias": bb.head.bias}
    x = make_images(2).double()
    deep = spec_forward(bb, "vpt-deep", sd, {}, x)
    assert rel_err(spec_forward(bb, "svpt", sd, {}, x), deep) < 1e-14
    assert rel_err(spec_forward(bb, "svpt", sd, dict(cdc=False, ae_layers=()), x), deep) < 1e-14
    assert torch.equal(bb(x), spec_forward(bb, "none", {"head.weight": bb.head.weight,
                                                        "head.bias": bb.head.bias}, {}, x)) or \
        rel_err(bb(x), spec_forward(bb, "none", {"head.weight": bb.head.weight,
                                                 "head.bias": bb.head.bias}, {}, x)) < 1e-12


# ----------------------------------------------------------------------------- prompt dropout
METHOD_OPTS = [
    pytest.param("vpt-shallow", {}, id="vpt-shallow"),
    pytest.param("vpt-deep", {}, id="vpt-deep"),
    pytest.param("svpt", {}, id="svpt"),
    pytest.param("svpt", dict(ae_source="prompt", ae_ratio=0.5), id="svpt-prompt"),
    pytest.param("cvpt", {}, id="cvpt"),
    pytest.param("cvpt", dict(cvpt_position=4), id="cvpt-pos4"),
]


@pytest.mark.parametrize("method,options", METHOD_OPTS)
def test_prompt_dropout_eval_is_identity(method, options):
    M = 7
    a, ref = build("dinov2", method, M, prompt_dropout=0.5, **options)
    b, _ = build("dinov2", method, M, prompt_dropout=0.0, **options)
    randomize_trainables(a, seed=2)
    _copy_shared(a, b)
    x = make_images(BATCH, seed=2).double()
    a.eval()
    b.eval()
    with torch.no_grad():
        assert rel_err(a(x), b(x)) < 1e-13
    # and both equal the reference
    parity(a, ref, method, options, x)


@pytest.mark.parametrize("method,options", METHOD_OPTS)
def test_prompt_dropout_train_is_stochastic_per_sample(method, options):
    M = 7
    model, ref = build("vit", method, M, prompt_dropout=0.5, **options)
    randomize_trainables(model, seed=3)
    x1 = make_images(1, seed=3).double()
    x = torch.cat([x1, x1], dim=0)  # two identical images
    model.eval()
    with torch.no_grad():
        y_eval = model(x)
    assert rel_err(y_eval[0], y_eval[1]) < 1e-14
    model.train()
    torch.manual_seed(0)
    y = model(x)
    assert (y[0] - y[1]).abs().max().item() > 1e-6, "prompt dropout is not per-sample"
    assert (y - y_eval).abs().max().item() > 1e-6, "prompt dropout inactive in train mode"
    # gradients flow to the prompts in train mode
    y.sum().backward()
    g = svpt.prompt_state_dict(model, keep_vars=True)["prompts"].grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # eval afterwards is deterministic again
    model.eval()
    with torch.no_grad():
        assert rel_err(model(x), y_eval) < 1e-14


@pytest.mark.parametrize("method,options", METHOD_OPTS)
def test_train_mode_backbone_stays_eval(method, options):
    """Backbone with non-zero dropout / attn-dropout / drop-path rates: in train mode with
    prompt_dropout=0 the prompted model must still equal the eval-mode reference."""
    M = 3
    bb = vit_with_dropout()
    ref = reference_copy(bb)
    drop_mods = [(n, m) for n, m in bb.named_modules()
                 if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath"]
    assert len(drop_mods) > 5 and all(getattr(m, "p", getattr(m, "drop_prob", 0)) > 0
                                      for _, m in drop_mods)
    model = svpt.prompt(bb, method, M, prompt_dropout=0.0, **options).double()
    randomize_trainables(model, seed=4)
    x = make_images(BATCH, seed=4)
    torch.manual_seed(0)
    parity(model, ref, method, options, x, train=True)
    assert model.training
    # the backbone's own dropout / drop-path modules are not in training mode
    assert not [n for n, m in drop_mods if m.training]


# ----------------------------------------------------------------------------- trainability
@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
@pytest.mark.parametrize("method,options,nc", [
    pytest.param("vpt-shallow", {}, None, id="vpt-shallow"),
    pytest.param("vpt-deep", {}, 7, id="vpt-deep-nc7"),
    pytest.param("svpt", dict(ae_source="prompt"), None, id="svpt"),
    pytest.param("svpt", dict(ae_source="prompt", cdc=False), 7, id="svpt-nocdc-nc7"),
    pytest.param("svpt", dict(ae_layers=(), ae_source="prompt"), None, id="svpt-noae"),
    pytest.param("cvpt", {}, None, id="cvpt"),
])
def test_requires_grad_exactly_prompt_state_dict(backbone, method, options, nc):
    bb = BACKBONES[backbone]()
    head_names = ("head.", "head_dist.")
    backbone_params = {id(p): n for n, p in bb.named_parameters() if not n.startswith(head_names)}
    model = svpt.prompt(bb, method, 3, num_classes=nc, **options)
    assert model is bb, "svpt.prompt must prompt the model in place and return it"
    # eval mode after prompting
    assert not any(m.training for m in model.modules())
    live = svpt.prompt_state_dict(model, keep_vars=True)
    for k, v in live.items():
        assert isinstance(v, nn.Parameter), k
        assert v.requires_grad, k
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(v) for v in live.values()}
    assert len(live) == len({id(v) for v in live.values()})
    # every backbone parameter is still there, the same tensor, frozen
    model_params = {id(p): p for p in model.parameters()}
    for pid, name in backbone_params.items():
        assert pid in model_params, f"backbone parameter {name} replaced or dropped"
        assert not model_params[pid].requires_grad, name
    # keep_vars=False gives detached tensors with the same values
    det = svpt.prompt_state_dict(model)
    assert set(det) == set(live)
    for k in det:
        assert not det[k].requires_grad
        assert torch.equal(det[k], live[k].detach())
    # heads
    if nc is not None:
        assert model.head.weight.shape[0] == nc
    if backbone == "deit":
        assert set(HEAD_DIST_KEYS) <= set(live)


@pytest.mark.parametrize("backbone", ["vit", "dinov2", "deit"])
@pytest.mark.parametrize("method,options", METHOD_OPTS)
def test_optimizer_step_leaves_backbone_bit_identical(backbone, method, options):
    model, _ = build(backbone, method, 3, factory=None, double=False, prompt_dropout=0.1,
                     **options)
    live = svpt.prompt_state_dict(model, keep_vars=True)
    live_ids = {id(v) for v in live.values()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in live_ids}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    before = {k: v.detach().clone() for k, v in live.items()}
    assert frozen
    opt = torch.optim.AdamW(list(live.values()), lr=1e-2)
    model.train()
    torch.manual_seed(0)
    y = model(make_images(4, seed=7))
    loss = nn.functional.cross_entropy(y, torch.arange(4) % y.shape[1])
    opt.zero_grad()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if id(p) not in live_ids:
            assert n in frozen and torch.equal(p.detach(), frozen[n]), f"backbone {n} changed"
            assert p.grad is None, f"backbone {n} received a gradient"
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} changed"
    for k in ("prompts",) + HEAD_KEYS:
        assert not torch.equal(live[k].detach(), before[k]), f"{k} did not change"


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method,options", [
    pytest.param("vpt-shallow", {}, id="vpt-shallow"),
    pytest.param("vpt-deep", {}, id="vpt-deep"),
    pytest.param("svpt", {}, id="svpt"),
    pytest.param("svpt", dict(cdc=False, ae_layers=()), id="svpt-off"),
    pytest.param("cvpt", dict(cvpt_position=5), id="cvpt-pos5"),
])
@pytest.mark.parametrize("backbone", ["vit", "deit"])
def test_prompt_state_dict_roundtrip_and_strict(backbone, method, options):
    a, ref = build(backbone, method, 3, **options)
    b, _ = build(backbone, method, 3, **options)
    randomize_trainables(a, seed=8)
    sd = svpt.prompt_state_dict(a)
    svpt.load_prompt_state_dict(b, {k: v.clone() for k, v in sd.items()})
    x = make_images(BATCH, seed=8).double()
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    for k, v in svpt.prompt_state_dict(b).items():
        assert torch.equal(v, sd[k]), k
    # strict: missing key
    missing = {k: v for k, v in sd.items() if k != "prompts"}
    with pytest.raises(Exception, match="prompts"):
        svpt.load_prompt_state_dict(b, missing)
    # strict: extra key
    extra = dict(sd)
    extra["bogus.key"] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(Exception, match="bogus"):
        svpt.load_prompt_state_dict(b, extra)
    # strict: mis-shaped key
    bad = dict(sd)
    bad["head.bias"] = torch.zeros(sd["head.bias"].shape[0] + 1, dtype=torch.float64)
    with pytest.raises(Exception, match="head.bias"):
        svpt.load_prompt_state_dict(b, bad)


# ----------------------------------------------------------------------------- fp32
@pytest.mark.parametrize("backbone", ["vit", "dinov2", "qknorm"])
@pytest.mark.parametrize("method,options", METHOD_OPTS)
def test_fp32_within_1e4_of_float64_reference(backbone, method, options):
    """METHOD.md 'What each backend must match': fp32 relative error < 1e-4 (eager)."""
    model, ref = build(backbone, method, 3, double=False, **options)
    randomize_trainables(model, seed=9)
    parity(model, ref, method, options, make_images(BATCH, seed=9), tol=1e-4)
