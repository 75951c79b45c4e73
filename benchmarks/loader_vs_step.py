"""Is the data path the bottleneck? svpt.data's loader img/s against the fused training step's.

    python benchmarks/loader_vs_step.py OUT_DIR

Writes a JPEG image folder (ImageNet-like 500x375 photos-sized files, 4 classes) to
OUT_DIR/tree, then measures (1) the DataLoader over svpt.data's ImageListDataset (decode,
resize, centre crop to 224, uint8) with several worker counts, and (2) one SVPT training
step of ViT-B/16 (M=50, batch 128, bf16 autocast, backend auto) in steady state.
Prints both and writes OUT_DIR/loader_vs_step.json.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.getcwd())


def _write(args):
    path, seed = args
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    base = np.stack([np.sin(xx / rng.uniform(5, 40) + c) * np.cos(yy / rng.uniform(5, 40)) for c in range(3)], -1)
    img = ((base * 0.4 + 0.5 + rng.normal(0, 0.05, base.shape)).clip(0, 1) * 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def make_tree(root, n=4096, classes=4):
    jobs = []
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        jobs += [(os.path.join(root, f"class{c}", f"{i:05d}.jpg"), c * n + i) for i in range(n // classes)]
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_write, jobs, chunksize=32)


def loader_rate(root, workers, batch=128, batches=24):
    from svpt.data import open_data
    ds = open_data(root, val_fraction=0.01).dataset("train", 224)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=True, prefetch_factor=4, drop_last=True)
    it = iter(loader)
    for _ in range(2):  # workers started, queues filled
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(it)
        images.cuda(non_blocking=True)
    torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - start)


def step_rate(batch=128, iters=20):
    import timm
    import svpt
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    svpt.fused.apply(model, "svpt", num_prompts=50, num_classes=4)
    model.cuda()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 4, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model((x.float() - 127.5) / 127.5), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start), svpt.get_backend()


def main():
    out = sys.argv[1]
    root = os.path.join(out if len(sys.argv) < 3 else sys.argv[2], "tree")
    start = time.perf_counter()
    make_tree(root)
    result = {"cpu_count": os.cpu_count(), "tree_s": time.perf_counter() - start,
              "device": torch.cuda.get_device_name(0)}
    result["loader_img_per_s"] = {w: loader_rate(root, w) for w in (4, 8, 15)}
    result["step_img_per_s"], result["backend"] = step_rate()
    print(json.dumps(result, indent=2))
    with open(os.path.join(out, "loader_vs_step.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
