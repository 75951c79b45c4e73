"""The public API around the methods: bad input, the prompted model's timm interface,
checkpoints on disk and the backend switch. Numerical parity is in test_spec_parity.py and
test_models.py (every backbone variant, the timm registry models and a dynamic image size, by
value); the backends' declarations in test_backends.py."""
import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

import svpt
from backbones import BACKBONES, make_images


@pytest.fixture
def vit():
    return BACKBONES["vit"]()


def _prompted(method="svpt", m=3, **options):
    return svpt.prompt(BACKBONES["vit"](), method, m, **options)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("method, m, options, error, words", [
    ("vpt", 3, {}, ValueError, ["unknown method 'vpt'", "vpt-shallow", "cvpt"]),
    ("svpt", 0, {}, ValueError, ["num_prompts=0", ">= 1"]),
    ("svpt", -2, {}, ValueError, ["num_prompts=-2"]),
    ("svpt", 2.5, {}, ValueError, ["num_prompts=2.5"]),
    ("svpt", True, {}, ValueError, ["num_prompts=True"]),
    ("svpt", 3, {"ae_ratoi": 0.2}, TypeError, ["unknown option 'ae_ratoi'", "ae_ratio"]),
    ("vpt-deep", 3, {"ae_ratio": 0.2}, ValueError, ["'ae_ratio' does not apply to method 'vpt-deep'", "prompt_dropout"]),
    ("svpt", 3, {"cvpt_position": 2}, ValueError, ["'cvpt_position' does not apply to method 'svpt'"]),
    ("svpt", 3, {"ae_ratio": 0}, ValueError, ["ae_ratio=0", "(0, 1]"]),
    ("svpt", 3, {"ae_ratio": 1.5}, ValueError, ["ae_ratio=1.5", "(0, 1]"]),
    ("svpt", 3, {"ae_ratio": "half"}, ValueError, ["ae_ratio='half'"]),
    ("svpt", 3, {"ae_source": "patch"}, ValueError, ["ae_source='patch'", "'cls' or 'prompt'"]),
    ("svpt", 3, {"ae_layers": (0, 3)}, ValueError, ["ae_layers=(0, 3)", "0..2"]),
    ("svpt", 3, {"ae_layers": (1, 1)}, ValueError, ["distinct"]),
    ("svpt", 3, {"ae_layers": 2}, TypeError, ["ae_layers=2", "sequence of block indices"]),
    ("svpt", 3, {"cdc": "yes"}, TypeError, ["cdc='yes'", "True or False"]),
    ("svpt", 3, {"da_init_bias": float("nan")}, ValueError, ["da_init_bias=nan"]),
    ("svpt", 3, {"ae_init": float("inf")}, ValueError, ["ae_init=inf", "finite"]),
    ("svpt", 3, {"prompt_dropout": 1.0}, ValueError, ["prompt_dropout=1.0", "[0, 1)"]),
    ("cvpt", 3, {"cvpt_position": 0}, ValueError, ["cvpt_position=0", "1..5"]),
    ("cvpt", 3, {"cvpt_position": 6}, ValueError, ["cvpt_position=6", "after the MLP"]),
    ("cvpt", 3, {"cvpt_position": 2.0}, ValueError, ["cvpt_position=2.0"]),
])
def test_bad_input_is_rejected_before_any_change(vit, method, m, options, error, words):
    before = copy.deepcopy(vit.state_dict())
    with pytest.raises(error) as info:
        svpt.prompt(vit, method, m, **options)
    for word in words:
        assert word in str(info.value)
    assert not svpt.is_prompted(vit) and not hasattr(vit, "prompter")
    assert all(p.requires_grad for p in vit.parameters())
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())


def test_not_a_vision_transformer():
    with pytest.raises(TypeError, match="takes a timm VisionTransformer, got Linear"):
        svpt.prompt(torch.nn.Linear(3, 3), "svpt", 4)


def test_unsupported_block_type():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock)
    with pytest.raises(TypeError, match="block 0 is ResPostBlock.*pre-norm Block"):
        svpt.prompt(model, "vpt-deep", 2)


def test_cls_saliency_needs_a_class_token():
    with pytest.raises(ValueError, match="ae_source='cls' needs a class token"):
        svpt.prompt(BACKBONES["noclass"](), "svpt", 2)
    # Without AE the source is never used, so the model is accepted.
    assert svpt.is_prompted(svpt.prompt(BACKBONES["noclass"](), "svpt", 2, ae_layers=()))


