"""The suite's table: per task mean +- std over seeds, group means, the overall mean;
as Markdown, CSV and a plot (each written atomically)."""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass

from ..checkpoint import atomic_write


@dataclass
class TaskRow:
    name: str
    group: str
    status: str                 # done, partial (some seeds), failed, not run, not found
    accuracies: list[float]     # fractions, one per finished seed
    seeds: list[int]            # the finished seeds
    seeds_wanted: int
    lr: float | None
    weight_decay: float | None
    hyperparameters: str        # how lr and weight decay were chosen
    metric: str = ""            # what each accuracy is (from the runs' result.json)
    error: str = ""

    @property
    def mean(self) -> float | None:
        return sum(self.accuracies) / len(self.accuracies) if self.accuracies else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n - 1), None below two seeds."""
        n = len(self.accuracies)
        if n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / (n - 1))


@dataclass
class Summary:
    label: str
    value: float | None
    how: str


def summaries(rows: list[TaskRow], groups: tuple[str, ...]) -> list[Summary]:
    """Each group's mean of task means; with several groups, the mean of the group means
    (the overall figure of VPT-family tables) and the mean over all tasks. A mean is given
    only when each of its tasks is done (every seed finished)."""
    out, group_values = [], []
    for group in groups:
        members = [r for r in rows if r.group == group]
        done = [r.mean for r in members if r.status == "done"]
        value = sum(done) / len(done) if done and len(done) == len(members) else None
        group_values.append(value)
        out.append(Summary(group, value, f"mean of its {len(members)} tasks" if value is not None
                           else f"incomplete: {len(done)} of {len(members)} tasks"))
    if len(groups) > 1:
        complete = all(v is not None for v in group_values)
        out.append(Summary("Overall", sum(group_values) / len(groups) if complete else None,
                           f"mean of the {len(groups)} group means (as VPT-family tables)" if complete
                           else "incomplete"))
        complete = all(r.status == "done" for r in rows)
        out.append(Summary(f"Mean of {len(rows)} tasks", sum(r.mean for r in rows) / len(rows) if complete else None,
                           "unweighted mean over tasks" if complete else "incomplete"))
    return out


def _pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


def _cell(row: TaskRow) -> str:
    if row.mean is None:
        return "—"
    return _pct(row.mean) + (f" ± {_pct(row.std)}" if row.std is not None else "")


def _markdown(rows: list[TaskRow], sums: list[Summary], header: list[str]) -> str:
    lines = [*header, "", "| group | task | accuracy (%) | seeds | lr | weight decay | hyper-parameters | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lr = "—" if r.lr is None else f"{r.lr:g}"
        wd = "—" if r.weight_decay is None else f"{r.weight_decay:g}"
        lines.append(f"| {r.group} | {r.name} | {_cell(r)} | {len(r.seeds)}/{r.seeds_wanted} | {lr} | {wd} | "
                     f"{r.hyperparameters} | {r.status} |")
    lines += ["", "| summary | accuracy (%) | how |", "|---|---|---|"]
    lines += [f"| {s.label} | {_pct(s.value)} | {s.how} |" for s in sums]
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", "Failed tasks:", ""] + [f"- {r.name}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def _csv(rows: list[TaskRow], sums: list[Summary], protocol: str) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["kind", "group", "name", "status", "accuracy_mean_pct", "accuracy_std_pct", "seeds_done",
                     "seeds", "accuracies_pct", "lr", "weight_decay", "hyperparameters", "protocol", "metric"])
    exact = lambda v: "" if v is None else f"{100 * v:.4f}"  # noqa: E731
    for r in rows:
        writer.writerow(["task", r.group, r.name, r.status, exact(r.mean), exact(r.std), len(r.seeds),
                         " ".join(map(str, r.seeds)), " ".join(exact(a) for a in r.accuracies),
                         "" if r.lr is None else r.lr, "" if r.weight_decay is None else r.weight_decay,
                         r.hyperparameters, protocol, r.metric])
    for s in sums:
        writer.writerow(["summary", s.label if s.label in {r.group for r in rows} else "", s.label,
                         "done" if s.value is not None else "incomplete", exact(s.value), "", "", "", "", "", "",
                         "", protocol, s.how])
    return out.getvalue()


def _plot(rows: list[TaskRow], sums: list[Summary], groups: tuple[str, ...], title: str) -> bytes:
    from matplotlib.figure import Figure  # not pyplot: no global backend to switch
    from matplotlib.patches import Patch

    colours = dict(zip(groups, ("tab:green", "tab:blue", "tab:orange", "tab:purple")))
    fig = Figure(figsize=(max(8.0, 0.5 * len(rows) + 4), 4.5))
    ax_tasks, ax_sum = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(1, len(rows)), max(1, len(sums))]})
    x = range(len(rows))
    ax_tasks.bar(x, [100 * (r.mean or 0) for r in rows], yerr=[100 * (r.std or 0) for r in rows],
                 color=[colours[r.group] for r in rows], capsize=2)
    for i, r in enumerate(rows):
        if r.mean is None:
            ax_tasks.text(i, 1, r.status, rotation=90, ha="center", va="bottom", fontsize=7)
    ax_tasks.set_xticks(list(x), [r.name for r in rows], rotation=60, ha="right", fontsize=8)
    ax_tasks.legend(handles=[Patch(color=colours[g], label=g) for g in groups], fontsize=8, loc="upper right")
    ax_tasks.set(ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax_sum.bar(range(len(sums)), [100 * (s.value or 0) for s in sums],
               color=[colours.get(s.label, "tab:gray") for s in sums])
    ax_sum.set_xticks(list(range(len(sums))), [s.label if s.value is not None else f"{s.label}\n(incomplete)"
                                               for s in sums], rotation=60, ha="right", fontsize=8)
    ax_sum.set(ylim=(0, 100), title="means")
    for ax in (ax_tasks, ax_sum):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_tables(rows: list[TaskRow], groups: tuple[str, ...], out: str, header: list[str], protocol: str,
                 plot_title: str) -> list[Summary]:
    """results.md, results.csv and results.png in ``out``; returns the summary rows."""
    sums = summaries(rows, groups)
    atomic_write(os.path.join(out, "results.md"), _markdown(rows, sums, header).encode())
    atomic_write(os.path.join(out, "results.csv"), _csv(rows, sums, protocol).encode())
    atomic_write(os.path.join(out, "results.png"), _plot(rows, sums, groups, plot_title))
    return sums
