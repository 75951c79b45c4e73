"""The ``svpt`` command: ``svpt demo``, ``svpt env``."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="prompt a small ViT and train a few steps on generated images")
    demo.add_argument("--method", default="svpt", help="vpt-shallow, vpt-deep, svpt or cvpt")
    demo.add_argument("--num-prompts", type=int, default=8)
    demo.add_argument("--steps", type=int, default=120)
    demo.add_argument("--backend", default=None, help="svpt backend (default: SVPT_BACKEND or eager)")
    sub.add_parser("env", help="versions, compilers and which backends are usable here")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .env import report
        print(report())
        return 0
    from .demo import run_demo
    return run_demo(method=args.method, num_prompts=args.num_prompts, steps=args.steps, backend=args.backend)


if __name__ == "__main__":
    sys.exit(main())