def test_prompting_twice(vit):
    svpt.prompt(vit, "cvpt", 2)
    with pytest.raises(ValueError, match="already prompted"):
        svpt.prompt(vit, "svpt", 2)


# ------------------------------------------------------------------ the prompted model keeps timm's interface
def test_summary_line(vit, capsys, caplog):
    """svpt.prompt logs (never prints) its one-line summary to the ``svpt`` logger."""
    with caplog.at_level(logging.INFO, logger="svpt"):
        svpt.prompt(vit, "svpt", 4, num_classes=7)
    assert capsys.readouterr().out == ""
    lines = [record.getMessage() for record in caplog.records if record.name == "svpt"]
    trainable = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    total = sum(p.numel() for p in vit.parameters())
    assert len(lines) == 1 and lines[0] == svpt.summary(vit)
    line = lines[0]
    assert line.startswith("svpt: svpt (M=4") and f"{trainable:,} trainable / {total:,} parameters" in line


def test_timm_interface_is_kept(vit):
    images = make_images(2)
    plain_features = vit.forward_features(images)
    svpt.prompt(vit, "svpt", 3)
    assert isinstance(vit, VisionTransformer) and svpt.is_prompted(vit)
    features = vit.forward_features(images)
    assert features.shape == plain_features.shape  # prompts are gone before norm/pool/head
    assert torch.equal(vit(images), vit.forward_head(features))
    assert vit.forward_head(features, pre_logits=True).shape == (2, vit.embed_dim)
    vit.reset_classifier(11)
    assert vit(images).shape == (2, 11)
    assert svpt.prompt_state_dict(vit)["head.weight"].shape == (11, vit.embed_dim)
    assert vit.head.weight.requires_grad


def test_full_state_dict_keeps_timm_keys_and_round_trips(vit):
    timm_keys = set(vit.state_dict())
    svpt.prompt(vit, "svpt", 3)
    keys = set(vit.state_dict())
    assert timm_keys < keys
    assert keys - timm_keys == {"prompter.prompts", "prompter.da.weight", "prompter.da.bias", "prompter.ae.scale"}
    other = svpt.prompt(BACKBONES["vit"](), "svpt", 3)  # different random prompts until loaded
    other.load_state_dict(vit.state_dict())
    images = make_images(2)
    assert torch.equal(other(images), vit(images))


def test_to_dtype_and_device(vit):
    svpt.prompt(vit, "cvpt", 2)
    vit.to(torch.float64)
    assert vit.prompter.prompts.dtype == torch.float64
    assert vit(make_images(1).double()).dtype == torch.float64


def test_train_mode_keeps_backbone_in_eval(vit):
    svpt.prompt(vit, "vpt-deep", 2, prompt_dropout=0.1)
    vit.train()
    assert vit.training and vit.prompter.training
    assert not any(m.training for name, m in vit.named_modules() if name and not name.startswith("prompter"))
    vit.eval()
    assert not vit.training and not vit.prompter.training


@pytest.mark.parametrize("method", list(svpt.METHODS))
def test_grad_checkpointing_gives_the_same_result(method):
    images = make_images(2)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same prompt init for both runs
        model = svpt.prompt(BACKBONES["dinov2"](), method, 3)
        model.set_grad_checkpointing(checkpointing)
        model.train()
        model(images).square().sum().backward()
        results.append({k: p.grad for k, p in svpt.prompt_state_dict(model, keep_vars=True).items()})
    for key, grad in results[0].items():
        torch.testing.assert_close(results[1][key], grad, rtol=1e-5, atol=1e-7)


def test_unsupported_calls_say_so(vit):
    svpt.prompt(vit, "svpt", 2)
    with pytest.raises(ValueError, match="attn_mask"):
        vit.forward_features(make_images(1), attn_mask=torch.ones(1, 1))


