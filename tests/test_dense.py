"""Dense features of prompted models (svpt/dense.py): timm's forward_intermediates contract.

Values: every method on every backend against the float64 spec (tests/spec_model.py), whose
token outputs at block i are those of the spec run on the first i+1 blocks (prompt rows
removed, as spec_forward does before its head). METHOD.md's fp32 bound: relative error < 1e-4
for the maps, the prefix tokens, the final features and every prompt gradient.
Contract: the structure of every result equals that of timm's own forward_intermediates on the
unprompted twin, for each combination of arguments.
"""
from __future__ import annotations

import copy
import inspect
import itertools

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import svpt
import svpt.dense
from tests import spec_model
from tests.backbones import BACKBONES, make_images, randomize_
from tests.numerics import rel_err
from tests.test_spec_parity import randomize_trainables

METHODS = ("vpt-shallow", "vpt-deep", "svpt", "cvpt")
BACKENDS = ("eager", "triton", "cpp")
TOL = 1e-4
DEPTH = 3


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost time
    yield
    torch.set_num_threads(threads)


def dense_vit(**kwargs) -> VisionTransformer:
    """Class token + 2 registers (3 prefix rows), layer scale, no_embed_class, dynamic size;
    head size 32 so the Triton kernels take it."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=2, mlp_ratio=2.0,
                num_classes=5, reg_tokens=2, no_embed_class=True, init_values=0.5, dynamic_img_size=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = VisionTransformer(**{**args, **kwargs})
    return randomize_(model, 21).eval()


def prompted_pair(method: str, num_prompts: int = 3, backbone=None, **options):
    """(prompted fp32 model with random trainables, float64 unprompted reference)."""
    model = backbone if backbone is not None else dense_vit()
    ref = spec_model.reference_copy(model)
    svpt.prompt(model, method, num_prompts, **options)
    randomize_trainables(model, seed=3)
    return model, ref


def _sliced(sd: dict, method: str, depth: int) -> dict:
    """The trainables the first ``depth`` blocks use."""
    out = dict(sd)
    if method != "vpt-shallow":
        out["prompts"] = sd["prompts"][:depth]
    if "da.weight" in sd:
        out["da.weight"], out["da.bias"] = sd["da.weight"][: depth - 1], sd["da.bias"][: depth - 1]
    if "ae.scale" in sd:
        out["ae.scale"] = sd["ae.scale"][:depth]
    return out


def spec_block_outputs(ref, method: str, leaves: dict, options: dict, images: torch.Tensor, blocks,
                       monkeypatch) -> list[torch.Tensor]:
    """The spec's [prefix, patches] tokens after each block in ``blocks`` (float64)."""
    monkeypatch.setattr(spec_model, "head_forward", lambda bb, z, n_p, sd: z)  # the tokens, not logits
    outputs = []
    for block in blocks:
        truncated = copy.deepcopy(ref)
        truncated.blocks = truncated.blocks[: block + 1]
        outputs.append(spec_model.spec_forward(truncated, method, _sliced(leaves, method, block + 1), options,
                                               images.double()))
    return outputs


