"""An ordinary timm / PyTorch training loop; svpt adds one import and one call (marked).

    python examples/timm_train_loop.py                      # tiny ViT, CPU or GPU, ~1 min on a CPU
    python examples/timm_train_loop.py --model vit_base_patch16_224 --weights ViT-B_16.npz --output runs/p.safetensors

At the end it saves the trained prompts and head (a prompt checkpoint, a few KB) to --output
(default: prompts.safetensors in the current directory) and says where.

Without the two svpt lines this fine-tunes the whole ViT; with them the backbone is frozen
and only the prompts and the new head train (their parameters are the only ones with
requires_grad, so the unchanged optimizer line steps only those), on the fused kernels
where the GPU allows (backend "auto").
"""
import argparse
import math
import os

import timm
import torch
import torch.nn.functional as F

import svpt  # svpt: 1/2


def stripes(n, size, seed):
    """Toy data: noisy stripes, labelled by orientation (4 classes). Any DataLoader works here."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    angle = labels * math.pi / 4
    yy, xx = torch.meshgrid(torch.arange(size) * 32 / size, torch.arange(size) * 32 / size, indexing="ij")
    proj = xx * angle.cos()[:, None, None] + yy * angle.sin()[:, None, None]
    freq, phase = 0.4 + 0.4 * torch.rand(n, 1, 1, generator=g), 6.28 * torch.rand(n, 1, 1, generator=g)
    images = torch.sin(freq * proj + phase).unsqueeze(1).expand(n, 3, size, size)
    return images + 0.2 * torch.randn(n, 3, size, size, generator=g), labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="test_vit")
    parser.add_argument("--weights", help="local .npz/.pth/.safetensors file (default: random init)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--output", default="prompts.safetensors",
                        help="where to save the prompt checkpoint (default: %(default)s, in the current directory)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    tiny = dict(patch_size=4, img_size=32) if args.model == "test_vit" else {}
    overlay = dict(pretrained_cfg_overlay=dict(file=args.weights)) if args.weights else {}
    model = timm.create_model(args.model, pretrained=bool(args.weights), **overlay, **tiny)
    svpt.fused.apply(model, "svpt", num_prompts=8, num_classes=4)  # svpt: 2/2
    model.to(device)

    size = model.patch_embed.img_size[0]
    train = torch.utils.data.TensorDataset(*stripes(2048, size, seed=0))
    test_x, test_y = stripes(512, size, seed=1)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(loader))
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    for epoch in range(args.epochs):
        model.train()
        for images, labels in loader:
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            accuracy = (model(test_x.to(device)).argmax(-1).cpu() == test_y).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}")
    svpt.save_prompts(model, args.output)  # prompts + head only (optional)
    print(f"saved the prompts and head to {os.path.abspath(args.output)}")


if __name__ == "__main__":
    main()
