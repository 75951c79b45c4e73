"""timm's own model test-suite (``tests/test_models.py`` of pytorch-image-models), run on prompted models.

Each test is the equivalent of one of timm's, with ``timm.create_model`` followed by ``svpt.prompt``
(:func:`create`): four small ViTs (a plain one, register tokens without position embedding, no class
token with layer scale, dynamic image size), the four methods, the eager and the C++ backend. timm's
checks are kept; where a prompted model differs by design the test says so: timm's backward tests
require a gradient for every parameter, which the frozen backbone never has (strict xfail), and
TorchScript and FX symbolic tracing, which svpt does not support, must fail with one sentence saying
so (``torch.jit.trace``, ``torch.export`` and ``torch.compile`` are the supported ways).
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules

import svpt
from svpt import backends
from svpt.dense import prompt_features
from svpt.prompting import FX_UNSUPPORTED, SCRIPT_UNSUPPORTED

_BASE = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2,
             pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
VITS = {
    "plain": dict(dynamic_img_size=False),
    "registers": dict(dynamic_img_size=False, reg_tokens=2, no_embed_class=True),
    "no-class-token-layer-scale": dict(dynamic_img_size=False, class_token=False, reg_tokens=1, global_pool="avg",
                                       init_values=1e-1),
    "dynamic-size": dict(dynamic_img_size=True, init_values=1e-1),
}
INPUT_SIZE = {name: (3, 24, 40) if name == "dynamic-size" else (3, 32, 32) for name in VITS}  # C, H, W
METHODS = ("svpt", "cvpt", "vpt-deep", "vpt-shallow")
BACKENDS = ("eager", "cpp")
NUM_PROMPTS = 3
IN_PLACE_OPS = ("da_mix", "ae_update")  # autograd.Functions that torch.jit.trace cannot record


def options(vit: str, method: str) -> dict:
    # AE's default source is the class token; a model without one ranks patches by the prompts' queries
    return {"ae_source": "prompt"} if method == "svpt" and VITS[vit].get("class_token") is False else {}


def create(vit: str, method: str, **timm_kwargs) -> torch.nn.Module:
    """timm.create_model, then svpt.prompt: what the wrapped create_model of the issue returned."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", **{**_BASE, **VITS[vit], **timm_kwargs})
    svpt.prompt(model, method, NUM_PROMPTS, **options(vit, method))
    with torch.no_grad():  # non-zero DA gates and AE steps, so every part of SVPT is exercised
        for name, p in model.prompter.named_parameters():
            if name != "prompts":
                p.normal_(0, 0.5)
    return model.eval()


def images(vit: str, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *INPUT_SIZE[vit], generator=torch.Generator().manual_seed(seed))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(params=BACKENDS)
def backend(request):
    with svpt.backend(request.param):
        yield request.param


cases = pytest.mark.parametrize("vit,method", [(v, m) for v in VITS for m in METHODS])


# ---------------------------------------------------------------- timm: test_model_forward
@cases
def test_model_forward(vit, method, backend):
    model = create(vit, method)
    x = images(vit)
    outputs = model(x)
    assert outputs.shape == (1, model.num_classes)
    assert not torch.isnan(outputs).any()
    model.set_grad_checkpointing()  # grad checkpointing gives the same output
    outputs2 = model(x)
    torch.testing.assert_close(outputs2, outputs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- timm: test_model_backward
@cases
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="requires a gradient in the frozen backbone: by "
                   "design only the prompts and the head train (test_model_backward_trainable checks those)")
def test_model_backward(vit, method):
    model = create(vit, method, num_classes=42)
    model.train()
    model(images(vit, batch=2)).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"No gradient for {name}"


@cases
def test_model_backward_trainable(vit, method, backend):
    """timm's backward test on what trains: every prompt tensor and the head get a gradient, and
    exactly those require one."""
    model = create(vit, method, num_classes=42)
    model.train()
    outputs = model(images(vit, batch=2))
    assert outputs.shape == (2, 42) and not torch.isnan(outputs).any()
    outputs.mean().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"prompter.{k}" if not k.startswith("head.") else k for k in svpt.prompt_state_dict(model)}
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"No gradient for {name}"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"


