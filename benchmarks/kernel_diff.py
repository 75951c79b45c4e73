"""Kernel by kernel, the GPU time per step of two rows of one ``token_floor.py --profile`` run
(its OUT.json): what one row adds, drops or spends longer in than the other.

    python benchmarks/kernel_diff.py benchmarks/results/token_floor_svpt_kernels_h100.json token-floor svpt

Inductor names its kernels per graph, so a name can stand for a forward kernel and a different
backward one, and the same fused operation can carry different numbers in two rows: read a
difference together with the kernels of the same kind around it (Inductor's output code,
``TORCH_LOGS=output_code``, says what each one computes).
"""
from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="token_floor.py's OUT.json, run with --profile")
    parser.add_argument("base", help="row name, e.g. token-floor")
    parser.add_argument("other", help="row name, e.g. svpt")
    parser.add_argument("--compiled", choices=("yes", "no"), default="yes")
    parser.add_argument("--min-ms", type=float, default=0.05, help="leave out kernels under this in both rows")
    args = parser.parse_args()
    rows = {r["row"]: r for r in json.load(open(args.json))["rows"] if r["compiled"] == (args.compiled == "yes")}
    base, other = (dict(rows[name]["kernels"]) for name in (args.base, args.other))
    print(f"{args.json}: {args.base} {sum(base.values()):.2f} ms, {args.other} {sum(other.values()):.2f} ms of kernels "
          f"per step; idle {rows[args.base]['idle_start_ms'] + rows[args.base]['idle_inside_ms']:.2f} and "
          f"{rows[args.other]['idle_start_ms'] + rows[args.other]['idle_inside_ms']:.2f} ms")
    print(f"{args.base:>12} {args.other:>12} {'difference':>10}  kernel (ms per step)")
    for name in sorted(set(base) | set(other), key=lambda n: -(base.get(n, 0) + other.get(n, 0))):
        a, b = base.get(name, 0.0), other.get(name, 0.0)
        if max(a, b) >= args.min_ms:
            print(f"{a:12.3f} {b:12.3f} {b - a:+10.3f}  {name[:110]}")


if __name__ == "__main__":
    main()
