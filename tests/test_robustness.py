"""Robustness (issue 8), on CPU: bad input fails loudly and the same way on every backend,
training is deterministic, fp16 overflow never reaches the prompts, non-finite inputs propagate
as documented (docs/method.md, "Numerical contract"), and a killed or corrupted run loses
nothing but its unfinished epoch.

Backends: every registered one, explicitly; Triton runs in its CPU interpreter
(tests/conftest.py). A registered backend that is not usable here fails its rows with its own
reason.
"""
from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

import svpt
from svpt import backends, ops, reference
from svpt.cli import main

from backbones import randomize_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = list(backends.describe())  # every selectable backend, eager included


def usable(name: str) -> None:
    reason = backends._REGISTRY[name].why_unusable(torch.device("cpu"))  # noqa: SLF001
    if reason is not None:
        pytest.fail(f"backend {name!r} is registered but not usable on CPU: {reason}")


def tiny_vit(prefix: int = 1, width: int = 64, heads: int = 2, depth: int = 2, seed: int = 11) -> VisionTransformer:
    torch.manual_seed(seed)
    net = VisionTransformer(img_size=16, patch_size=8, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=2.0,
                            num_classes=3, class_token=prefix > 0, reg_tokens=max(0, prefix - 1),
                            global_pool="token" if prefix else "avg")
    return randomize_(net, seed).eval()


def prompted(method: str = "svpt", m: int = 3, **options) -> torch.nn.Module:
    model = svpt.prompt(tiny_vit(), method, m, **options)
    with torch.no_grad():  # non-default DA/AE values: every path carries signal
        gen = torch.Generator().manual_seed(5)
        for name, p in model.named_parameters():
            if p.requires_grad and name.startswith(("prompter.da", "prompter.ae")):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return model


