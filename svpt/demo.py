"""``svpt demo``: prompt a small random-init ViT and train a few steps on generated images.

The task (the orientation of noisy stripes) is generated on the fly, so the demo runs
anywhere without downloads; the loss falls as the prompts and head learn it.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import backends
from .prompting import prompt

NUM_CLASSES = 4


def stripe_images(batch: int, size: int = 32, generator: torch.Generator | None = None):
    """Noisy stripe patterns; the label is the stripe orientation (0, 45, 90 or 135 degrees),
    with random frequency, phase and colour, so no single pixel gives the class away."""
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    angle = labels.float() * (torch.pi / NUM_CLASSES)
    freq = 0.5 + 0.5 * torch.rand(batch, generator=generator)
    phase = 2 * torch.pi * torch.rand(batch, generator=generator)
    colour = torch.rand(batch, 3, 1, 1, generator=generator) + 0.5
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    stripes = torch.sin(freq[:, None, None] * proj + phase[:, None, None]).unsqueeze(1)
    images = colour * stripes + 0.5 * torch.randn(batch, 3, size, size, generator=generator)
    return images, labels


def run_demo(method: str = "svpt", num_prompts: int = 8, steps: int = 120, backend: str | None = None) -> int:
    from timm.models.vision_transformer import VisionTransformer

    if backend is not None:
        backends.set_backend(backend)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, num_classes=10,
                              global_pool="avg")
    prompt(model, method, num_prompts, num_classes=NUM_CLASSES)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    print(f"backend {backends.get_backend()}; training {steps} steps of batch 32 on generated images")
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        images, labels = stripe_images(32, generator=gen)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        images, labels = stripe_images(512, generator=torch.Generator().manual_seed(2))
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    print(f"held-out accuracy {accuracy:.3f} (chance {1 / NUM_CLASSES:.2f}); "
          f"{steps * 32 / (time.perf_counter() - start):.0f} img/s")
    return 0
