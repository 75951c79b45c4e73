"""The training step (forward, loss and backward of one batch), run eagerly or replayed from a
CUDA graph.

At small batches a CUDA step is bound by the host's Python: ViT-B/16 SVPT M = 50 at batch 64
on an H200 takes 26.1 ms eagerly and 20.8 ms replayed from a graph, with bit-identical losses
(``benchmarks/results/cuda_graph_step_h200.txt``). A graph replays the step's kernels with
no Python at all, so it is captured only once the step is settled: the first ``WARMUP`` steps
of each batch size run eagerly (Triton compiles and tunes, the frozen weights' autocast copies
are made), the next one is captured, and from then on it is replayed. The optimizer step stays
outside the graph (the learning rate changes every step). The eager and the replayed step run
the same kernels on the same inputs: both zero the gradients in place and accumulate into them,
so the numbers do not depend on which one ran.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import ConfigError

CUDA_GRAPHS = ("auto", "on", "off")
WARMUP = 2  # eager steps per batch size before its graph is captured


def graphs_decision(setting: str, device: torch.device, distributed: bool, options: dict) -> tuple[bool, str]:
    """Whether this run's training steps are CUDA graphs, and in words why (for the log and
    ``config.json``). ``on`` where a graph cannot run is a ConfigError naming the reason."""
    if setting == "off":
        return False, "eager (--cuda-graphs off)"
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}, not cuda")
    if distributed:
        reasons.append("the run is distributed (DDP's gradient hooks run on the host)")
    if options.get("prompt_dropout"):
        reasons.append("prompt dropout draws random numbers in the step")
    if not reasons:
        return True, f"CUDA graphs (one per batch size, captured after {WARMUP} eager steps)"
    if setting == "on":
        raise ConfigError(f"--cuda-graphs on cannot be used here: {'; '.join(reasons)}; use auto or off")
    return False, f"eager ({'; '.join(reasons)})"


def autocast(device: torch.device, amp: bool, cache: bool = True):
    """bf16 autocast on CUDA when ``amp``. A graph capture needs ``cache=False``: autocast frees
    its cached casts when the context exits, which a replayed graph would still read."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    images: torch.Tensor  # the static inputs the graph reads ...
    labels: torch.Tensor
    loss: torch.Tensor    # ... and the outputs it writes, on every replay
    logits: torch.Tensor


class TrainStep:
    """``step(images, labels) -> (loss, logits)``: one batch's forward, loss and backward; the
    trainable parameters' ``.grad`` then holds its gradient. ``logits`` is valid until the next
    call (a replayed graph rewrites it); ``loss`` is the caller's."""

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 normalise: Callable[[torch.Tensor], torch.Tensor], device: torch.device, amp: bool, graphs: bool):
        self.model, self.normalise, self.device, self.amp, self.graphs = model, normalise, device, amp, graphs
        for p in params:  # gradients live in one place for the whole run: a graph writes into them
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in params]
        self.eager_steps: collections.Counter[int] = collections.Counter()
        self.replays = 0
        self.captured: dict[int, _Captured] = {}
        self.pool = None  # one memory pool for every batch size's graph: they never run at once

    def _forward_backward(self, images: torch.Tensor, labels: torch.Tensor, cache: bool):
        torch._foreach_zero_(self.grads)
        with autocast(self.device, self.amp, cache):
            logits = self.model(self.normalise(images))
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        return loss.detach(), logits.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = len(labels)
        if not self.graphs or self.eager_steps[size] < WARMUP:
            self.eager_steps[size] += 1
            return self._forward_backward(images, labels, cache=True)
        captured = self.captured.get(size) or self._capture(images, labels)
        captured.images.copy_(images, non_blocking=True)
        captured.labels.copy_(labels, non_blocking=True)
        captured.graph.replay()
        self.replays += 1
        return captured.loss.clone(), captured.logits

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> _Captured:
        static_images = torch.empty_like(images, device=self.device)
        static_labels = torch.empty_like(labels, device=self.device)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        # thread_local: CUDA calls of other threads (a DataLoader's pin-memory thread) must not
        # invalidate the capture; no other thread touches this step's tensors.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            loss, logits = self._forward_backward(static_images, static_labels, cache=False)
        self.pool = graph.pool()
        self.captured[len(labels)] = _Captured(graph, static_images, static_labels, loss, logits)
        return self.captured[len(labels)]

    def describe(self) -> str:
        """What ran, in words: how many steps were eager and how many replayed graphs."""
        eager = sum(self.eager_steps.values())
        if not self.graphs:
            return f"{eager} eager steps"
        sizes = ", ".join(str(s) for s in sorted(self.captured, reverse=True)) or "none"
        return f"{eager} eager steps, {self.replays} replayed from CUDA graphs (batch sizes {sizes})"