# ------------------------------------------------------------------ checkpoints on disk
def test_save_and_load_prompts_round_trip(tmp_path):
    model = _prompted("svpt", 3)
    with torch.no_grad():
        for p in svpt.prompt_state_dict(model, keep_vars=True).values():
            p.normal_()
    path = tmp_path / "prompts.safetensors"
    svpt.save_prompts(model, path)
    fresh = _prompted("svpt", 3)
    svpt.load_prompts(fresh, path)
    images = make_images(2)
    assert torch.equal(fresh(images), model(images))
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch):
    model = _prompted("vpt-deep", 2)
    path = tmp_path / "p.safetensors"
    svpt.save_prompts(model, path)
    good = path.read_bytes()
    with torch.no_grad():
        model.prompter.prompts.add_(1)

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        svpt.save_prompts(model, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


@pytest.mark.parametrize("other_method, other_m, options, words", [
    ("cvpt", 2, {}, "method=svpt"),
    ("svpt", 3, {}, "num_prompts=2"),
    ("svpt", 2, {"ae_ratio": 0.5}, "options="),
])
def test_load_prompts_from_another_setup(tmp_path, other_method, other_m, options, words):
    path = tmp_path / "p.safetensors"
    svpt.save_prompts(_prompted("svpt", 2), path)
    with pytest.raises(ValueError, match=words):
        svpt.load_prompts(_prompted(other_method, other_m, **options), path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "plain-safetensors"])
def test_load_prompts_rejects_bad_files(tmp_path, damage):
    from safetensors.torch import save_file
    path = tmp_path / "p.safetensors"
    model = _prompted("svpt", 2)
    svpt.save_prompts(model, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        save_file({k: v.contiguous() for k, v in svpt.prompt_state_dict(model).items()}, str(path))
    before = copy.deepcopy(svpt.prompt_state_dict(model))
    with pytest.raises(ValueError, match="not (a readable safetensors|an svpt) prompt checkpoint"):
        svpt.load_prompts(model, path)
    assert all(torch.equal(before[k], v) for k, v in svpt.prompt_state_dict(model).items())


def test_state_dict_functions_need_a_prompted_model(vit):
    with pytest.raises(ValueError, match="not prompted; call svpt.prompt"):
        svpt.prompt_state_dict(vit)


def test_load_prompt_state_dict_checks_everything_first():
    model = _prompted("svpt", 2)
    sd = {k: torch.ones_like(v) for k, v in svpt.prompt_state_dict(model).items()}
    sd["ae.scale"] = "0.5"
    before = copy.deepcopy(svpt.prompt_state_dict(model))
    with pytest.raises(TypeError, match="'ae.scale' holds str"):
        svpt.load_prompt_state_dict(model, sd)
    assert all(torch.equal(before[k], v) for k, v in svpt.prompt_state_dict(model).items())


# ------------------------------------------------------------------ the backend switch
def test_backend_switch():
    assert "eager" in svpt.available_backends()
    assert svpt.available_backends("cpu")[-1] == "eager"
    start = svpt.get_backend()
    with svpt.backend("eager"):
        assert svpt.get_backend() == "eager"
        with pytest.raises(ZeroDivisionError):
            with svpt.backend("auto"):
                assert svpt.get_backend() == "auto"
                1 / 0
        assert svpt.get_backend() == "eager"
    assert svpt.get_backend() == start
    with pytest.raises(ValueError, match="'tpu' is not an svpt backend; accepted: eager"):
        svpt.set_backend("tpu")


def test_auto_backend_computes_the_reference_function():
    model = _prompted("svpt", 3)
    images = make_images(2)
    with svpt.backend("eager"):
        expected = model(images)
    with svpt.backend("auto"):
        torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-5)


def test_auto_says_what_it_runs():
    """``auto_choice`` is what "auto" runs (and why it skipped better ones); ``svpt env`` shows it."""
    from svpt import backends, env
    name, skipped = backends.auto_choice("cpu")
    assert name == next(n for n in svpt.available_backends("cpu") if n != "triton")  # never the interpreter
    assert all(isinstance(reason, str) and reason for reason in skipped)
    with svpt.backend("auto"):
        assert backends.implementation("da_mix", "cpu", torch.float32).name == name
        assert f"auto (cpu: {name}" in env.report()


def test_env_variable_selects_and_validates_the_backend():
    code = "import svpt; print(svpt.get_backend())"
    env = dict(os.environ, SVPT_BACKEND="auto")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "auto"
    env["SVPT_BACKEND"] = "fastest"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SVPT_BACKEND= 'fastest' is not an svpt backend" in out.stderr
