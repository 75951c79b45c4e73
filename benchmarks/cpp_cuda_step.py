"""The C++/CUDA backend against the Triton backend on a GPU: op correctness, then training steps.

    python benchmarks/cpp_cuda_step.py benchmarks/results/cpp_cuda_step_h200.txt

Builds nothing: it expects svpt installed with the extension's CUDA kernels
(``pip install --no-build-isolation --no-deps -e .`` on the GPU machine) and stops, saying why,
if they are not there.

1. Correctness: each op of the cpp backend's own CUDA kernels (svpt_kernels.cpp called directly,
   so no hand-over hides a kernel) in float32 and bfloat16, output and the gradient of every
   differentiable input, against the float64 reference (svpt.reference) on the same rounded
   inputs. Pass: float32 relative error < 1e-4 (METHOD.md); bfloat16 at most twice the eager
   bfloat16 error plus 1e-3 (FlashAttention's rule with a floor for errors near zero).
2. Steps: ViT-B/16 (random init), batch 128, bf16 autocast, forward + backward + AdamW, for SVPT
   M=50, VPT-deep M=50, CVPT M=10 on backends cpp and triton, not compiled and compiled
   (torch.compile of the model). Per configuration: warm-up steps (compilation included), then
   CUDA-event timing of single steps, median; the step's memory (the allocator's peak over three
   steps minus what was allocated before them: both backends' models are alive, so this leaves
   the weights out and is stricter than the absolute peak); the implementation each op ran on
   (svpt.backends.trace). Not compiled, the two backends of a method are timed in alternating
   rounds; compiled, one after the other. Targets (issue 18): cpp within 1.15x of triton's time and
   1.05x of its memory.

Prints the tables and writes them to the given file, with the command and the versions.
``--methods`` takes a subset; ``--skip-compiled`` / ``--only-compiled`` split the run (each compiled configuration compiles a
ViT-B training step: about a minute). ``--no-cudnn-attention`` turns torch's cuDNN attention off
first, so cpp's 16-bit VPT-deep attention runs FlashAttention (the A/B of the two, in two processes).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import svpt  # noqa: E402
from fast_path_step import make_step, timed  # noqa: E402  (the same step and timing as that record)
from svpt import reference  # noqa: E402

TIME_TARGET, MEMORY_TARGET = 1.15, 1.05
METHODS = (("svpt", 50), ("vpt-deep", 50), ("cvpt", 10))
DEVICE = "cuda"


# --------------------------------------------------------------------------- correctness
def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def _op_cases():
    """name -> (function name, inputs (float64, CPU), non-tensor arguments, index of the in-place
    buffer or None). Shapes: B 4, 1 prefix + 10 prompts + 64 patches, 4 heads of 64."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return scale * torch.randn(shape, generator=gen, dtype=torch.float64)

    b, m, n, h, d = 4, 10, 64, 4, 64
    t, width = 1 + m + n, h * d
    scale = d ** -0.5
    saliency = torch.randperm(b * n, generator=gen).reshape(b, n).float() / (b * n)
    return {
        "da_mix": ("da_mix", [r(b, t, width), r(1, m, width), r(2, width, scale=0.05), r()], (1,), 0),
        "ae_update": ("ae_update", [r(b, t, width), saliency, r()], (1, m, n // 4), 0),
        "attention_saliency cls": ("attention_saliency", [r(b, t, h, d), r(b, t, h, d)], (scale, (0, 1), 1 + m), None),
        "attention_saliency prompts": ("attention_saliency", [r(b, t, h, d), r(b, t, h, d)],
                                       (scale, (1, m), 1 + m), None),
        "prompt_attention": ("prompt_attention", [r(b, t, h, d), r(b, t, h, d), r(b, t, h, d)], (scale,), None),
        "prompt_attention kv batch 1": ("prompt_attention", [r(b, t, h, d), r(1, m, h, d), r(1, m, h, d)], (scale,),
                                        None),
        "prompt_kv_attention": ("prompt_kv_attention", [r(b, 1 + n, h, d), r(b, 1 + n, h, d), r(b, 1 + n, h, d),
                                                        r(1, m, h, d), r(1, m, h, d)], (scale,), None),
        "folded_cross_attention": ("folded_cross_attention", [r(b, 1 + n, width), r(h, m, width, scale=0.05), r(h, m),
                                                              r(h, m, width, scale=0.05), r(width)], (), None),
    }


def _run_op(fn, inputs, args, buffer, dtype, rounded_to, cotangent_seed=1):
    """Output and input gradients of ``fn`` on ``inputs`` cast to ``dtype`` on the GPU, for a fixed
    random cotangent rounded to ``rounded_to`` (the tested dtype: the reference sees the same one)."""
    leaves = [t.to(DEVICE, dtype if t.dtype == torch.float64 else t.dtype).requires_grad_(t.dtype == torch.float64)
              for t in inputs]
    call = [x * 1 if i == buffer else x for i, x in enumerate(leaves)]  # in place ops: on a copy
    if fn.__name__ == "folded_cross_attention":  # CVPT calls it with the input as residual
        out = fn(*call, residual=call[0])
    else:
        out = fn(*call, *args)
    diff = [x for x in leaves if x.requires_grad]
    if not out.requires_grad:  # attention_saliency: no gradient
        return out, []
    gen = torch.Generator(device=DEVICE).manual_seed(cotangent_seed)
    cotangent = torch.randn(out.shape, generator=gen, device=DEVICE, dtype=torch.float64).to(rounded_to).to(out.dtype)
    return out, list(torch.autograd.grad(out, diff, cotangent.clone(), allow_unused=True))


def check_ops() -> tuple[list[str], bool]:
    from svpt_kernels import cpp
    lines = [f"{'op':<28} {'dtype':<9} {'worst rel err':>14} {'bound':>10}  verdict", ""]
    ok = True
    for name, (fn_name, inputs, args, buffer) in _op_cases().items():
        for dtype in (torch.float32, torch.bfloat16):
            # the float64 reference on the inputs rounded to the tested dtype
            rounded = [x.to(dtype).double() if x.dtype == torch.float64 else x for x in inputs]
            want = _run_op(getattr(reference, fn_name), rounded, args, buffer, torch.float64, dtype)
            got = _run_op(getattr(cpp, fn_name), rounded, args, buffer, dtype, dtype)
            errors = [_rel(g, w) for g, w in zip([got[0], *got[1]], [want[0], *want[1]])]
            if dtype == torch.float32:
                bounds = [1e-4] * len(errors)
            else:
                eager = _run_op(getattr(reference, fn_name), rounded, args, buffer, dtype, dtype)
                bounds = [2 * _rel(e, w) + 1e-3 for e, w in zip([eager[0], *eager[1]], [want[0], *want[1]])]
            passed = all(e <= bd for e, bd in zip(errors, bounds))
            ok &= passed
            worst = max(range(len(errors)), key=lambda i: errors[i] / bounds[i])
            lines.append(f"{name:<28} {str(dtype).replace('torch.', ''):<9} {errors[worst]:>14.2e} "
                         f"{bounds[worst]:>10.2e}  {'pass' if passed else 'FAIL'}")
    return lines, ok


# --------------------------------------------------------------------------------- steps
def _model(method: str, num_prompts: int):
    import timm
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    return svpt.prompt(vit, method, num_prompts).to(DEVICE)


def _memory(step) -> float:
    """The step's own memory in GiB: the allocator's peak over three steps minus what was allocated
    before them (other models alive in the process are left out)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 30


def measure_method(method: str, num_prompts: int, compiled: bool, args) -> list[dict]:
    """Both backends for one method and mode. Not compiled: timed in alternating rounds. Compiled:
    one backend after the other, each inside one svpt.backend block (switching backends clears
    svpt's kernel cache, which the compiled graphs guard on: alternating would recompile)."""
    torch._dynamo.reset()
    images = torch.randn(args.batch, 3, 224, 224, device=DEVICE)
    labels = torch.randint(0, 100, (args.batch,), device=DEVICE)
    rows = []
    for backend in ("cpp", "triton"):
        model = _model(method, num_prompts)
        with svpt.backend(backend):
            # what runs, from an eager-mode forward (compile traces the same Python)
            with svpt.backends.trace() as log, torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
                model(images)
        rows.append(dict(method=method, M=num_prompts, backend=backend, compiled=compiled, times=[],
                         ran=sorted(set(log)),
                         step=make_step(torch.compile(model) if compiled else model, images, labels)))

    def warm_up(row):
        for _ in range(args.warmup):  # compilation included
            row["step"]()
        torch.cuda.synchronize()

    if compiled:
        for row in rows:
            with svpt.backend(row["backend"]):
                warm_up(row)
                row["times"] = [timed(row["step"]) for _ in range(args.iters)]
                row["step_gib"] = _memory(row["step"])
    else:
        for row in rows:
            with svpt.backend(row["backend"]):
                warm_up(row)
        for _ in range(args.iters):
            for row in rows:
                with svpt.backend(row["backend"]):
                    row["times"].append(timed(row["step"]))
        for row in rows:
            with svpt.backend(row["backend"]):
                row["step_gib"] = _memory(row["step"])
    for row in rows:
        row["median_ms"] = statistics.median(row["times"])
        del row["step"]
    torch.cuda.empty_cache()
    return rows


def step_table(rows: list[dict]) -> list[str]:
    lines = [f"{'method':<9} {'M':>3} {'compiled':<8} {'backend':<7} {'median ms':>10} {'step GiB':>9} "
             f"{'cpp/triton time':>16} {'memory':>7}  verdict (time <= {TIME_TARGET}x, memory <= {MEMORY_TARGET}x)", ""]
    for row in rows:
        verdict, ratio_t, ratio_m = "", "", ""
        if row["backend"] == "cpp":
            tri = next(r for r in rows if r["backend"] == "triton" and r["method"] == row["method"]
                       and r["compiled"] == row["compiled"])
            t, m = row["median_ms"] / tri["median_ms"], row["step_gib"] / tri["step_gib"]
            ratio_t, ratio_m = f"{t:.3f}x", f"{m:.3f}x"
            verdict = "met" if t <= TIME_TARGET and m <= MEMORY_TARGET else "MISSED"
        lines.append(f"{row['method']:<9} {row['M']:>3} {'yes' if row['compiled'] else 'no':<8} {row['backend']:<7} "
                     f"{row['median_ms']:>10.1f} {row['step_gib']:>9.2f} {ratio_t:>16} {ratio_m:>7}  {verdict}")
    lines += ["", "what ran (op: implementation), per configuration:"]
    for row in rows:
        ran = ", ".join(f"{op}: {impl}" for op, impl in row["ran"])
        lines.append(f"  {row['method']} {row['backend']} {'compiled' if row['compiled'] else 'eager-mode'}: {ran}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="text file to write")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--skip-compiled", action="store_true", help="only the not-compiled steps")
    mode.add_argument("--only-compiled", action="store_true", help="only the compiled steps")
    parser.add_argument("--skip-ops", action="store_true", help="no op correctness check")
    parser.add_argument("--methods", default=",".join(m for m, _ in METHODS),
                        help="comma-separated subset of " + ", ".join(m for m, _ in METHODS))
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="turn torch's cuDNN attention off first (torch.backends.cuda.enable_cudnn_sdp(False)), "
                             "so that cpp's VPT-deep runs FlashAttention: the A/B of the two ATen kernels")
    args = parser.parse_args()
    methods = [(m, n) for m, n in METHODS if m in args.methods.split(",")]
    unknown = set(args.methods.split(",")) - {m for m, _ in METHODS}
    if unknown or not methods:
        parser.error(f"--methods: unknown {sorted(unknown)}; accepted: {', '.join(m for m, _ in METHODS)}")
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    from svpt_kernels import cpp
    reason = cpp.why_unusable(DEVICE)
    if reason is not None:
        raise SystemExit(f"the cpp backend cannot run on CUDA here: {reason}")
    torch.backends.cuda.matmul.allow_tf32 = False  # the op check needs full fp32 products
    lines = [f"$ python {' '.join(sys.argv)}",
             f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{__import__('triton').__version__}, timm {__import__('timm').__version__}, python "
             f"{platform.python_version()}; extension: {cpp.build_info()}; cpp's 16-bit VPT-deep attention: "
             f"{cpp.fused_kv_kernel(DEVICE)}"]
    ok = True
    if not args.skip_ops:
        op_lines, ok = check_ops()
        lines += ["", "1. cpp CUDA kernels vs the float64 reference", *op_lines]
        print("\n".join(lines), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # bf16 autocast: the fp32 leftovers may use tf32
    modes = [c for c in (False, True) if not (c and args.skip_compiled) and not (not c and args.only_compiled)]
    rows = []
    for compiled in modes:
        for method, num_prompts in methods:
            measured = measure_method(method, num_prompts, compiled, args)
            rows += measured  # printed now too: a run stopped at a time limit keeps what it measured
            print("\n".join(step_table(measured)[2:2 + len(measured)]), flush=True)
    lines += ["", f"2. training step, ViT-B/16, batch {args.batch}, bf16 autocast; median of {args.iters} "
              f"steps after {args.warmup} warm-up", *step_table(rows)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if not ok:
        raise SystemExit("some cpp CUDA kernel failed its correctness bound (table above)")


if __name__ == "__main__":
    main()
