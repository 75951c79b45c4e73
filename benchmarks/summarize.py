"""Summarise benchmark JSONs (``pytest benchmarks/ --benchmark-json=FILE``): a Markdown table
of the training-step rows of all of them, the target ratios of each run that holds the rows
they need (ratios are never taken across runs), and a PNG plot.

    python benchmarks/summarize.py run_a.json [run_b.json ...] --table results.md --plot results.png
"""
from __future__ import annotations

import argparse
import json

FUSED = ("triton", "auto")


def _rows(data: dict, run: str) -> list[dict]:
    rows = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "row" not in info:
            continue  # op-level rows have their own table in the JSON
        label = info["row"] + (f" [{info['backend']}]" if "backend" in info else "")
        rows.append(dict(info, run=run, label=label, median_ms=bench["stats"]["median"] * 1e3,
                         memory_mb=info.get("peak_memory_mb", info.get("process_peak_rss_mb"))))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| row | M | batch | compiled | run | ms/step | img/s | peak MB |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["num_prompts"], r["batch"], r["label"], r["compiled"], r["run"])):
        lines.append(f"| {r['label']} | {r['num_prompts']} | {r['batch']} | {'yes' if r['compiled'] else 'no'} | {r['run']} "
                     f"| {r['median_ms']:.1f} | {r['images_per_s']:.0f} | {r['memory_mb']} |")
    return "\n".join(lines)


def targets(rows: list[dict], num_prompts: int) -> list[str]:
    """The issue's ratios at ``num_prompts``, from ``rows`` of one run (the floor has M = 0)."""
    at = {(r["label"], r["compiled"]): r for r in rows
          if r["num_prompts"] in (num_prompts, 0) and not r["row"].startswith("sweep")}
    fused = [at.get((f"svpt:svpt [{b}]", c)) for b in FUSED for c in (False, True)]
    fused = max((r for r in fused if r), key=lambda r: r["images_per_s"], default=None)
    if fused is None:
        return [f"no fused SVPT row at M={num_prompts}"]
    out = [f"fused SVPT (M={num_prompts}, {'compiled' if fused['compiled'] else 'not compiled'}): "
           f"{fused['images_per_s']:.0f} img/s, {fused['memory_mb']} MB"]
    checks = [("compiled plain-PyTorch SVPT (SDPA)", ("plain-svpt-sdpa", True), "images_per_s", 1.2),
              ("straightforward eager SVPT", ("svpt:svpt [eager]", False), "images_per_s", 2.5),
              ("no-prompt floor, peak memory", ("floor-no-prompts", False), "memory_mb", 1.2)]
    for name, key, field, goal in checks:
        ref = at.get(key)
        if ref is None:
            out.append(f"{name}: not measured")
            continue
        ratio = fused[field] / ref[field]
        ok = ratio >= goal if field == "images_per_s" else ratio <= goal
        sign = ">=" if field == "images_per_s" else "<="
        out.append(f"vs {name}: {ratio:.2f}x (target {sign} {goal}x: {'met' if ok else 'MISSED'})")
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if not r["row"].startswith("sweep")]
    sweeps = {kind: [r for r in rows if r["row"] == f"sweep:{kind}"] for kind in ("prompts", "batch")}
    sweeps = {kind: rs for kind, rs in sweeps.items() if rs}
    fig, axes = plt.subplots(1, 1 + len(sweeps), figsize=(8 + 6 * len(sweeps), 6), squeeze=False)
    m = max(r["num_prompts"] for r in main)
    at_m = {(r["label"], r["compiled"]): r for r in main if r["num_prompts"] in (m, 0)}  # one bar per row
    bars = sorted(at_m.values(), key=lambda r: r["images_per_s"])
    colours = ["tab:orange" if r.get("backend") in FUSED else "tab:gray" for r in bars]
    axes[0][0].barh([f"{r['label']}{' (compiled)' if r['compiled'] else ''}" for r in bars],
                    [r["images_per_s"] for r in bars], color=colours)
    axes[0][0].set_xlabel(f"images/s, training step, M={m}, batch {bars[0]['batch']}")
    for ax, (kind, rs) in zip(axes[0][1:], sweeps.items()):
        x = "num_prompts" if kind == "prompts" else "batch"
        for backend in sorted({r["backend"] for r in rs}):
            line = sorted((r for r in rs if r["backend"] == backend), key=lambda r: r[x])
            ax.plot([r[x] for r in line], [r["images_per_s"] for r in line], "o-", label=f"svpt [{backend}]")
        ax.set_xscale("log")
        ax.set_xlabel("prompts per layer M" if kind == "prompts" else "batch (M=50)")
        ax.set_ylabel("images/s")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files, one per run")
    parser.add_argument("--table", help="write the Markdown table and targets here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()
    runs, text = [], []
    for i, path in enumerate(args.json):
        with open(path) as f:
            data = json.load(f)
        run = chr(ord("a") + i)
        runs.append((run, _rows(data, run)))
        meta = data.get("svpt", {})
        text.append(f"- run {run}: `{meta.get('command', '?')}` on {meta.get('device', '?')}, "
                    f"{meta.get('versions', {})}, commit {data.get('commit_info', {}).get('id', '?')[:10]}")
    rows = [r for _, run_rows in runs for r in run_rows]
    text += ["", table(rows), ""]
    for run, run_rows in runs:
        for m in sorted({r["num_prompts"] for r in run_rows if not r["row"].startswith("sweep")} - {0}):
            found = targets(run_rows, m)
            if not found[0].startswith("no fused"):
                text += [f"- run {run}: {line}" for line in found]
    print("\n".join(text))
    if args.table:
        with open(args.table, "w") as f:
            f.write("\n".join(text) + "\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
