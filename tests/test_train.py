"""``svpt train`` / ``svpt eval`` end to end on CPU: learning on the built-in data, exact
resume, each data format, weights files of each format, and the errors users see."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from svpt.cli import main
from svpt.training import ConfigError
from svpt.training.backbone import create_backbone, load_weights

from test_data import make_fgvc, make_folder, make_vtab

# A tiny timm ViT: 2 blocks, width 32, 4 tokens of 8x8 pixels at 16 px; the eager backend, so
# that these tests of the training machinery do not depend on a compiled extension.
TINY = ["--model", "test_vit", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=32",
        "--img-size", "16", "--threads", "1", "--progress", "lines", "--backend", "eager"]
TINY_KW = dict(patch_size=8, depth=2, embed_dim=32)
TIMING = {"img_per_s", "data_wait_s", "train_s", "eval_s"}


def svpt(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def epochs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def result(run_dir):
    with open(os.path.join(run_dir, "result.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- the default run
def test_default_data_learns_and_eval_scores_the_saved_prompts(tmp_path, capsys):
    run = str(tmp_path / "run")
    code, out, _ = svpt(capsys, "train", "--output", run, "--epochs", "2", "--limit-train", "1024",
                        "--progress", "lines")
    assert code == 0
    assert "protocol final (VPT): train on train+val, evaluate test once, after the last epoch" in out
    rows = epochs(run)
    assert [r["epoch"] for r in rows] == [1, 2] and all("eval_acc" not in r for r in rows)  # test read once
    got = result(run)
    assert got["protocol"] == "final" and got["metric"] == "test accuracy after the last epoch (2)"
    assert got["accuracy"] > 0.45, out  # 4 classes: chance is 0.25
    assert got["eval_images"] == 512 and rows[-1]["train_images"] == 1024
    assert "img/s eta" in out and f"result (protocol final): test accuracy {got['accuracy']:.4f}" in out
    for name in ("config.json", "metrics.csv", "steps.jsonl", "resume.pt", "prompts_last.safetensors"):
        assert os.path.getsize(os.path.join(run, name)) > 0, name
    assert not [f for f in os.listdir(run) if f.startswith("prompts_best")]  # a final run selects nothing
    with open(os.path.join(run, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    code, out, _ = svpt(capsys, "eval", "--prompts", os.path.join(run, "prompts_last.safetensors"), "--json")
    assert code == 0
    scored = json.loads(out.strip().splitlines()[-1])
    assert scored["eval_acc"] == pytest.approx(got["accuracy"]) and scored["split"] == "test"
    assert scored["trained_protocol"] == "final" and scored["trained_selection"] == "last epoch"


# ---------------------------------------------------------------- resume
def test_resume_is_bit_exact(tmp_path, capsys):
    common = ["train", *TINY, "--limit-train", "96", "--limit-eval", "32", "--batch-size", "16", "--epochs", "3",
              "--prompt-dropout", "0.2", "--seed", "3", "--protocol", "max-test"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert svpt(capsys, *common, "--output", whole)[0] == 0
    assert svpt(capsys, *common, "--output", parts, "--stop-after-epoch", "1")[0] == 0
    assert [r["epoch"] for r in epochs(parts)] == [1] and not os.path.exists(os.path.join(parts, "result.json"))
    code, out, _ = svpt(capsys, "train", "--resume", parts, "--stop-after-epoch", "2", "--device-data", "never")
    assert code == 0 and "resuming" in out
    assert svpt(capsys, "train", "--resume", parts)[0] == 0
    for name in ("prompts_last.safetensors", "prompts_best_test.safetensors"):
        a, b = load_file(os.path.join(whole, name)), load_file(os.path.join(parts, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(epochs(whole)) == strip(epochs(parts))
    with open(os.path.join(whole, "steps.jsonl")) as f, open(os.path.join(parts, "steps.jsonl")) as g:
        assert f.read() == g.read()
    a, b = result(whole), result(parts)
    assert a["accuracy"] == b["accuracy"] and a["epoch"] == b["epoch"]


def test_resume_refuses_other_settings_and_fresh_run_refuses_used_dir(tmp_path, capsys):
    run = str(tmp_path / "r")
    args = ["train", *TINY, "--limit-train", "16", "--limit-eval", "16", "--batch-size", "16", "--epochs", "2",
            "--output", run, "--stop-after-epoch", "1"]
    assert svpt(capsys, *args)[0] == 0
    code, _, err = svpt(capsys, "train", "--resume", run, "--lr", "0.5")
    assert code == 2 and "cannot resume" in err and "lr: 0.03 -> 0.5" in err
    code, _, err = svpt(capsys, *args)
    assert code == 2 and f"{run} already holds a run; continue it with --resume {run}" in err


# ---------------------------------------------------------------- data formats through the CLI
@pytest.mark.parametrize("layout", ["flat-folder", "split-folder", "vtab", "fgvc"])
def test_each_data_format_trains(tmp_path, capsys, layout):
    root = str(tmp_path / layout)
    if layout == "flat-folder":
        make_folder(root, per_class=6)
        expect = ("tune", "train", "val", 15, 3)  # no test split: the default protocol is tune
    elif layout == "split-folder":
        make_folder(os.path.join(root, "train"), per_class=4)
        make_folder(os.path.join(root, "val"), per_class=2)
        expect = ("tune", "train", "val", 12, 6)
    elif layout == "vtab":
        make_vtab(root)
        expect = ("final", "train800val200", "test", 6, 6)
    else:
        make_fgvc(root)
        expect = ("final", "train+val", "test", 9, 3)
    run = str(tmp_path / "run")
    code, out, err = svpt(capsys, "train", *TINY, "--data", root, "--epochs", "1", "--batch-size", "4",
                          "--output", run)
    assert code == 0, err
    with open(os.path.join(run, "config.json")) as f:
        resolved = json.load(f)["resolved"]
    got = (resolved["protocol"], resolved["train_split"], resolved["eval_split"], resolved["train_images"],
           resolved["eval_images"])
    assert got == expect
    assert result(run)["eval_images"] == expect[4] and f"protocol {expect[0]}" in out
    assert resolved["augment"] == ("crop-flip" if layout == "fgvc" else "none")


# ---------------------------------------------------------------- weights files
def tiny_reference(seed=7, **kw):
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=5, **{**TINY_KW, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def to_original_npz(model, path):
    """Write a timm ViT in the original JAX ViT .npz layout (the names and shapes timm's
    _load_weights reads), e.g. the layout of ViT-B_16.npz."""
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    a = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    w = {"embedding/kernel": a(model.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": a(model.patch_embed.proj.bias), "cls": a(model.cls_token),
         "Transformer/posembed_input/pos_embedding": a(model.pos_embed),
         "Transformer/encoder_norm/scale": a(model.norm.weight), "Transformer/encoder_norm/bias": a(model.norm.bias),
         "head/kernel": a(model.head.weight.T), "head/bias": a(model.head.bias)}
    for i, blk in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)
        for name, wt, b in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[mha + name + "/kernel"] = a(wt.T.reshape(d, heads, d // heads))
            w[mha + name + "/bias"] = a(b.reshape(heads, d // heads))
        w[mha + "out/kernel"] = a(blk.attn.proj.weight.reshape(d, heads, d // heads).permute(1, 2, 0))
        w[mha + "out/bias"] = a(blk.attn.proj.bias)
        for ln, norm in (("LayerNorm_0", blk.norm1), ("LayerNorm_2", blk.norm2)):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = a(norm.weight), a(norm.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = a(fc.weight.T), a(fc.bias)
    np.savez(path, **w)


def write_weights(model, path):
    if path.endswith(".npz"):
        to_original_npz(model, path)
    elif path.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:
        torch.save({"state_dict": model.state_dict()}, path)  # wrapped, as training scripts save


@pytest.mark.parametrize("ext", [".npz", ".pth", ".safetensors"])
def test_weights_load_from_each_format(tmp_path, ext):
    ref = tiny_reference()
    path = str(tmp_path / f"w{ext}")
    write_weights(ref, path)
    _, _, model = create_backbone("test_vit", TINY_KW, 16)
    load_weights(model, path, "test_vit")
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    got = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_weights_that_do_not_fit(tmp_path, ext, capsys):
    path = str(tmp_path / f"wide{ext}")
    write_weights(tiny_reference(embed_dim=48), path)
    _, _, model = create_backbone("test_vit", TINY_KW, 16)
    detail = "width 48 in the file vs 32 in the model" if ext == ".npz" else \
        r"tensors of another shape \(e.g. cls_token: file \[1, 1, 48\] vs model \[1, 1, 32\].*width 48"
    with pytest.raises(ConfigError, match=rf"--weights '.*wide{ext}' does not fit --model 'test_vit' "
                                          rf"\(depth 2, width 32, patch 8\): .*{detail}"):
        load_weights(model, path, "test_vit")
    code, _, err = svpt(capsys, "train", *TINY, "--weights", path, "--output", str(tmp_path / "run"))
    assert code == 2 and "does not fit --model 'test_vit'" in err


def test_training_from_a_weights_file(tmp_path, capsys):
    path = str(tmp_path / "w.npz")
    write_weights(tiny_reference(), path)
    run = str(tmp_path / "run")
    code, _, err = svpt(capsys, "train", *TINY, "--weights", path, "--epochs", "1", "--limit-train", "32",
                        "--limit-eval", "32", "--output", run)
    assert code == 0, err
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["settings"]["weights"] == path


# ---------------------------------------------------------------- user errors
def test_clear_errors(tmp_path, capsys):
    out = ["--output", str(tmp_path / "run")]
    code, _, err = svpt(capsys, "train", *TINY, "--data", str(tmp_path / "missing"), *out)
    assert code == 2 and "does not exist; give an image folder, a VTAB-1k list directory, an FGVC directory" in err
    code, _, err = svpt(capsys, "train", *TINY, "--eval-split", "valid", *out)
    assert code == 2 and ("--eval-split 'valid' is not a split of this built-in data; accepted: train, val, test, "
                          "train+val") in err
    code, _, err = svpt(capsys, "train", *TINY, "--weights", str(tmp_path / "none.pth"), *out)
    assert code == 2 and "none.pth': no such file" in err
    (tmp_path / "w.ckpt").write_bytes(b"x")
    code, _, err = svpt(capsys, "train", *TINY, "--weights", str(tmp_path / "w.ckpt"), *out)
    assert code == 2 and "unknown format '.ckpt'; accepted: .npz, .pth, .pt, .bin, .safetensors" in err
    code, _, err = svpt(capsys, "train", "--model", "vit_tiny_patch16_244", *out)
    assert code == 2 and "did you mean vit_tiny_patch16_224" in err
    code, _, err = svpt(capsys, "train", *TINY, "--method", "vpt-deep", "--ae-ratio", "0.5", *out)
    assert code == 2 and "option 'ae_ratio' does not apply to method 'vpt-deep'" in err
    code, _, err = svpt(capsys, "eval", "--prompts", str(tmp_path / "p.safetensors"))
    assert code == 2 and "p.safetensors': no such file" in err


def test_unreadable_image_during_training(tmp_path, capsys):
    root = make_folder(str(tmp_path / "f"), classes=("a", "b"), per_class=3)
    for name in os.listdir(os.path.join(root, "a")):
        with open(os.path.join(root, "a", name), "wb") as f:
            f.write(b"not an image")
    code, _, err = svpt(capsys, "train", *TINY, "--data", root, "--workers", "1", "--output", str(tmp_path / "r"))
    assert code == 2 and "cannot read image" in err and f"{os.sep}a{os.sep}" in err


# ---------------------------------------------------------------- DDP (CPU, gloo)
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 processes and the global batch split in halves takes the same steps as
    1 process (step losses equal up to float summation order)."""
    import subprocess
    import sys

    args = [*TINY, "--epochs", "2", "--limit-train", "64", "--limit-eval", "32", "--batch-size", "16",
            "--progress", "none"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        runs[n] = str(tmp_path / f"n{n}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(29500 + n + os.getpid() % 1000), "-m", "svpt", "train", *args, "--output", runs[n]]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(runs[1], "config.json")) as f, open(os.path.join(runs[2], "config.json")) as g:
        assert (json.load(f)["resolved"]["world_size"], json.load(g)["resolved"]["world_size"]) == (1, 2)
    steps = {n: [json.loads(line) for line in open(os.path.join(runs[n], "steps.jsonl"))] for n in runs}
    assert len(steps[1]) == len(steps[2]) == 8
    for a, b in zip(steps[1], steps[2]):
        assert a["lr"] == b["lr"] and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert result(runs[1])["eval_images"] == result(runs[2])["eval_images"] == 32
    assert abs(result(runs[1])["accuracy"] - result(runs[2])["accuracy"]) < 1e-9


# ---------------------------------------------------------------- CUDA-graph steps (run on the GPU: tests/gpu)
def test_cuda_graphs_decision_says_why_not():
    from svpt.training.steps import graphs_decision
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graphs_decision("auto", cuda, False, {}) == (True, "CUDA graphs (one per batch size, captured after "
                                                            "2 eager steps)")
    assert graphs_decision("off", cuda, False, {}) == (False, "eager (--cuda-graphs off)")
    assert graphs_decision("auto", cpu, False, {}) == (False, "eager (the device is cpu, not cuda)")
    used, why = graphs_decision("auto", cuda, True, {"prompt_dropout": 0.1})
    assert not used and why == ("eager (the run is distributed (DDP's gradient hooks run on the host); "
                                "prompt dropout draws random numbers in the step)")
    assert graphs_decision("auto", cuda, False, {"prompt_dropout": 0.0})[0]
    with pytest.raises(ConfigError, match="--cuda-graphs on cannot be used here: prompt dropout draws random"):
        graphs_decision("on", cuda, False, {"prompt_dropout": 0.1})


def test_cuda_graphs_setting_is_checked_and_reported(tmp_path, capsys):
    args = ["train", *TINY, "--limit-train", "16", "--limit-eval", "16", "--batch-size", "8", "--epochs", "1"]
    code, _, err = svpt(capsys, *args, "--cuda-graphs", "on", "--output", str(tmp_path / "on"))
    assert code == 2 and "--cuda-graphs on cannot be used here: the device is cpu, not cuda" in err
    assert not os.path.exists(tmp_path / "on")  # refused before any work
    code, out, _ = svpt(capsys, *args, "--output", str(tmp_path / "auto"))
    assert code == 0 and "training steps: eager (the device is cpu, not cuda)" in out
    assert "training steps of this process: 2 eager steps" in out
    with open(tmp_path / "auto" / "config.json") as f:
        assert json.load(f)["resolved"]["training_steps"] == "eager (the device is cpu, not cuda)"


# ---------------------------------------------------------------- files written in the background
def test_background_writer_keeps_order_and_raises_a_failed_write():
    from svpt.training.writer import BackgroundWriter
    writer, done = BackgroundWriter(), []
    for i in range(5):
        writer.submit(done.append, i)
    writer.flush()
    assert done == [0, 1, 2, 3, 4]

    def fail():
        raise OSError("disk full")
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):  # or at the next hand-over, once it has failed
        for _ in range(1000):
            writer.submit(done.append, None)
            time.sleep(0.001)
    writer.close()
    inline = BackgroundWriter(threaded=False)  # on a CPU: written at once, in the run's thread
    inline.submit(done.append, "now")
    assert done[-1] == "now"
    with pytest.raises(OSError, match="disk full"):
        inline.submit(fail)


def test_resume_state_is_a_host_copy(tmp_path):
    """resume.pt's contents are copied when the epoch ends: the steps after it change the
    optimizer's buffers in place while the writer's thread is still pickling."""
    from svpt.training.state import load_resume, resume_state, write_resume
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = resume_state(epoch=1, step=1, trainable={"p": p}, optimizer=opt, scheduler=sched, rng=[{"cpu": None}],
                         best={"epoch": 1}, last={}, config={})
    opt.step()  # changes p and its momentum buffer in place
    write_resume(str(tmp_path / "resume.pt"), state)
    saved = load_resume(str(tmp_path / "resume.pt"))
    assert torch.equal(saved["trainable"]["p"], torch.full((3,), 0.9))
    assert torch.equal(saved["optimizer"]["state"][0]["momentum_buffer"], torch.ones(3))


def test_test_split_decoding_starts_after_the_graphs_are_captured():
    """A final run on CUDA decodes its test split during the training, from the first epoch in
    which every batch size's graph is captured; not on a CPU, not in runs that stop early or
    evaluate every epoch."""
    from types import SimpleNamespace

    from svpt.training.config import TrainConfig
    from svpt.training.loop import _test_decoding_epoch
    from svpt.training.steps import WARMUP
    cuda, cpu = SimpleNamespace(device=torch.device("cuda")), SimpleNamespace(device=torch.device("cpu"))
    final, tune = SimpleNamespace(protocol="final"), SimpleNamespace(protocol="tune")
    cfg = TrainConfig(epochs=100)
    assert _test_decoding_epoch(cfg, final, cuda, 0) == WARMUP + 2 == 4
    assert _test_decoding_epoch(cfg, final, cuda, 50) == 54  # resumed: the graphs are captured again
    assert _test_decoding_epoch(TrainConfig(epochs=2), final, cuda, 0) == 2
    assert _test_decoding_epoch(TrainConfig(epochs=100, stop_after_epoch=200), final, cuda, 0) == 4
    assert _test_decoding_epoch(TrainConfig(epochs=100, stop_after_epoch=10), final, cuda, 0) is None
    assert _test_decoding_epoch(cfg, tune, cuda, 0) is None
    assert _test_decoding_epoch(cfg, final, cpu, 0) is None