def images(batch: int = 2, seed: int = 3, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ================================================================ entry-point checks
def valid_inputs():
    """One valid call per op: (op, args) with B=2, T=1+3+4, d=64 (2 heads of 32)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "da_mix": [r(2, 8, 64), r(1, 3, 64), r(2, 64), torch.tensor(-2.0), 1],
        "prompt_attention": [r(2, 8, 2, 32), r(2, 8, 2, 32), r(2, 8, 2, 32), 32 ** -0.5],
        "attention_saliency": [r(2, 8, 2, 32), r(2, 8, 2, 32), 32 ** -0.5, (0, 1), 4],
        "ae_update": [r(2, 8, 64), torch.rand(2, 4, generator=g), torch.tensor(0.5), 1, 3, 2],
        "prompt_kv_attention": [r(2, 5, 2, 32), r(2, 5, 2, 32), r(2, 5, 2, 32), r(1, 3, 2, 32), r(1, 3, 2, 32),
                                32 ** -0.5],
        "folded_cross_attention": [r(2, 5, 64), r(2, 3, 64), r(2, 3), r(2, 3, 64), r(64), None],
    }


def copies(args):
    """``args`` with every tensor cloned (the in-place ops write their buffer)."""
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


# (op, argument index, how to break it, error type, words the message must contain)
BAD_INPUTS = [
    # device: a tensor on another device ("meta" exists on every machine)
    ("da_mix", 1, lambda t: t.to("meta"), ValueError, ["prompts is on meta", "tokens is on cpu", "expected cpu"]),
    ("prompt_attention", 2, lambda t: t.to("meta"), ValueError, ["v is on meta", "q is on cpu"]),
    ("attention_saliency", 1, lambda t: t.to("meta"), ValueError, ["k is on meta", "q is on cpu"]),
    ("ae_update", 2, lambda t: t.to("meta"), ValueError, ["scale is on meta", "expected cpu"]),
    ("prompt_kv_attention", 4, lambda t: t.to("meta"), ValueError, ["prompt_v is on meta"]),
    ("folded_cross_attention", 4, lambda t: t.to("meta"), ValueError, ["bias is on meta", "x is on cpu"]),
    # dtype: unsupported dtypes and mixes the reference cannot compute
    ("da_mix", 0, lambda t: t.to(torch.int64), TypeError, ["tokens has dtype int64", "accepted: float16, bfloat16"]),
    ("prompt_attention", 0, lambda t: t.to(torch.complex64), TypeError, ["q has dtype complex64"]),
    ("da_mix", 2, lambda t: t.double(), TypeError, ["weight (float64)", "tokens (float32)", "outside torch.autocast"]),
    ("prompt_attention", 1, lambda t: t.half(), TypeError, ["k (float16)", "q (float32)", "share one dtype"]),
    ("attention_saliency", 1, lambda t: t.half(), TypeError, ["k (float16)", "q (float32)"]),
    ("prompt_kv_attention", 0, lambda t: t.double(), TypeError, ["q (float64)", "[prompt_k; k] (float32)"]),
    ("folded_cross_attention", 3, lambda t: t.half(), TypeError, ["w_values (float16)"]),
    ("ae_update", 1, lambda t: t.to(torch.int32), TypeError, ["saliency has dtype int32"]),
    # types
    ("da_mix", 0, lambda t: t.tolist(), TypeError, ["tokens must be a torch.Tensor, got list"]),
    ("da_mix", 4, lambda n: 1.0, TypeError, ["num_prefix must be an integer, got 1.0"]),
    ("prompt_attention", 3, lambda s: "0.1", TypeError, ["scale must be a real number"]),
    ("prompt_attention", 3, lambda s: math.nan, ValueError, ["scale=nan must be finite"]),
    ("attention_saliency", 3, lambda r: 0, TypeError, ["saliency_rows must be (start, count)"]),
    # shapes: ranks and sizes
    ("da_mix", 0, lambda t: t[0], ValueError, ["tokens has shape (8, 64); expected [B, T, d]"]),
    ("da_mix", 1, lambda t: t[..., :32], ValueError, ["prompts has shape (1, 3, 32)", "d=64"]),
    ("da_mix", 1, lambda t: t.expand(3, -1, -1), ValueError, ["1 or B=2"]),
    ("da_mix", 2, lambda t: t[:1], ValueError, ["weight has shape (1, 64); expected [2, d=64]"]),
    ("da_mix", 3, lambda t: t.expand(2), ValueError, ["bias has shape (2,); expected a scalar"]),
    ("da_mix", 4, lambda n: 6, ValueError, ["num_prefix=6 is out of range", "in 0..5", "M=3"]),  # M > T - n_p
    ("da_mix", 4, lambda n: -1, ValueError, ["num_prefix=-1"]),
    ("prompt_attention", 1, lambda t: t[:, :, :1], ValueError, ["k has shape (2, 8, 1, 32)", "H=2"]),
    ("prompt_attention", 2, lambda t: t[:, :5], ValueError, ["must have the same shape"]),
    ("attention_saliency", 1, lambda t: t[..., :16], ValueError, ["k has shape (2, 8, 2, 16)", "D=32"]),
    ("attention_saliency", 3, lambda r: (0, 9), ValueError, ["saliency_rows count=9 is out of range"]),
    ("attention_saliency", 3, lambda r: (8, 1), ValueError, ["saliency_rows start=8"]),
    ("attention_saliency", 4, lambda c: 8, ValueError, ["saliency_cols=8", "Tk=8"]),
    ("ae_update", 0, lambda t: t[0], ValueError, ["h has shape (8, 64); expected [B, T, d]"]),
    ("ae_update", 1, lambda t: t[:, :3], ValueError, ["saliency has shape (2, 3); expected [B=2, N=4]"]),
    ("ae_update", 5, lambda k: 0, ValueError, ["k=0 is out of range", "in 1..4"]),
    ("ae_update", 5, lambda k: 5, ValueError, ["k=5", "N=4 patch tokens"]),
    ("ae_update", 4, lambda m: 7, ValueError, ["num_prefix=1 is out of range"]),
    ("ae_update", 4, lambda m: 0, ValueError, ["num_prompts=0"]),
    ("prompt_kv_attention", 1, lambda t: t[:1], ValueError, ["k has shape (1, 5, 2, 32); expected [B=2"]),
    ("prompt_kv_attention", 3, lambda t: t[:, :0], ValueError, ["prompt_k has shape (1, 0, 2, 32)", "M >= 1"]),
    ("folded_cross_attention", 1, lambda t: t[..., :32], ValueError, ["w_logits has shape (2, 3, 32)"]),
    ("folded_cross_attention", 2, lambda t: t[:1], ValueError, ["b_logits has shape (1, 3); expected [H, M]"]),
    ("folded_cross_attention", 5, lambda r: torch.zeros(2, 4, 64), ValueError, ["residual has shape (2, 4, 64)"]),
]
STRIDED_BUFFER = [  # the buffer of an in-place op with a non-unit last stride
    pytest.param("da_mix", 0, lambda t: torch.cat([t, t], -1)[..., ::2], ValueError, ["tokens", "last dimension"],
                 id="da_mix-strided-buffer"),
    pytest.param("ae_update", 0, lambda t: torch.cat([t, t], -1)[..., ::2], ValueError, ["h", "last dimension"],
                 id="ae_update-strided-buffer"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,index,mutate,error,words",
                         [pytest.param(*b, id=f"{b[0]}-{i}") for i, b in enumerate(BAD_INPUTS)] + STRIDED_BUFFER)
def test_bad_input_raises_the_same_clear_error_on_every_backend(backend, op, index, mutate, error, words):
    usable(backend)
    args = valid_inputs()[op]
    bad = replace(args, index, mutate(args[index]))
    with svpt.backend(backend), pytest.raises(error) as info:
        getattr(ops, op)(*bad)
    assert_names(op, info, words)


def assert_names(op: str, info, words) -> None:
    """The error names the op first, then each of ``words``."""
    message = str(info.value)
    assert message.startswith(f"svpt.ops.{op}: "), message
    for word in words:
        assert word in message, (word, message)


# the row-local ops' norm= argument: (op, norm, residual given, error type, words the message must contain)
BAD_NORMS = [
    ("da_mix", (torch.ones(64), torch.zeros(64), 1e-6), False, ValueError,
     ["norm is the LayerNorm of the residual sum; pass residual with it"]),
    ("ae_update", (torch.ones(32), None, 1e-6), True, ValueError, ["norm weight has shape (32,); expected [d=64]"]),
    ("da_mix", (torch.ones(64, requires_grad=True), None, 1e-6), True, ValueError,
     ["norm weight requires grad", "frozen backbone's LayerNorm"]),
    ("ae_update", (None, None, 0.0), True, ValueError, ["norm's eps must be a positive number, got 0.0"]),
    ("da_mix", (None, None), True, TypeError, ["norm must be (weight, bias, eps) of a LayerNorm"]),
    ("ae_update", (None, torch.zeros(64, device="meta"), 1e-6), True, ValueError, ["norm bias is on meta"]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,norm,residual,error,words", [pytest.param(*b, id=f"{b[0]}-{i}")
                                                          for i, b in enumerate(BAD_NORMS)])
def test_bad_norm_raises_the_same_clear_error_on_every_backend(backend, op, norm, residual, error, words):
    usable(backend)
    args = valid_inputs()[op]
    with svpt.backend(backend), pytest.raises(error) as info:
        getattr(ops, op)(*args, residual=torch.randn_like(args[0]) if residual else None, norm=norm)
    assert_names(op, info, words)


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_inputs_pass_the_checks(backend):
    usable(backend)
    for op, args in valid_inputs().items():
        with svpt.backend(backend):
            out = getattr(ops, op)(*args)
        assert out.isfinite().all(), op


def test_mixed_dtypes_the_reference_accepts_are_accepted():
    """AE's scale may have another dtype than h (u is added in h's dtype), and under autocast the
    multiplied tensors may differ (autocast casts them): the same mixes the reference computes."""
    args = valid_inputs()
    h, saliency, scale, *rest = args["ae_update"]
    assert ops.ae_update(h, saliency, scale.half(), *rest).dtype == torch.float32
    tokens, prompts, weight, bias, n = args["da_mix"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops.da_mix(tokens, prompts.bfloat16(), weight, bias, n)
        with pytest.raises(TypeError, match="mix float64 with other dtypes"):
            ops.da_mix(tokens, prompts.double(), weight, bias, n)


# ---------------------------------------------------------------- the model's entry
def test_model_input_on_another_device_says_which_tensor_and_what_was_expected():
    model = prompted()
    with pytest.raises(ValueError, match=r"images are on meta but the model is on cpu; expected images on cpu"):
        model(images().to("meta"))


def test_model_input_of_another_dtype_says_which_tensor_and_what_was_expected():
    model = prompted()
    with pytest.raises(TypeError, match=r"images have dtype float64 but the model's parameters are float32; "
                                        r"expected images of dtype float32"):
        model(images(dtype=torch.float64))
    with pytest.raises(TypeError, match=r"images have dtype uint8; expected a floating-point tensor"):
        model(images().to(torch.uint8))
    with pytest.raises(ValueError, match=r"images have shape \(3, 16, 16\); expected \[B, C, H, W\]"):
        model(images()[0])
    # autocast casts the images for the model: accepted (float64 is not cast by autocast: refused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images(dtype=torch.bfloat16)).shape == (2, 3)
        with pytest.raises(TypeError, match="images have dtype float64"):
            model(images(dtype=torch.float64))
    assert model.double()(images(dtype=torch.float64)).dtype == torch.float64


# ================================================================ determinism
def no_atomics_in(paths: list[str], pattern: str) -> list[str]:
    hits = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                code = line.split("#", 1)[0] if path.endswith(".py") else line.split("//", 1)[0]
                if re.search(pattern, code):
                    hits.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    return hits


def test_no_atomics_in_the_kernels():
    """Reductions use per-program partial buffers summed afterwards: deterministic, so there is
    no separate deterministic mode to select."""
    triton_files = glob.glob(os.path.join(ROOT, "svpt_kernels", "triton", "*.py"))
    cuda_files = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "csrc", "**", "*.cuh"), recursive=True)
    assert len(triton_files) >= 5
    assert no_atomics_in(triton_files, r"\batomic_\w+\s*\(") == []
    assert no_atomics_in(cuda_files, r"\batomic[A-Z]\w*\s*\(|\batomicAdd\b") == []


def train_steps(backend: str, method: str, options: dict, steps: int = 3):
    torch.manual_seed(0)
    model = prompted(method, 3, **options)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    torch.manual_seed(1)  # prompt dropout's stream
    with svpt.backend(backend):
        for step in range(steps):
            x = images(4, seed=step)
            loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    return torch.stack(losses), {k: v.clone() for k, v in svpt.prompt_state_dict(model).items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,options", [("svpt", {"prompt_dropout": 0.2}), ("vpt-deep", {}),
                                            ("cvpt", {"cvpt_position": 2})], ids=["svpt", "vpt-deep", "cvpt"])
def test_two_runs_from_one_seed_are_bit_identical(backend, method, options):
    usable(backend)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        losses_a, prompts_a = train_steps(backend, method, options)
        losses_b, prompts_b = train_steps(backend, method, options)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(losses_a, losses_b), (losses_a, losses_b)
    assert prompts_a.keys() == prompts_b.keys()
    for key in prompts_a:
        assert torch.equal(prompts_a[key], prompts_b[key]), key
    assert losses_a.isfinite().all()


# ================================================================ fp16 + GradScaler
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_overflow_steps_are_skipped_and_no_nan_reaches_the_prompts(backend):
    usable(backend)
    model = prompted("svpt", 3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, growth_interval=1000)
    labels = torch.tensor([0, 1])

    def step(x):
        with svpt.backend(backend), torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    before = {k: v.clone() for k, v in svpt.prompt_state_dict(model).items()}
    step(images())  # a loss scale of 2^40 overflows fp16: inf gradients
    assert scaler.get_scale() == 2.0 ** 39  # the overflow was found and the scale backed off
    after = svpt.prompt_state_dict(model)
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed in a skipped step"
    scaler.update(2.0 ** 8)  # a scale that fits fp16: the next step is taken
    step(images(seed=4))
    after = svpt.prompt_state_dict(model)
    assert scaler.get_scale() == 2.0 ** 8
    assert not torch.equal(before["prompts"], after["prompts"]), "the finite step must update the prompts"
    for key, value in after.items():
        assert value.isfinite().all(), f"non-finite values reached {key}"


# ================================================================ non-finite inputs propagate
NAN_CASES = [  # (op, argument index, position of the NaN)
    ("da_mix", 0, (0, 2, 5)),            # a prompt row of P_out: that row's mix is NaN
    ("da_mix", 0, (1, 6, 0)),            # a patch row: left as it is
    ("prompt_attention", 1, (0, 5, 1, 3)),  # a key: every query of sample 0, head 1
    ("prompt_attention", 2, (1, 0, 0, 0)),  # a value
    ("attention_saliency", 1, (0, 6, 1, 3)),  # a key: every saliency of sample 0
    ("ae_update", 0, (0, 2, 7)),         # a prompt row of h: u, so the k selected rows of sample 0
    ("ae_update", 0, (1, 6, 1)),         # a patch row
    ("prompt_kv_attention", 3, (0, 1, 0, 2)),  # a prompt key, shared by the batch
    ("folded_cross_attention", 0, (1, 2, 3)),  # one token of x
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,index,where", NAN_CASES, ids=[f"{c[0]}-{c[1]}" for c in NAN_CASES])
def test_nan_inputs_propagate_like_the_reference(backend, op, index, where):
    """Documented contract: no value checks; a NaN in an input makes exactly the outputs that
    depend on it non-finite, as in the eager reference, and nothing raises."""
    usable(backend)
    args = valid_inputs()[op]
    poisoned = args[index].clone()
    poisoned[where] = math.nan
    args = replace(args, index, poisoned)
    with svpt.backend(backend):
        got = getattr(ops, op)(*copies(args))
    want = getattr(reference, op)(*copies(args))
    assert (~want.isfinite()).any()
    assert torch.equal(got.isfinite(), want.isfinite())
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_image_gives_nan_logits_for_that_image_only(backend):
    usable(backend)
    model = prompted("svpt", 3)
    x = images(2)
    with svpt.backend(backend):
        clean = model(x)
        x[0, 1, 2, 3] = math.nan
        poisoned = model(x)
    assert poisoned[0].isnan().all()
    assert torch.allclose(poisoned[1], clean[1], rtol=1e-5, atol=1e-6)


# ================================================================ training state
# --backend eager: what is tested here is the run's state, independent of the kernel backends.
TINY = ["--model", "test_vit", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32", "--img-size", "16",
        "--threads", "1", "--progress", "lines", "--backend", "eager"]
RUN = ["--limit-train", "3072", "--limit-eval", "32", "--batch-size", "16", "--epochs", "3", "--seed", "5",
       "--prompt-dropout", "0.1"]


def svpt_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "svpt", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)


def file_digests(run_dir: str) -> dict:
    out = {}
    for name in sorted(os.listdir(run_dir)):
        with open(os.path.join(run_dir, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def rows(path: str) -> list[dict]:
    timing = {"img_per_s", "data_wait_s", "train_s", "eval_s"}
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]


def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL in epoch 2 (after epoch 1's checkpoint): ``svpt train --resume`` continues after
    epoch 1 and ends with exactly the prompts, metrics and step losses of an uninterrupted run."""
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    proc = svpt_cli("train", *TINY, *RUN, "--output", killed)
    seen, deadline = [], time.time() + 240
    try:
        for line in proc.stdout:  # progress lines: "epoch 2/3 40/192 loss ..."
            seen.append(line)
            match = re.match(r"epoch 2/3 (?:step )?(\d+)/(\d+) ", line)
            if match and 0 < int(match.group(1)) < int(match.group(2)):
                proc.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(seen[-20:])
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert not any(line.startswith("epoch 2/3:") for line in seen), "killed after epoch 2 ended"
    assert [r["epoch"] for r in rows(os.path.join(killed, "metrics.jsonl"))] == [1]
    resumed = svpt_cli("train", "--resume", killed)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming {killed} after epoch 1" in out

    assert main(["train", *TINY, *RUN, "--output", whole, "--progress", "none"]) == 0
    checkpoints = sorted(name for name in os.listdir(whole) if name.endswith(".safetensors"))  # the protocol's
    assert "prompts_last.safetensors" in checkpoints
    assert checkpoints == sorted(name for name in os.listdir(killed) if name.endswith(".safetensors"))
    for name in checkpoints:
        a, b = load_file(os.path.join(whole, name)), load_file(os.path.join(killed, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert rows(os.path.join(killed, "metrics.jsonl")) == rows(os.path.join(whole, "metrics.jsonl"))
    assert rows(os.path.join(killed, "steps.jsonl")) == rows(os.path.join(whole, "steps.jsonl"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run stopped after epoch 1 (so that it can be resumed)."""
    run = str(tmp_path_factory.mktemp("state") / "run")
    assert main(["train", *TINY, "--limit-train", "32", "--limit-eval", "16", "--batch-size", "16", "--epochs", "2",
                 "--stop-after-epoch", "1", "--output", run, "--progress", "none"]) == 0
    return run


def corrupt_copy(run: str, tmp_path, how) -> str:
    import shutil
    target = str(tmp_path / "copy")
    shutil.copytree(run, target)
    path = os.path.join(target, "resume.pt")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(how(data))
    return target


@pytest.mark.parametrize("how", [lambda d: d[: len(d) // 2], lambda d: b"", lambda d: d[:100] + b"\0" * (len(d) - 100),
                                 lambda d: os.urandom(len(d))], ids=["truncated", "empty", "zeroed", "random"])
def test_a_corrupted_checkpoint_gives_a_clear_error_and_overwrites_nothing(finished_run, tmp_path, capsys, how):
    run = corrupt_copy(finished_run, tmp_path, how)
    before = file_digests(run)
    code = main(["train", "--resume", run])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot resume: {os.path.join(run, 'resume.pt')} is not readable" in err, err
    assert file_digests(run) == before  # the last good prompts, metrics and config are untouched
    # a fresh run refuses the directory too: it holds a run
    assert main(["train", *TINY, "--output", run, "--epochs", "1"]) == 2
    assert file_digests(run) == before


def test_a_leftover_temporary_file_of_a_killed_write_is_harmless(finished_run, tmp_path):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    with open(os.path.join(run, "resume.pt.abc123.tmp"), "wb") as f:
        f.write(b"half a checkpoint")  # what a kill inside atomic_write leaves behind
    assert main(["train", "--resume", run, "--progress", "none"]) == 0
    assert [r["epoch"] for r in rows(os.path.join(run, "metrics.jsonl"))] == [1, 2]


def test_a_metrics_line_cut_by_a_kill_does_not_block_the_resume(finished_run, tmp_path):
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 2, "step": 4, "lr": 0.0')  # epoch 2's row, cut before its newline
    assert main(["train", "--resume", run, "--progress", "none"]) == 0
    assert [r["epoch"] for r in rows(os.path.join(run, "metrics.jsonl"))] == [1, 2]


def test_a_corrupted_prompt_checkpoint_gives_a_clear_error(finished_run, tmp_path, capsys):
    path = str(tmp_path / "prompts.safetensors")
    with open(os.path.join(finished_run, "prompts_last.safetensors"), "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    model = svpt.prompt(tiny_vit(), "svpt", 3)
    before = copy.deepcopy(svpt.prompt_state_dict(model))
    with pytest.raises(ValueError, match="is not a readable safetensors prompt checkpoint"):
        svpt.load_prompts(model, path)
    assert all(torch.equal(before[k], v) for k, v in svpt.prompt_state_dict(model).items())
    assert main(["eval", "--prompts", path, "--config", os.path.join(finished_run, "config.json")]) == 2
    assert "is not a safetensors prompt checkpoint" in capsys.readouterr().err