def to_map(tokens: torch.Tensor, num_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    return tokens[:, num_prefix:].reshape(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2)


def cotangent(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- values against the spec
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_intermediates_equal_the_spec_block_outputs(method, backend, monkeypatch):
    model, ref = prompted_pair(method)
    images = make_images(2, img_size=40, seed=5)[:, :, :24]  # 24x40: a 3x5 grid (rows and columns differ)
    indices = [-1, 0]  # timm returns them in block order: 0, 2
    with svpt.backend(backend):
        final, inter = model.forward_intermediates(images, indices=indices, norm=True, return_prefix_tokens=True)
    assert [tuple(m.shape) for m, _ in inter] == [(2, 64, 3, 5)] * 2
    assert [tuple(p.shape) for _, p in inter] == [(2, 3, 64)] * 2

    live = {k: v for k, v in svpt.prompt_state_dict(model, keep_vars=True).items() if not k.startswith("head")}
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in live.items()}
    # The final features are the normed output of the last block, as is the second intermediate.
    want_tokens = [ref.norm(t) for t in spec_block_outputs(ref, method, leaves, {}, images, [0, DEPTH - 1], monkeypatch)]
    got = [final] + [t for pair in inter for t in pair]
    want = [want_tokens[-1]] + [t for tokens in want_tokens for t in (to_map(tokens, 3, (3, 5)), tokens[:, :3])]
    errors = {f"output {i}": rel_err(g, w) for i, (g, w) in enumerate(zip(got, want))}

    weights = [cotangent(w, seed=i) for i, w in enumerate(want)]
    sum((g.double() * c).sum() for g, c in zip(got, weights)).backward()
    sum((w * c).sum() for w, c in zip(want, weights)).backward()
    for name, param in live.items():
        assert leaves[name].grad.abs().max() > 0, name  # the comparison below can fail
        errors[f"grad {name}"] = rel_err(param.grad, leaves[name].grad)
    assert max(errors.values()) < TOL, errors


def test_get_intermediate_layers_equal_the_spec_without_norm(monkeypatch):
    model, ref = prompted_pair("svpt", ae_source="prompt", ae_ratio=0.5)
    images = make_images(2, seed=6)
    tokens = model.get_intermediate_layers(images, n=2)  # the last two blocks, [B, N, d]
    maps = model.get_intermediate_layers(images, n=(1, 2), reshape=True)
    leaves = {k: v.detach().double() for k, v in svpt.prompt_state_dict(model).items()}
    want = spec_block_outputs(ref, "svpt", leaves, dict(ae_source="prompt", ae_ratio=0.5), images, [1, 2], monkeypatch)
    for got_tokens, got_map, w in zip(tokens, maps, want):
        assert rel_err(got_tokens, w[:, 3:]) < TOL
        assert rel_err(got_map, to_map(w, 3, (4, 4))) < TOL


# ---------------------------------------------------------------- timm's contract
def _structure(result):
    if isinstance(result, torch.Tensor):
        return ("tensor", tuple(result.shape), result.dtype)
    if isinstance(result, dict):
        return ("dict", {k: _structure(v) for k, v in result.items()})
    return (type(result).__name__, [_structure(r) for r in result])


@pytest.mark.parametrize("backbone", ["vit", "noclass"])
def test_every_argument_gives_the_structure_timm_gives(backbone):
    plain = BACKBONES[backbone]()
    model = svpt.prompt(copy.deepcopy(plain), "svpt", 3, **({"ae_source": "prompt"} if backbone == "noclass" else {}))
    images = make_images(2, seed=1)
    flags = ("return_prefix_tokens", "norm", "stop_early", "intermediates_only")
    if "output_dict" in inspect.signature(VisionTransformer.forward_intermediates).parameters:  # timm >= 1.0.16
        flags += ("output_dict",)
    for indices, fmt, values in itertools.product((None, 2, [-1, 0], (1,)), ("NCHW", "NLC"),
                                                  itertools.product((False, True), repeat=len(flags))):
        kwargs = dict(indices=indices, output_fmt=fmt, **dict(zip(flags, values)))
        with torch.no_grad():
            try:
                want = _structure(plain.forward_intermediates(images, **kwargs))
            except UnboundLocalError:  # timm 1.0.9 with return_prefix_tokens and no prefix: later timm ignores it
                want = _structure(plain.forward_intermediates(images, **{**kwargs, "return_prefix_tokens": False}))
            assert _structure(model.forward_intermediates(images, **kwargs)) == want, kwargs


def test_argument_meanings_on_values():
    model, _ = prompted_pair("cvpt", cvpt_position=2)
    images = make_images(2, seed=2)
    with torch.no_grad():
        final, every = model.forward_intermediates(images, output_fmt="NLC")
        assert len(every) == DEPTH
        torch.testing.assert_close(final, model.forward_features(images), rtol=0, atol=0)
        last_two = model.forward_intermediates(images, indices=2, output_fmt="NLC", intermediates_only=True)
        swapped = model.forward_intermediates(images, indices=[2, -3], output_fmt="NLC", intermediates_only=True)
        for got, want in zip(last_two + swapped, every[1:] + [every[0], every[2]]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        normed = model.forward_intermediates(images, indices=[1], norm=True, output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(normed[0], model.norm(every[1]), rtol=0, atol=0)  # LayerNorm: per token
        early_final, early = model.forward_intermediates(images, indices=[1], stop_early=True, output_fmt="NLC",
                                                         return_prefix_tokens=True)
        torch.testing.assert_close(early[0][0], every[1], rtol=0, atol=0)
        torch.testing.assert_close(early_final[:, 3:], normed[0], rtol=1e-6, atol=1e-6)
        assert early[0][1].shape == (2, 3, 64)
        result = model.forward_intermediates(images, indices=[0], output_dict=True, return_prefix_tokens=True)
        assert set(result) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
        torch.testing.assert_close(result["image_features"], final, rtol=0, atol=0)


def test_timm_forward_intermediates_test_passes_on_a_prompted_registry_model():
    """timm's own test_model_forward_intermediates, on a prompted model."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    svpt.prompt(model, "vpt-deep", 4)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(images, output_fmt="NCHW")
        assert len(info.channels()) == len(intermediates)
        for channels, reduction, o in zip(info.channels(), info.reduction(), intermediates):
            assert o.shape == (1, channels, 64 // reduction, 64 // reduction) and not torch.isnan(o).any()
        torch.testing.assert_close(output, model.forward_features(images))
        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(images, output_fmt="NCHW")
    torch.testing.assert_close(output, output3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(method):
    model, _ = prompted_pair(method)
    images = make_images(2, seed=4)
    calls = []
    for blk in model.blocks:
        blk.norm2.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        calls.clear()
        maps = model.forward_intermediates(images, indices=[0, 2], intermediates_only=True)
        sum((m * torch.linspace(-1, 1, m.numel()).reshape(m.shape)).sum() for m in maps).backward()
        results.append(([m.detach() for m in maps], model.prompter.prompts.grad.clone(), len(calls)))
    (maps, grad, plain_calls), (maps_ckpt, grad_ckpt, ckpt_calls) = results
    assert ckpt_calls == 2 * plain_calls  # each block ran again in backward
    for a, b in zip(maps, maps_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ckpt, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- sizes
def test_other_image_sizes(monkeypatch):
    padded, _ = prompted_pair("vpt-deep", backbone=dense_vit(dynamic_img_pad=True))
    maps = padded.forward_intermediates(make_images(1, img_size=36), indices=1, intermediates_only=True)
    assert maps[0].shape == (1, 64, 5, 5)  # 36 px padded to 40: ceil(36 / 8) patches a side

    fixed, _ = prompted_pair("vpt-deep", backbone=dense_vit(dynamic_img_size=False, img_size=(48, 32)))
    assert fixed.forward_intermediates(make_images(1, img_size=48)[..., :32], intermediates_only=True)[0].shape == \
        (1, 64, 6, 4)
    with pytest.raises(ValueError, match=r"images are 32x32 but this model takes 48x32.*dynamic_img_size=True"):
        fixed.forward_intermediates(make_images(1))
    with pytest.raises(ValueError, match=r"36x36, not a multiple of the patch size 8x8.*dynamic_img_pad=True"):
        prompted_pair("svpt")[0].forward_intermediates(make_images(1, img_size=36))


# ---------------------------------------------------------------- pruning and features_only
def test_prune_keeps_the_prompts_and_the_intermediates():
    model, _ = prompted_pair("svpt")
    images = make_images(2, seed=7)
    with torch.no_grad():
        before = model.forward_intermediates(images, indices=[0, 1], intermediates_only=True)
    shapes = {k: v.shape for k, v in svpt.prompt_state_dict(model).items() if not k.startswith("head")}
    assert model.prune_intermediate_layers([0, -2], prune_norm=True) == [0, 1]
    assert len(model.blocks) == 2 and isinstance(model.norm, torch.nn.Identity)
    assert isinstance(model.head, torch.nn.Identity)
    assert {k: v.shape for k, v in svpt.prompt_state_dict(model).items()} == shapes
    with torch.no_grad():
        after = model.forward_intermediates(images, intermediates_only=True)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_features_only_model_prompted_through_prompt_features(monkeypatch):
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, out_indices=(1, 2),
                            img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)
    randomize_(net.model, 9)
    ref = spec_model.reference_copy(net.model)
    assert svpt.dense.prompt_features(net, "svpt", 3) is net and len(net.model.blocks) == 3
    randomize_trainables(net.model, seed=4)
    images = make_images(2, seed=8)
    with torch.no_grad():
        maps = net(images)
    leaves = {k: v.double() for k, v in svpt.prompt_state_dict(net.model).items()}
    want = spec_block_outputs(ref, "svpt", leaves, {}, images, [1, 2], monkeypatch)
    assert net.feature_info.channels() == [64, 64] and len(maps) == 2
    for got, w in zip(maps, want):
        assert rel_err(got, to_map(w, 1, (4, 4))) < TOL
    with pytest.raises(TypeError, match="features_only"):
        svpt.dense.prompt_features(dense_vit(), "svpt", 3)


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, error, words", [
    (dict(indices=0), ValueError, "indices=0 is out of range; accepted: None (all 3 blocks)"),
    (dict(indices=4), ValueError, "an int n in 1..3"),
    (dict(indices=[3]), ValueError, "block indices in -3..2"),
    (dict(indices=[-4]), ValueError, "indices=[-4] is not accepted"),
    (dict(indices=[]), ValueError, "indices=[] is not accepted"),
    (dict(indices=True), TypeError, "indices=True is not accepted"),
    (dict(indices="1"), TypeError, "indices='1'"),
    (dict(output_fmt="NHWC"), ValueError, "output_fmt='NHWC' is not accepted; accepted: NCHW, NLC"),
    (dict(attn_mask=torch.ones(1, 1)), ValueError, "does not take attn_mask"),
    (dict(is_causal=True), ValueError, "does not take attn_mask or is_causal"),
])
def test_bad_arguments_say_what_is_accepted(kwargs, error, words):
    model, _ = prompted_pair("vpt-shallow")
    with pytest.raises(error) as info:
        model.forward_intermediates(make_images(1), **kwargs)
    assert words in str(info.value)
    with pytest.raises(ValueError, match="indices=5 is out of range"):
        model.prune_intermediate_layers(5)
