"""Does each exact fast path pay on CPU with the C++ backend? (decides ``svpt_kernels.cpp.FAST_PATHS``)

    PYTHONPATH=. python benchmarks/cpp_cpu_fast_paths.py > benchmarks/results/cpp_cpu_fast_paths.txt

One training step (forward + backward + AdamW over the trainable tensors), float32, of timm's
vit_tiny_patch16_224 (random init, no download) at 224 x 224 (the resolution of the papers:
196 patches), for VPT-deep M=50 and CVPT M=10 on backend "cpp", with the method's fast path
(``prompt_kv_attention`` / ``folded_cross_attention``) and with its plain path
(``svpt.backends.fast_paths(False)``). The fast path is forced on here whatever FAST_PATHS says,
and every step checks which path ran (the fast-path op is counted).

Timing on a shared 2-core machine is noisy (other processes take the cores for seconds at a
time), so the fast and plain steps of a method are paired: each round runs them back to back
(alternating which goes first), and the verdict is the median over rounds of plain time / fast
time; medians and minima per configuration are shown too. A per-block breakdown (one block's
forward + backward at the same shapes, the part the fast path changes, many short repetitions)
backs it up.
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svpt  # noqa: E402
from svpt.methods.base import insert_prompts  # noqa: E402
from svpt.methods.cvpt import folded_weights  # noqa: E402
from svpt_kernels import cpp  # noqa: E402

FAST_OP = {"vpt-deep": "prompt_kv_attention", "cvpt": "folded_cross_attention"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def counting(name: str, counts: dict):
    """cpp's ``name`` op, counting its calls in ``counts[name]``."""
    real = getattr(cpp, name)

    def op(*args):
        counts[name] = counts.get(name, 0) + 1
        return real(*args)
    return op


def prompted_vit(method: str, prompts: int, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, img_size=img_size)
    with contextlib.redirect_stdout(sys.stderr):  # svpt.prompt prints a summary; stdout is the result
        return svpt.prompt(model, method, prompts)


def make_step(model: torch.nn.Module, args):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 100, (args.batch,))

    def step():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_block(model: torch.nn.Module, method: str, batch: int):
    """One block's forward + backward (block 1), as the method runs it: ``fn(fast)``."""
    prompter, blk = model.prompter, model.blocks[1]
    x = torch.randn(batch, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim)
    kernels = prompter.kernels(x, model.blocks)
    with_prompts = insert_prompts(x, prompter.prompts[0].detach().expand(batch, -1, -1), 1)

    def fn(fast: bool) -> None:
        rows = prompter.layer_rows()  # per call, as per forward: the optimizer steps the prompts in place
        if method == "vpt-deep" and fast:
            out = prompter.kv_only_block(1, blk, x.requires_grad_(), kernels, rows)
        elif method == "vpt-deep":  # the plain block sees the prompt rows
            out = prompter.block(1, blk, with_prompts.requires_grad_(), kernels, rows)
        else:  # CVPT folds every block's prompts once per step, then runs block 1 with them
            folded = (tuple(None if t is None else t.unbind(0) for t in folded_weights(model.blocks, prompter.prompts))
                      if fast else None)
            out = prompter.block(1, blk, x.requires_grad_(), kernels, rows, folded=folded)
        out.sum().backward()
    return fn


def paired(runs: int, fast_fn, plain_fn) -> tuple[list[float], list[float]]:
    """Seconds of ``runs`` fast and plain calls, measured in back-to-back pairs (alternating order)."""
    fast, plain = [], []
    for i in range(runs):
        order = [(fast_fn, fast), (plain_fn, plain)]
        for fn, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return fast, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--vpt-prompts", type=int, default=50)
    parser.add_argument("--cvpt-prompts", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed (fast, plain) step pairs per method")
    parser.add_argument("--block-runs", type=int, default=30, help="timed (fast, plain) block pairs per method")
    args = parser.parse_args()
    reason = cpp.why_unusable("cpu")
    if reason is not None:
        raise SystemExit(f"backend 'cpp' is not usable: {reason}")
    counts: dict[str, int] = {}
    for name in FAST_OP.values():
        setattr(cpp, name, counting(name, counts))
    cpp.FAST_PATHS = {"cpu": tuple(FAST_OP.values())}  # measure both, whatever is listed today

    def on_path(method: str, fast: bool, fn, calls: int):
        """``fn`` run on backend cpp with the fast path on or off, checking the fast-path op's calls."""
        def run():
            op = FAST_OP[method]
            before = counts.get(op, 0)
            with svpt.backend("cpp"), svpt.backends.fast_paths(fast):
                fn()
            ran = counts.get(op, 0) - before
            assert ran == (calls if fast else 0), f"{method} fast={fast}: {op} ran {ran} times"
        return run

    results = {}
    for method, prompts in (("vpt-deep", args.vpt_prompts), ("cvpt", args.cvpt_prompts)):
        fast_model, plain_model = (prompted_vit(method, prompts, args.img_size) for _ in range(2))
        depth = len(fast_model.blocks)
        fast_step = on_path(method, True, make_step(fast_model, args), depth)
        plain_step = on_path(method, False, make_step(plain_model, args), depth)
        block = make_block(fast_model, method, args.batch)
        fast_block, plain_block = on_path(method, True, lambda: block(True), 1), on_path(
            method, False, lambda: block(False), 1)
        paired(args.warmup, fast_step, plain_step)
        paired(2, fast_block, plain_block)
        results[method] = dict(prompts=prompts, steps=paired(args.steps, fast_step, plain_step),
                               blocks=paired(args.block_runs, fast_block, plain_block))

    print("$ PYTHONPATH=. python " + " ".join(sys.argv))
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}; "
          f"vit_tiny_patch16_224 (random init) at {args.img_size}x{args.img_size}, batch {args.batch}, float32, "
          f"backend cpp")
    print(f"# extension: {cpp.build_info()}")
    print(f"# training step (forward + backward + AdamW): {args.steps} (fast, plain) pairs after {args.warmup} "
          f"warm-up pairs; one block (block 1) forward + backward: {args.block_runs} pairs")
    print()
    print(f"{'method':<9} {'M':>3}  {'what':<6} {'fast: median':>12} {'min':>9} {'plain: median':>13} {'min':>9}  "
          "plain/fast per pair: median (range)")
    verdicts = []
    for method, r in results.items():
        for what, fmt in (("step", lambda t: f"{t:.3f} s"), ("block", lambda t: f"{t * 1e3:.1f} ms")):
            fast, plain = r["steps" if what == "step" else "blocks"]
            ratios = [p / f for f, p in zip(fast, plain)]
            print(f"{method:<9} {r['prompts']:>3}  {what:<6} {fmt(statistics.median(fast)):>12} {fmt(min(fast)):>9} "
                  f"{fmt(statistics.median(plain)):>13} {fmt(min(plain)):>9}  {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")
        step_ratio = statistics.median(p / f for f, p in zip(*r["steps"]))
        verdicts.append(f"{FAST_OP[method]}: training step {step_ratio:.2f}x faster with the fast path -> "
                        + ("pays: list it" if step_ratio > 1 else "does not pay: leave it out"))
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
