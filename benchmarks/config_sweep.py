"""Block-size sweeps of a Triton kernel (the *_configs.py scripts): time each configuration, leave
out one that fails to launch or whose results differ from the current configuration's, print the
fastest."""


def max_relative_error(got, expected) -> float:
    return max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, expected))


def rank_configs(name: str, configs, install, run, expected=None, keep: int = 5) -> None:
    """``install(cfg)`` makes the kernel launch with ``cfg``; ``run()`` returns (ms, outputs). With
    ``expected``, a configuration is ranked only if its outputs match to bf16 rounding (another
    tiling only reorders the sums). The caller puts its own configuration back afterwards."""
    timed = []
    for cfg in configs:
        install(cfg)
        try:
            ms, got = run()
        except Exception as exc:  # out of shared memory / registers for this tile
            print(f"  {name} {cfg}: {type(exc).__name__}: {str(exc)[:80]}", flush=True)
            continue
        err = 0.0 if expected is None else max_relative_error(got, expected)
        if err > 1e-2:
            print(f"  {name} {cfg}: differs from the current config by {err:.2e}", flush=True)
            continue
        timed.append((ms, cfg))
    for ms, cfg in sorted(timed, key=lambda r: r[0])[:keep]:
        print(f"{name} {ms:.3f} ms  {cfg}", flush=True)
