"""Where a ``svpt train`` process spends its wall time outside the epochs (issue 15).

    T0=$(date +%s.%N) python benchmarks/startup_timeline.py train ARGS...   # a timeline of one run
    T0=$(date +%s.%N) python benchmarks/startup_timeline.py exit-cost normal
    T0=$(date +%s.%N) python benchmarks/startup_timeline.py exit-cost os_exit

``train``: runs ``svpt train ARGS`` in this process and prints, in seconds since T0 (the shell's
clock before Python started), when the imports finished, when the model, the data and the
config were done, when epochs 1, 2, 25, 50, 75 and 100 began, the final evaluation, and the
exit, with the time spent in the epochs' end (``_end_epoch``). ``exit-cost``: builds and runs
one ViT-B/16 SVPT step on CUDA, then exits normally or with ``os._exit``; the shell's wall time
against the printed one is what the interpreter's teardown costs.
"""
from __future__ import annotations

import atexit
import os
import sys
import time

T0 = float(os.environ["T0"])


def mark(what: str) -> None:
    print(f"[timeline] {time.time() - T0:7.2f} s  {what}", flush=True)


def timeline(argv: list[str]) -> int:
    mark("python started")
    import torch  # noqa: F401
    mark("torch imported")
    import timm  # noqa: F401
    mark("timm imported")
    import svpt.cli
    from svpt.training import loop
    mark("svpt imported")

    def wrap(name: str) -> None:
        inner = getattr(loop, name)

        def timed(*args, **kwargs):
            mark(f"{name} start")
            result = inner(*args, **kwargs)
            mark(f"{name} end")
            return result
        setattr(loop, name, timed)

    for name in ("build_model", "prepare_data", "_write_config", "_finish", "evaluate"):
        wrap(name)
    epochs, end_s = [0], [0.0]
    train_epoch, end_epoch = loop.train_epoch, loop._end_epoch

    def counted(*args, **kwargs):
        epochs[0] += 1
        if epochs[0] <= 2 or epochs[0] % 25 == 0:
            mark(f"epoch {epochs[0]} start")
        return train_epoch(*args, **kwargs)

    def ending(*args, **kwargs):
        start = time.perf_counter()
        result = end_epoch(*args, **kwargs)
        end_s[0] += time.perf_counter() - start
        return result

    loop.train_epoch, loop._end_epoch = counted, ending
    atexit.register(lambda: mark(f"exit (the epochs' ends took {end_s[0]:.2f} s in all)"))
    code = svpt.cli.main(argv)
    mark("main returned")
    return code


def exit_cost(mode: str) -> None:
    import timm
    import torch

    import svpt
    model = svpt.fused.apply(timm.create_model("vit_base_patch16_224"), "svpt", 50, num_classes=10).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randn(64, 3, 224, 224, device="cuda")).float().sum().backward()
    torch.cuda.synchronize()
    mark(f"before exit ({mode})")
    if mode == "os_exit":
        os._exit(0)


if __name__ == "__main__":
    if sys.argv[1] == "exit-cost":
        exit_cost(sys.argv[2])
    else:
        sys.exit(timeline(sys.argv[1:]))
