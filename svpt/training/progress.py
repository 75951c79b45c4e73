"""A progress bar (loss, img/s, time left) on a terminal; plain lines in logs."""
from __future__ import annotations

import shutil
import sys
import time
from typing import Callable, TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """One epoch's progress. ``mode``: "bar" (redrawn in place, at most 5 times a second),
    "lines" (a line every tenth of the epoch, at most one a second), "none". Every drawing
    reads the loss, which waits for the GPU: hence the limits."""

    def __init__(self, mode: str, epoch: int, epochs: int, steps: int, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode, self.epoch, self.epochs, self.steps = mode, epoch, epochs, steps
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.every = max(1, steps // 10)

    def _due(self, step: int) -> bool:
        if self.mode == "none":
            return False
        if step == self.steps:
            return True
        since = time.perf_counter() - self.last_draw
        if self.mode == "bar":
            return since >= 0.2
        return step % self.every == 0 and since >= 1.0

    def update(self, step: int, images: int, loss: Callable[[], float]) -> None:
        """After ``step`` of ``steps`` steps and ``images`` images (all processes); ``loss``
        is only called when a line is drawn (it synchronises the GPU)."""
        if not self._due(step):
            return
        now = time.perf_counter()
        self.last_draw = now
        elapsed = now - self.start
        per_step = elapsed / step
        left_epoch = per_step * (self.steps - step)
        left_run = left_epoch + per_step * self.steps * (self.epochs - self.epoch)  # evaluations not counted
        text = (f"epoch {self.epoch}/{self.epochs} step {step}/{self.steps} loss {loss():.4f} "
                f"{images / max(elapsed, 1e-9):.0f} img/s eta {_clock(left_epoch)} left in epoch, "
                f"about {_clock(left_run)} left in run | epoch elapsed {_clock(elapsed)}")
        if self.mode == "bar":
            width = 24
            filled = width * step // self.steps
            bar = "#" * filled + "." * (width - filled)
            # A line longer than the terminal wraps, and "\r" then redraws only its last row.
            columns = shutil.get_terminal_size().columns
            self.stream.write(f"\r[{bar}] {text}"[:columns] + "\033[K")
            if step == self.steps:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
