"""What every benchmark shares: the shapes per device and the measurement of a step.

CUDA: ViT-B/16 at 224 (T = 1 + M + 196), batch 128, bf16 autocast. CPU: a ViT-Tiny at
64 px (16 patches), batch 8, fp32, so the whole suite stays within minutes on 2 cores.
Each row reports images/s and its own peak memory through pytest-benchmark's ``extra_info``
(``peak_memory_mb``; CUDA: the allocator's peak during the timed steps; CPU: the process's peak
resident set during the timed steps, its high-water mark reset before them, so an earlier row's
peak does not carry over; the model, the batch and the Python process itself are in it, as the
model and batch are in the CUDA figure; ``peak_above_start_mb``: that peak less the resident set
before the timed steps, what the steps themselves add).
"""
from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass

import timm
import torch

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Setting:
    device: str
    model: str
    model_kwargs: tuple
    batch: int
    autocast: torch.dtype | None
    prompts: tuple[int, ...]
    rounds: int
    warmup: int

    def vit(self):
        torch.manual_seed(0)
        return timm.create_model(self.model, pretrained=False, **dict(self.model_kwargs)).to(self.device)

    def images(self, batch: int | None = None):
        size = dict(self.model_kwargs).get("img_size", 224)
        gen = torch.Generator(device=self.device).manual_seed(0)
        b = batch or self.batch
        x = torch.randn(b, 3, size, size, device=self.device, generator=gen)
        y = torch.randint(0, 10, (b,), device=self.device, generator=gen)
        return x, y


SETTING = (Setting("cuda", "vit_base_patch16_224", (("num_classes", 10),), 128, torch.bfloat16, (10, 50), 20, 5)
           if CUDA else
           Setting("cpu", "vit_tiny_patch16_224", (("num_classes", 10), ("img_size", 64)), 8, None, (10,), 5, 2))


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """One step as a user runs it: forward (autocast on CUDA), loss, backward, AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        with torch.autocast(SETTING.device, dtype=SETTING.autocast, enabled=SETTING.autocast is not None):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if CUDA:
            torch.cuda.synchronize()
    return step


def measure(benchmark, step, batch: int, **info) -> None:
    """Time ``step`` with pytest-benchmark and record images/s and peak memory."""
    for _ in range(SETTING.warmup):  # includes torch.compile's compilation
        step()
    no_peak = torch.cuda.reset_peak_memory_stats() if CUDA else reset_peak_rss()
    start_rss_mb = None if CUDA or no_peak else peak_rss_mb()
    benchmark.pedantic(step, rounds=SETTING.rounds, iterations=1)
    if CUDA:
        info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info["gpu"] = torch.cuda.get_device_name(0)
    elif no_peak is None:
        info["peak_memory_mb"] = round(peak_rss_mb(), 1)
        info["peak_above_start_mb"] = round(peak_rss_mb() - start_rss_mb, 1)  # what the steps add
    else:
        info["peak_memory_mb"], info["peak_memory_unavailable"] = None, no_peak
    info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)
    info.update(device=SETTING.device, batch=batch, dtype=str(SETTING.autocast or torch.float32),
                torch=torch.__version__)
    benchmark.extra_info.update(info)


def reset_peak_rss() -> str | None:
    """Start a new peak of this process's resident set (Linux: ``/proc/self/clear_refs``), after giving
    freed heap memory back (glibc ``malloc_trim``), so the peak that follows is the next steps' own;
    returns ``None``, or why the peak cannot be reset here."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident, and count
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError as exc:
        return f"per-row CPU memory needs Linux's /proc/self/clear_refs ({exc})"
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set since :func:`reset_peak_rss` (``VmHWM``), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")
