"""``svpt train``'s CUDA-graph training steps (svpt/training/steps.py) on the GPU: for every
method and backend that runs on CUDA, a run whose steps replay CUDA graphs (both batch sizes of
the epoch, the full one and the last, partial one) computes exactly what the eager run
computes: the same step losses, epoch metrics and saved prompts, bit for bit."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from svpt import backends
from svpt.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = ["--model", "test_vit", "--model-kwargs", "patch_size=8", "depth=2", "embed_dim=64", "--img-size", "32",
        "--progress", "none", "--device", "cuda"]
# 100 images in batches of 32: 3 full batches and one of 4 per epoch; over 4 epochs both sizes
# pass their WARMUP eager steps and are then replayed.
RUN = ["--limit-train", "100", "--limit-eval", "48", "--batch-size", "32", "--epochs", "4", "--optimizer", "sgd",
       "--lr", "0.5"]
BACKENDS = [name for name in backends.available_backends(torch.device("cuda")) if name != "auto"] \
    if torch.cuda.is_available() else []
TIMING = {"img_per_s", "data_wait_s", "train_s", "eval_s"}


def _run(tmp_path, capsys, method: str, backend: str, graphs: str, *extra: str) -> tuple[str, str]:
    out_dir = str(tmp_path / graphs)
    code = main(["train", *TINY, *RUN, "--method", method, "--num-prompts", "4", "--backend", backend,
                 "--cuda-graphs", graphs, "--output", out_dir, "--protocol", "max-test", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out_dir, out


def _read(run_dir: str, name: str) -> list[dict]:
    with open(os.path.join(run_dir, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


# Besides every method and backend on the default path (bf16 autocast, images kept on the GPU):
# full fp32, and batches from a DataLoader (pinned host memory copied into the graph's input).
VARIANTS = {"": [], "fp32": ["--no-amp"], "loader": ["--device-data", "never", "--workers", "2"]}
CASES = [(m, b, "") for m in ("svpt", "vpt-deep", "cvpt", "vpt-shallow") for b in BACKENDS] + \
        [("svpt", b, v) for v in ("fp32", "loader") for b in BACKENDS]


@pytest.mark.parametrize("method,backend,variant", CASES)
def test_graph_steps_compute_what_eager_steps_compute(tmp_path, capsys, method, backend, variant):
    graphed, graphed_out = _run(tmp_path, capsys, method, backend, "on", *VARIANTS[variant])
    eager, eager_out = _run(tmp_path, capsys, method, backend, "off", *VARIANTS[variant])
    # 16 steps: per batch size 2 eager ones, then replays (3 x 4 - 2 + 4 - 2 = 12).
    assert "training steps of this process: 4 eager steps, 12 replayed from CUDA graphs (batch sizes 32, 4)" \
        in graphed_out, graphed_out
    assert "training steps of this process: 16 eager steps" in eager_out
    assert _read(graphed, "steps.jsonl") == _read(eager, "steps.jsonl")
    assert _read(graphed, "metrics.jsonl") == _read(eager, "metrics.jsonl")
    for name in ("prompts_last.safetensors", "prompts_best_test.safetensors"):
        a, b = load_file(os.path.join(graphed, name)), load_file(os.path.join(eager, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_final_run_decodes_the_test_split_during_training_with_graphs(tmp_path, capsys):
    """A final run's test loader starts decoding once every graph is captured (its pin-memory
    thread must not disturb a capture): over 6 epochs the last batch size is captured in epoch 3
    and the test split is read from epoch 4 on; the result equals the eager run's."""
    outs, results = {}, {}
    for graphs in ("on", "off"):
        run_dir = tmp_path / graphs
        assert main(["train", *TINY, *RUN, "--epochs", "6", "--protocol", "final", "--workers", "2",
                     "--cuda-graphs", graphs, "--output", str(run_dir)]) == 0
        outs[graphs] = capsys.readouterr().out
        with open(run_dir / "result.json") as f:
            results[graphs] = json.load(f)
        assert "evaluation test: 48 images through a DataLoader with 2 workers" in outs[graphs]
    assert "4 eager steps, 20 replayed from CUDA graphs (batch sizes 32, 4)" in outs["on"], outs["on"]
    assert (results["on"]["accuracy"], results["on"]["loss"]) == (results["off"]["accuracy"], results["off"]["loss"])
    assert _read(str(tmp_path / "on"), "steps.jsonl") == _read(str(tmp_path / "off"), "steps.jsonl")
