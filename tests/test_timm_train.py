"""The timm helpers ``train.py`` / ``validate.py`` are built on, driven on a prompted model.

timm's ``train.py`` is not in the timm wheel, so CI cannot run it (docs/timm.md says how it was run
by hand); this drives what it calls, in its order, for a few steps of tiny generated images:
``create_transform`` / ``create_loader`` over an ImageFolder, ``create_optimizer_v2``, ``NativeScaler``,
``ModelEmaV3``, ``CheckpointSaver`` (and :class:`svpt.timm_support.PromptCheckpointSaver`),
``resume_checkpoint``, and validate.py's ``load_checkpoint``; and what a user of those scripts sees:
no prints, one warning for dropout / drop-path settings that do nothing, the ``"auto"`` backend.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import logging
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config
from timm.models import load_checkpoint, resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler

import svpt
import svpt.timm_support as ts

_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, dynamic_img_size=False,
            pretrained_cfg_overlay=dict(input_size=(3, 32, 32)))
METHOD = dict(method="svpt", num_prompts=4, ae_ratio=0.5)
NUM_CLASSES = 3
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm's create_model as train.py calls it (the backbone's init from ``seed``)."""
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=NUM_CLASSES, **_VIT, **kwargs)


def patched(seed: int = 0, method: str = METHOD["method"]) -> torch.nn.Module:
    """train.py's model after the README's patch line."""
    options = {k: v for k, v in METHOD.items() if k not in ("method", "num_prompts")} if method == "svpt" else {}
    return svpt.fused.apply(vit(seed), method, num_prompts=METHOD["num_prompts"], num_classes=NUM_CLASSES, **options)


def native_scaler() -> NativeScaler:
    if "device" in inspect.signature(NativeScaler).parameters:  # timm >= 1.0.10: a scaler for any device
        return NativeScaler(device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm 1.0.9: a CUDA GradScaler, disabled without CUDA
        return NativeScaler()


def image_folder(root) -> str:
    """Tiny generated ImageFolder: per class, 4 32x32 PNGs of one noisy colour."""
    g = torch.Generator().manual_seed(0)
    for label in range(NUM_CLASSES):
        os.makedirs(root / f"class{label}")
        for i in range(4):
            pixels = (torch.rand(32, 32, 3, generator=g) * 60 + 60 * label).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.png")
    return str(root)


def backbone(model) -> dict[str, torch.Tensor]:
    heads = ("prompter.", "head.")
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(heads)}


def _step(model, optimizer, scaler, ema, images, labels, step):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py --amp --amp-dtype bfloat16
        loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    scaler(loss, optimizer, clip_grad=1.0, parameters=[p for p in model.parameters() if p.requires_grad])
    ema.update(model, step=step)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few training steps as train.py takes them, saved by timm's saver and svpt's."""
    data = image_folder(tmp_path_factory.mktemp("data"))
    model = patched()
    start = backbone(model)
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32)
    loader = create_loader(create_dataset("", root=data, split="train", is_training=True),
                           input_size=config["input_size"], batch_size=4, is_training=True, use_prefetcher=False,
                           num_workers=0, mean=config["mean"], std=config["std"])
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    scaler, ema = native_scaler(), ModelEmaV3(model, decay=0.5)
    for step, (images, labels) in zip(range(STEPS), loader):
        _step(model, optimizer, scaler, ema, images, labels, step)
    out = tmp_path_factory.mktemp("out")
    args = argparse.Namespace(model="test_vit", num_classes=NUM_CLASSES)
    savers = {"prompts": (ts.PromptCheckpointSaver, out / "prompts"), "whole": (CheckpointSaver, out / "whole")}
    files = {}
    for kind, (saver_class, directory) in savers.items():
        os.makedirs(directory)
        saver = saver_class(model=model, optimizer=optimizer, args=args, model_ema=ema, amp_scaler=scaler,
                            checkpoint_dir=str(directory), recovery_dir=str(directory), max_history=2)
        saver.save_checkpoint(epoch=0, metric=0.5)
        files[kind] = str(directory / "last.pth.tar")
    batch = next(iter(loader))
    return dict(model=model, optimizer=optimizer, ema=ema, start=start, files=files, batch=batch)


def test_optimizer_holds_only_the_trainable_tensors(run):
    optimizer, model = run["optimizer"], run["model"]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert held == {id(p) for p in svpt.prompt_state_dict(model, keep_vars=True).values()}


def test_backbone_bit_identical_and_prompts_trained(run):
    model = run["model"]
    after = backbone(model)
    assert after.keys() == run["start"].keys()
    assert all(torch.equal(after[k], v) for k, v in run["start"].items())
    assert not torch.equal(model.prompter.prompts, patched().prompter.prompts)


def test_transform_feeds_the_model(run):
    transform = create_transform(**resolve_data_config({}, model=run["model"]), is_training=False)
    image = Image.fromarray((torch.rand(48, 40, 3) * 255).to(torch.uint8).numpy())
    assert run["model"].eval()(transform(image).unsqueeze(0)).shape == (1, NUM_CLASSES)


def test_prompt_only_checkpoint_is_small(run):
    prompts, whole = (os.path.getsize(run["files"][k]) for k in ("prompts", "whole"))
    state = torch.load(run["files"]["prompts"], map_location="cpu", weights_only=False)
    assert set(state["state_dict"]) == {*svpt.prompt_state_dict(run["model"]), ts.METADATA_KEY}
    assert set(state["state_dict_ema"]) == set(state["state_dict"])
    assert prompts < whole / 3, (prompts, whole)


@pytest.mark.parametrize("kind", ["prompts", "whole"])
def test_resume_continues_bit_identically(run, kind):
    """train.py --resume: the model patched the same way, timm's resume_checkpoint, then the same step."""
    model, scaler = patched(), native_scaler()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    assert resume_checkpoint(model, run["files"][kind], optimizer=optimizer, loss_scaler=scaler) == 1
    ema = ModelEmaV3(model, decay=0.5)
    load_checkpoint(ema.module, run["files"][kind], use_ema=True)  # train.py's EMA resume
    for name, value in svpt.prompt_state_dict(run["ema"].module).items():
        assert torch.equal(svpt.prompt_state_dict(ema.module)[name], value)
    images, labels = run["batch"]
    reference = {k: v.clone() for k, v in run["model"].state_dict().items()}  # the run's own model, one step on
    ref_model = patched()
    ref_model.load_state_dict(reference)
    ref_optimizer = create_optimizer_v2(ref_model, "adamw", lr=1e-2, weight_decay=0.05)
    ref_optimizer.load_state_dict(copy.deepcopy(run["optimizer"].state_dict()))  # load_state_dict aliases tensors
    for m, opt in ((model, optimizer), (ref_model, ref_optimizer)):
        _step(m, opt, native_scaler(), ModelEmaV3(m, decay=0.5), images, labels, STEPS)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_validate_with_prompt_from_checkpoint(run):
    """validate.py: create_model, the patch line (method from the checkpoint), timm's load_checkpoint."""
    model = vit()
    ts.prompt_from_checkpoint(model, run["files"]["prompts"], load=False)
    assert model.prompter.describe() == run["model"].prompter.describe()
    load_checkpoint(model, run["files"]["prompts"], use_ema=False)
    images, _ = run["batch"]
    torch.testing.assert_close(model.eval()(images), run["model"].eval()(images), rtol=0, atol=0)


