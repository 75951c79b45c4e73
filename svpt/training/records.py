"""Metrics of a run: ``metrics.jsonl`` (one line per epoch), ``steps.jsonl`` (loss and
learning rate of every step), appended each epoch; ``metrics.csv`` and ``curves.png``,
rewritten at most once a minute and when the run ends (drawing costs ~0.1 s, and each
atomic rewrite two fsyncs: per epoch they would cost a short run several seconds)."""
from __future__ import annotations

import csv
import io
import json
import os
import time

from ..checkpoint import atomic_write

EPOCH_FILE, STEP_FILE, CSV_FILE, PLOT_FILE = "metrics.jsonl", "steps.jsonl", "metrics.csv", "curves.png"
PLOT_EVERY_S = 60.0


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # a line cut by a kill during its append: its epoch had no checkpoint yet
    return [json.loads(line) for line in lines if line.strip()]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


class RunRecords:
    """Appends each epoch's metrics; on resume, drops lines of epochs after the checkpoint
    (written by a run that crashed before its checkpoint), so each epoch appears once.
    ``eval_label`` names the evaluated split and protocol in the plot. With a ``writer``
    (training.writer), the summaries are drawn and written in its thread."""

    def __init__(self, run_dir: str, keep_epochs: int, eval_label: str, writer=None):
        self.run_dir, self.eval_label, self.writer = run_dir, eval_label, writer
        self.epochs = [r for r in read_jsonl(self._path(EPOCH_FILE)) if r["epoch"] <= keep_epochs]
        self.steps = [r for r in read_jsonl(self._path(STEP_FILE)) if r["epoch"] <= keep_epochs]
        _write_jsonl(self._path(EPOCH_FILE), self.epochs)
        _write_jsonl(self._path(STEP_FILE), self.steps)
        self.plotted_at = -PLOT_EVERY_S

    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def add_epoch(self, row: dict, step_rows: list[dict], last: bool) -> None:
        """``last``: the run ends or stops after this epoch (summaries are then written)."""
        self.epochs.append(row)
        self.steps.extend(step_rows)
        with open(self._path(STEP_FILE), "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in step_rows))
        with open(self._path(EPOCH_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if last or time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
            self.plotted_at = time.monotonic()
            if self.writer is None:
                self.write_summaries()
            else:  # copies of the lists: the run appends to them while the thread draws
                self.writer.submit(self._write_summaries, list(self.epochs), list(self.steps))

    def write_summaries(self) -> None:
        """metrics.csv and curves.png from the epochs so far."""
        self._write_summaries(self.epochs, self.steps)
        self.plotted_at = time.monotonic()

    def _write_summaries(self, epochs: list[dict], steps: list[dict]) -> None:
        fields = list(dict.fromkeys(k for r in epochs for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(epochs)
        atomic_write(self._path(CSV_FILE), out.getvalue().encode())
        plot_curves(epochs, steps, self._path(PLOT_FILE), self.eval_label)


def plot_curves(epochs: list[dict], steps: list[dict], path: str, eval_label: str = "eval") -> None:
    """Loss (per step and per epoch, train and evaluation) and accuracy against epochs, as a
    PNG; evaluation points only for the epochs that were evaluated."""
    from matplotlib.figure import Figure  # not pyplot: no global backend, safe in the writer's thread

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    if steps:
        ax_loss.plot([s["epoch_float"] for s in steps], [s["loss"] for s in steps],
                     color="tab:blue", alpha=0.3, linewidth=0.8, label="train (step)")
    x = [r["epoch"] for r in epochs]
    evaluated = [r for r in epochs if "eval_acc" in r]
    ax_loss.plot(x, [r["train_loss"] for r in epochs], "o-", color="tab:blue", label="train (epoch)")
    ax_acc.plot(x, [r["train_acc"] for r in epochs], "o-", color="tab:blue", label="train")
    if evaluated:
        ex = [r["epoch"] for r in evaluated]
        ax_loss.plot(ex, [r["eval_loss"] for r in evaluated], "s-", color="tab:orange", label=eval_label)
        ax_acc.plot(ex, [r["eval_acc"] for r in evaluated], "s-", color="tab:orange", label=eval_label)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, buffer.getvalue())
