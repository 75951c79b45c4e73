"""The frozen backbone's layers as the methods call them (svpt.methods.base.frozen): the same
function as the modules' own forward, with autocast's copies of frozen weights made once."""
import timm
import torch
from torch import nn

import svpt
from svpt.methods import base


def _model(seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=2, num_classes=5)
    svpt.prompt(model, "svpt", 3, ae_init=0.4)
    return model


def _step(model, x):
    with svpt.backend("eager"), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_matches_each_module_forward():
    layers = [nn.Linear(6, 5), nn.LayerNorm(6), timm.layers.LayerNorm(6), nn.GELU(), nn.GELU("tanh"),
              nn.Identity(), nn.Dropout(0.5).eval()]
    x = torch.randn(3, 6)
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_()
        assert torch.equal(base.frozen(layer, x), layer(x)), type(layer).__name__


def test_autocast_copies_give_bit_identical_steps(monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    model = _model()
    _step(model, x)
    cached = _step(model, x)  # the second step runs on the copies the first one made
    monkeypatch.setattr(base, "_autocast_copy", lambda tensor, device_type: tensor)
    uncached = _model()
    _step(uncached, x)
    uncached = _step(uncached, x)
    assert torch.equal(cached[0], uncached[0])
    assert cached[1].keys() == uncached[1].keys()
    assert all(torch.equal(cached[1][n], uncached[1][n]) for n in cached[1])


def test_autocast_copies_go_with_their_model():
    before = len(base._AUTOCAST_COPIES)
    model = _model()
    _step(model, torch.randn(2, 3, 32, 32))
    assert len(base._AUTOCAST_COPIES) > before
    del model
    import gc
    gc.collect()
    assert len(base._AUTOCAST_COPIES) == before


def test_autocast_copy_follows_in_place_updates():
    weight = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = base._autocast_copy(weight, "cpu")
        assert base._autocast_copy(weight, "cpu") is first  # cast once
        with torch.no_grad():
            weight.mul_(2)  # e.g. load_state_dict copies into the weight in place
        second = base._autocast_copy(weight, "cpu")
    assert second is not first and torch.equal(second, weight.to(torch.bfloat16))


def test_trainable_and_float64_tensors_are_never_copied():
    trainable = torch.randn(3, requires_grad=True)
    wide = torch.randn(3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert base._autocast_copy(trainable, "cpu") is trainable
        assert base._autocast_copy(wide, "cpu") is wide
