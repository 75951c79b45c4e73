"""Each op of svpt.ops on CPU, backend "cpp" against "eager", forward and forward+backward.

    python benchmarks/cpp_cpu_ops.py benchmarks/results/cpp_cpu_ops.txt

Shapes of the CPU op benchmark (benchmarks/test_ops.py): B 8, T = 1 + 10 + 16, 3 heads of 64,
float32; the fast-path ops at their methods' shapes (prompt_kv_attention: the 1 + N image
tokens' queries and an M-prompt segment shared by the batch; folded_cross_attention: CVPT M = 10,
the input as residual). The ops are called through svpt.ops, as a user calls them. The in-place
ops (da_mix, ae_update) get a fresh copy of their buffer per call, in both backends alike: the
"copy" row is that copy alone. Rounds alternate between the backends so that load from other
processes hits both alike; each cell is the best round's mean time per call (the round least
disturbed by other processes on a shared machine), the median round's in brackets.
Prints the table and writes it to the given file with the command and the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import svpt  # noqa: E402
from svpt import ops  # noqa: E402

B, M, N, H, D = 8, 10, 16, 3, 64
NUM_PREFIX, WIDTH, CVPT_M = 1, H * D, 10
T = NUM_PREFIX + M + N
BACKENDS = ("eager", "cpp")


def _t(*shape, scale=1.0, grad=True):
    return (scale * torch.randn(*shape)).requires_grad_(grad)


def cases():
    """name -> (function of nothing returning the output to differentiate, the leaves)."""
    torch.manual_seed(0)
    tokens, prompts, weight, bias = _t(B, T, WIDTH), _t(1, M, WIDTH), _t(2, WIDTH, scale=0.1), _t(())
    qkv = _t(B, T, 3, H, D)
    q, k, v = qkv.unbind(2)
    kv_q, kv_k, kv_v = _t(B, T - M, 3, H, D).unbind(2)
    pk, pv = _t(1, M, H, D), _t(1, M, H, D)
    saliency = torch.rand(B, N)
    ae_scale = _t(())
    x = _t(B, T - M, WIDTH)
    wl, bl, wv, out_bias = _t(H, CVPT_M, WIDTH, scale=WIDTH ** -0.5), _t(H, CVPT_M), _t(H, CVPT_M, WIDTH), _t(WIDTH)
    scale = D ** -0.5
    return {
        "copy": (lambda: tokens * 1, [tokens]),
        "da_mix": (lambda: ops.da_mix(tokens * 1, prompts, weight, bias, NUM_PREFIX), [tokens, prompts, weight, bias]),
        "ae_update": (lambda: ops.ae_update(tokens * 1, saliency, ae_scale, NUM_PREFIX, M, round(0.25 * N)),
                      [tokens, ae_scale]),
        "attention_saliency": (lambda: ops.attention_saliency(q, k, scale, (0, 1), NUM_PREFIX + M), []),
        "prompt_attention": (lambda: ops.prompt_attention(q, k, v, scale), [qkv]),
        "prompt_kv_attention": (lambda: ops.prompt_kv_attention(kv_q, kv_k, kv_v, pk, pv, scale), [pk, pv]),
        "folded_cross_attention": (lambda: ops.folded_cross_attention(x, wl, bl, wv, out_bias, x), [x, wl, bl, wv]),
    }


def runner(fn, leaves, backward: bool):
    grad_out = None

    def run():
        nonlocal grad_out
        out = fn()
        if backward:
            if grad_out is None:
                grad_out = torch.randn_like(out)
            torch.autograd.grad(out, leaves, grad_out.clone())
    return run


def measure(rounds: int, calls: int) -> dict:
    """{(case, pass): {backend: median seconds per call}}."""
    results = {}
    for name, (fn, leaves) in cases().items():
        for backward in (False, True):
            if backward and not leaves:
                continue  # attention_saliency has no gradient
            times = {b: [] for b in BACKENDS}
            run = runner(fn, leaves, backward)
            for backend in BACKENDS:  # warm-up
                with svpt.backend(backend):
                    for _ in range(5):
                        run()
            for _ in range(rounds):
                for backend in BACKENDS:
                    with svpt.backend(backend):
                        start = time.perf_counter()
                        for _ in range(calls):
                            run()
                        times[backend].append((time.perf_counter() - start) / calls)
            results[(name, "fwd+bwd" if backward else "fwd")] = {
                b: (min(t), statistics.median(t)) for b, t in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="text file to write")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    with svpt.backends.trace() as log, svpt.backend("cpp"):
        for fn, _ in cases().values():
            fn()
    assert all(impl == "cpp" for _, impl in log), f"not every op ran on cpp: {sorted(set(log))}"
    results = measure(args.rounds, args.calls)
    load = os.getloadavg()
    lines = [f"$ python {' '.join(sys.argv)}",
             f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; "
             f"load average (1 min) at the end {load[0]:.2f}; B {B}, T {T}, H {H}, D {D}, float32; best (median) of "
             f"{args.rounds} alternating rounds of {args.calls} calls; svpt.ops entry (input checks included)",
             "", f"{'op':<24} {'pass':<8} {'eager us':>16} {'cpp us':>16} {'eager/cpp':>10}"]
    for (name, kind), t in results.items():
        (e_best, e_med), (c_best, c_med) = t["eager"], t["cpp"]
        lines.append(f"{name:<24} {kind:<8} {e_best * 1e6:>7.1f} ({e_med * 1e6:>6.1f}) {c_best * 1e6:>7.1f} "
                     f"({c_med * 1e6:>6.1f}) {e_best / c_best:>10.2f}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
