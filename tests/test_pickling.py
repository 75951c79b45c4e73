"""A prompted model pickles: ``pickle``, ``torch.save(model)`` / ``torch.load(weights_only=False)``,
``copy.deepcopy`` and multiprocessing spawn give back a prompted model that computes the same
function, with the same trainable tensors, in a process that never prompted a model."""
from __future__ import annotations

import copy
import io
import multiprocessing
import pickle

import pytest
import timm
import torch

import svpt
from svpt.prompting import prompted_class

METHODS = ("svpt", "cvpt", "vpt-deep", "vpt-shallow")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def prompted(method: str, factory=timm.create_model, name="test_vit", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = factory(name, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kwargs)
    return svpt.prompt(model, method, 3, num_classes=4)


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def same_model(copied: torch.nn.Module, original: torch.nn.Module) -> None:
    assert type(copied) is type(original) and svpt.is_prompted(copied)
    assert copied.prompter.describe() == original.prompter.describe()
    assert ({k for k, p in copied.named_parameters() if p.requires_grad}
            == {k for k, p in original.named_parameters() if p.requires_grad})
    copied.train()  # still the prompted train(): the backbone stays in eval
    assert not copied.blocks[0].training and copied.prompter.training
    copied.eval()
    torch.testing.assert_close(copied(images()), original.eval()(images()), rtol=0, atol=0)


def torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("copier", [lambda m: pickle.loads(pickle.dumps(m)), torch_save_load, copy.deepcopy],
                         ids=["pickle", "torch.save", "deepcopy"])
def test_round_trip(method, copier):
    model = prompted(method)
    same_model(copier(model), model)


def test_deit_distilled():
    """Another timm class, another prompted class, pickled by reference to its timm class."""
    model = prompted("svpt", name="deit_tiny_distilled_patch16_224")
    copied = pickle.loads(pickle.dumps(model))
    assert type(copied).__name__ == "PromptedVisionTransformerDistilled"
    same_model(copied, model)


def test_class_pickles_by_reference():
    model = prompted("vpt-deep")
    cls = type(model)
    assert (cls.__module__, cls.__qualname__) == ("svpt.prompting", "PromptedVisionTransformer")
    assert pickle.loads(pickle.dumps(cls)) is cls is prompted_class(timm.models.VisionTransformer)


def _step_in_child(model: torch.nn.Module, x: torch.Tensor):
    """Runs in the spawned process, which has not prompted any model: a forward and backward."""
    out = model.eval()(x)
    out.sum().backward()
    return svpt.is_prompted(model), type(model).__name__, out.detach(), model.prompter.prompts.grad


def test_multiprocessing_spawn():
    model = prompted("svpt").eval()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        is_prompted, name, out, grad = pool.apply(_step_in_child, (model, images()))
    assert is_prompted and name == "PromptedVisionTransformer"
    expected = model(images())
    expected.sum().backward()
    # the child runs torch's default thread count: the same function, maybe another summation order
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(grad, model.prompter.prompts.grad)
