"""What every benchmark shares: the shapes per device and the measurement of a step.

CUDA: ViT-B/16 at 224 (T = 1 + M + 196), batch 128, bf16 autocast. CPU: a ViT-Tiny at
64 px (16 patches), batch 8, fp32, so the whole suite stays within minutes on 2 cores.
Each row reports images/s and peak memory through pytest-benchmark's ``extra_info``
(CUDA: the allocator's peak during the timed steps; CPU: the process's peak RSS so far,
which only ever grows, so compare CPU memory rows with care).
"""
from __future__ import annotations

import resource
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
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=SETTING.rounds, iterations=1)
    if CUDA:
        info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    info["images_per_s"] = round(batch / benchmark.stats.stats.median, 1)
    info.update(device=SETTING.device, batch=batch, dtype=str(SETTING.autocast or torch.float32),
                torch=torch.__version__)
    benchmark.extra_info.update(info)
