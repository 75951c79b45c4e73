"""Decoders on the prompted ViT's maps: SETR-PUP (the VPT and CVPT papers') and a linear head.

SETR-PUP as mmseg's ``SETRUPHead`` in ``setr_vit-l_pup_8xb2-160k_ade20k-512x512``: the main
head on the last of the out_indices blocks (LayerNorm eps 1e-6 over the channels, then
``num_convs`` x [3x3 conv, BatchNorm, ReLU, bilinear x``up_scale``], then a 1x1 classifier: 4 x
2 = 16, one patch); auxiliary heads on the other out_indices blocks (2 x [conv, x4]), their loss
weighted 0.4. ``num_convs`` follows the patch size (log base ``up_scale`` of it, rounded), so
other patch sizes keep the structure; logits are resized to the labels' size in any case, as
mmseg's loss does. Initialisation as mmseg: Kaiming-normal convolutions (fan-out), BatchNorm
1 / 0, classifier normal(0, 0.01).
"""
from __future__ import annotations

import math

import torch
from torch import nn

DECODERS = ("setr-pup", "linear")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] maps (SETR normalises its input tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def upsampling_convs(patch_size: int, up_scale: int) -> int:
    """Stages of x``up_scale`` that bring a map of ``patch_size``-pixel cells nearest to pixels."""
    return max(1, round(math.log(patch_size) / math.log(up_scale)))


class SETRUPHead(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int, up_scale: int,
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(in_channels, eps=1e-6)
        stages = []
        for i in range(num_convs):
            stages.append(nn.Sequential(_conv_bn_relu(in_channels if i == 0 else channels, channels, kernel_size),
                                        nn.Upsample(scale_factor=up_scale, mode="bilinear", align_corners=False)))
        self.up_convs = nn.Sequential(*stages)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.up_convs(self.norm(x)))


class LinearHead(nn.Module):
    """LayerNorm and a 1x1 classifier on the last map; upsampled to the labels by the caller."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(in_channels, eps=1e-6)
        self.conv_seg = _classifier(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.norm(x))


def build_heads(decoder: str, width: int, patch_size: int, num_classes: int, channels: int,
                num_aux: int) -> tuple[nn.Module, nn.ModuleList]:
    """(main head, auxiliary heads) for ``decoder``; the linear decoder has no auxiliary heads."""
    if decoder == "linear":
        return LinearHead(width, num_classes), nn.ModuleList()
    main = SETRUPHead(width, channels, num_classes, upsampling_convs(patch_size, 2), 2)
    aux = [SETRUPHead(width, channels, num_classes, upsampling_convs(patch_size, 4), 4) for _ in range(num_aux)]
    return main, nn.ModuleList(aux)