def test_prompt_from_checkpoint_ema_and_safetensors(run, tmp_path):
    images, _ = run["batch"]
    from_ema = ts.prompt_from_checkpoint(vit(), run["files"]["prompts"], use_ema=True).eval()
    torch.testing.assert_close(from_ema(images), run["ema"].module.eval()(images), rtol=0, atol=0)
    path = str(tmp_path / "prompts.safetensors")
    svpt.save_prompts(run["model"], path)
    model = ts.prompt_from_checkpoint(vit(), path).eval()
    torch.testing.assert_close(model(images), run["model"].eval()(images), rtol=0, atol=0)
    load_checkpoint(model, path)  # validate.py then loads it again: a prompt-only state dict


def test_wrong_prompting_and_backbone_are_clear_errors(run):
    path = run["files"]["prompts"]
    with pytest.raises(ValueError, match="was saved from method=svpt, this model has method=cvpt"):
        resume_checkpoint(patched(method="cvpt"), path)
    with pytest.raises(ValueError, match="were made another way than this model's"):
        resume_checkpoint(patched(method="vpt-deep"), run["files"]["whole"])
    with pytest.raises(ValueError, match="prompts do not transfer between backbones"):
        ts.prompt_from_checkpoint(vit(seed=1), path)  # validate.py without --pretrained: another backbone
    with pytest.raises(ValueError, match="no svpt metadata"):
        ts.prompt_from_checkpoint(vit(), run["files"]["whole"])
    with pytest.raises(ValueError, match="it is an unprompted timm checkpoint"):
        patched().load_state_dict(vit().state_dict())


def test_drop_settings_warn_and_prompt_logs_without_printing(capsys, caplog):
    """train.py --drop 0.1 --drop-path 0.1: one warning naming them; the summary is logged, not printed."""
    model = vit(drop_rate=0.1, drop_path_rate=0.1)
    with caplog.at_level(logging.INFO, logger="svpt"), pytest.warns(UserWarning) as warned:
        svpt.prompt(model, "vpt-deep", 2)
    assert [w.filename for w in warned] == [__file__]  # points at the caller's line
    message = str(warned[0].message)
    assert "DropPath (drop_path_rate, up to 0.1) at blocks.*.drop_path1, blocks.*.drop_path2" in message
    assert "Dropout (drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate, up to 0.1) at head_drop" in message
    assert capsys.readouterr() == ("", "")
    assert caplog.messages == [svpt.summary(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svpt.prompt(vit(), "vpt-deep", 2)  # nothing to say without those settings


def test_default_backend_is_auto_and_quiet_on_cpu():
    """A fresh process without SVPT_BACKEND: "auto", and a CPU forward warns about nothing."""
    code = ("import timm, torch, svpt; m = timm.create_model('test_vit', img_size=32, patch_size=8, depth=1); "
            "svpt.prompt(m, 'svpt', 2); m(torch.randn(1, 3, 32, 32)); print(svpt.get_backend())")
    env = {k: v for k, v in os.environ.items() if k != "SVPT_BACKEND"}
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("auto\n", "")