# ---------------------------------------------------------------- timm: test_model_default_cfgs_non_std
@cases
def test_model_default_cfgs(vit, method, backend):
    model = create(vit, method)
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict, cfg = model.state_dict(), model.default_cfg
    x = torch.randn(1, *cfg["input_size"])

    features = model.forward_features(x)
    grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    # the prompt rows are removed before the final norm: the unprompted model's token layout
    assert features.shape == (1, model.num_prefix_tokens + grid[0] * grid[1], model.num_features)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model(x)
    assert outputs.shape == pre_logits.shape == (1, model.head_hidden_size)

    outputs = create(vit, method, num_classes=0)(x)
    assert outputs.shape[-1] == model.num_features

    assert f"{cfg['classifier']}.weight" in state_dict
    assert f"{cfg['first_conv']}.weight" in state_dict


# ---------------------------------------------------------------- timm: test_model_forward_torchscript
@cases
def test_model_forward_torchscript(vit, method):
    with timm.layers.set_scriptable(True):
        model = create(vit, method)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=f"^{re.escape(SCRIPT_UNSUPPORTED)}$"):
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10 deprecates TorchScript
        torch.jit.script(model)


# ---------------------------------------------------------------- timm: test_model_forward_intermediates
def _check_maps(maps, channels, reductions, input_size, batch):
    assert len(maps) == len(channels)
    feat_axis, spatial_axis = get_channel_dim("NCHW"), get_spatial_dim("NCHW")
    for expected, reduction, o in zip(channels, reductions, maps):
        assert o.shape[feat_axis] == expected
        assert o.shape[spatial_axis[0]] <= math.ceil(input_size[-2] / reduction) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(input_size[-1] / reduction) + 1
        assert o.shape[0] == batch
        assert not torch.isnan(o).any()


@cases
def test_model_forward_intermediates(vit, method, backend):
    model = create(vit, method)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    x = images(vit)
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    _check_maps(intermediates, info.channels(), info.reduction(), x.shape, 1)
    torch.testing.assert_close(output, model.forward_features(x))
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(output3, output, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- timm: test_model_forward_intermediates_features
@cases
def test_model_forward_intermediates_features(vit, method, backend):
    torch.manual_seed(0)
    net = timm.create_model("test_vit", features_only=True, feature_cls="getter", **{**_BASE, **VITS[vit]})
    prompt_features(net, method, NUM_PROMPTS, **options(vit, method))
    net.eval()
    x = images(vit)
    _check_maps(net(x), net.feature_info.channels(), net.feature_info.reduction(), x.shape, 1)


# ---------------------------------------------------------------- timm: test_model_forward_fx / backward_fx / fx_torchscript
@cases
@pytest.mark.parametrize("train", [False, True], ids=["forward", "backward"])
def test_model_fx(vit, method, train):
    """timm's FX tests build a torchvision feature extractor with timm's tracer settings; on a prompted
    model that (and plain symbolic_trace) is one clear error."""
    from torchvision.models.feature_extraction import get_graph_node_names

    model = create(vit, method).train(train)
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    unsupported = pytest.raises(RuntimeError, match=f"^{re.escape(FX_UNSUPPORTED)}$")
    with unsupported:
        get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    with unsupported:
        torch.fx.symbolic_trace(model)


# ---------------------------------------------------------------- beyond timm's suite: torch.jit.trace
@cases
def test_model_jit_trace(vit, method, backend):
    """``torch.jit.trace`` records the prompted forward: same outputs on new images (nothing folded
    into constants but the shapes) and the same gradients for the trainable tensors. SVPT's in-place
    ops, which it cannot record, are handed to the reference while it traces (svpt.backends), the rest not."""
    model = create(vit, method, num_classes=5)
    x = images(vit, batch=2)
    with warnings.catch_warnings(), backends.trace() as log:
        warnings.simplefilter("ignore")  # TracerWarnings about shapes taken as constants; TorchScript's deprecation
        traced = torch.jit.trace(model, x)
    # trace() also runs the model untraced, to check the graph: there the in-place ops run on the backend
    assert log and all(impl == backend for op, impl in log if op not in IN_PLACE_OPS), log
    assert ("eager" in {impl for op, impl in log if op in IN_PLACE_OPS}) == (method == "svpt"), log
    new = images(vit, batch=2, seed=1)
    weights = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in (model, traced):
        model.zero_grad(set_to_none=True)
        out = run(new)
        (out * weights).sum().backward()
        grads.append((out.detach(), {k: p.grad for k, p in svpt.prompt_state_dict(model, keep_vars=True).items()}))
    (ref, ref_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grads, ref_grads, rtol=1e-5, atol=1e-6)
