"""End to end: one training step (forward, backward, AdamW) per method x backend, against
the baselines users can run today (see baselines.py), each with and without torch.compile.

    pytest benchmarks/test_train_step.py --benchmark-only --benchmark-json=out.json
"""
from __future__ import annotations

import pytest
import torch

import svpt
from baselines import NoPromptFloor, PlainSVPT, TimmVPTDeep
from harness import CUDA, SETTING, measure, train_step

# torch.compile of one ViT train step takes ~100 s on 2 CPU cores, so the compiled rows run
# on CUDA only, where they are the baselines that matter; CPU keeps the suite within minutes.
MODES = [False, True] if CUDA else [False]
BASELINES = {
    "floor-no-prompts": lambda vit, m: NoPromptFloor(vit),
    "timm-vpt-deep": TimmVPTDeep,
    "plain-svpt-sdpa": PlainSVPT,
}


def _id(*parts) -> str:
    """Test ids select parts of the suite: -k "compiled and M50", -k "svpt-triton-M50"."""
    *names, num_prompts, compiled = parts
    return "-".join([*names, f"M{num_prompts}", "compiled" if compiled else "eager-mode"])


def _baseline_params():
    """Every baseline at every M, with and without compile; the floor has no prompts, so once."""
    params = []
    for baseline in BASELINES:
        for m in ((0,) if baseline == "floor-no-prompts" else SETTING.prompts):
            params += [pytest.param(baseline, m, c, id=_id(baseline, m, c)) for c in MODES]
    return params


def _svpt_params():
    """Each method x backend x M without compile; compiled: the fused path (Triton, whose ops must
    trace) and the straightforward research SVPT (eager backend), the rows users compare; the C++
    extension's CUDA kernels are slower than eager (README), so they are not compiled too."""
    params = []
    for method in svpt.METHODS:
        for backend in svpt.available_backends(SETTING.device):
            for m in SETTING.prompts:
                for c in MODES:
                    if not c or backend == "triton" or (backend == "eager" and method == "svpt"):
                        params.append(pytest.param(method, backend, m, c, id=_id(method, backend, m, c)))
    return params


def _run(benchmark, model, compiled: bool, **info):
    model = model.to(SETTING.device)
    if compiled:
        model = torch.compile(model)
    images, labels = SETTING.images()
    measure(benchmark, train_step(model, images, labels), SETTING.batch, compiled=compiled, **info)


@pytest.mark.parametrize("baseline, num_prompts, compiled", _baseline_params())
def test_baseline(benchmark, baseline, num_prompts, compiled):
    model = BASELINES[baseline](SETTING.vit(), num_prompts)
    _run(benchmark, model, compiled, row=baseline, num_prompts=num_prompts)


@pytest.mark.parametrize("method, backend, num_prompts, compiled", _svpt_params())
def test_svpt(benchmark, method, backend, num_prompts, compiled):
    """svpt's methods; ``svpt`` on ``eager`` is the research-code SVPT (probabilities materialised)."""
    model = svpt.prompt(SETTING.vit(), method, num_prompts)
    with svpt.backend(backend):
        _run(benchmark, model, compiled, row=f"svpt:{method}", backend=backend, num_prompts=num_prompts)


SWEEP_PROMPTS = (1, 10, 25, 50, 100, 200)
SWEEP_BATCH = (1, 16, 64, 128, 256)
cuda_only = pytest.mark.skipif(not CUDA, reason="sweeps are GPU measurements (ViT-B/16 sizes)")


@cuda_only
@pytest.mark.parametrize("num_prompts", SWEEP_PROMPTS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_prompt_sweep(benchmark, backend, num_prompts):
    model = svpt.prompt(SETTING.vit(), "svpt", num_prompts)
    with svpt.backend(backend):
        _run(benchmark, model, False, row="sweep:prompts", backend=backend, num_prompts=num_prompts)


@cuda_only
@pytest.mark.parametrize("batch", SWEEP_BATCH)
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_batch_sweep(benchmark, backend, batch):
    model = svpt.prompt(SETTING.vit(), "svpt", 50).to(SETTING.device)
    images, labels = SETTING.images(batch)
    with svpt.backend(backend):
        measure(benchmark, train_step(model, images, labels), batch, compiled=False,
                row="sweep:batch", backend=backend, num_prompts=50)
