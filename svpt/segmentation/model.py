"""A prompted ViT with a segmentation decoder, and its checkpoints (prompts, heads, decoder only)."""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from ..checkpoint import _metadata as prompt_metadata
from ..checkpoint import atomic_write, load_prompt_state_dict, prompt_state_dict
from ..training.config import ConfigError
from .data import IGNORE_INDEX
from .decoders import DECODERS, build_heads

CHECKPOINT_FORMAT = "svpt-segmentation-1"
# CVPT's (and mmseg's SETR) blocks for ViT-L/16, as fractions of the depth: (9, 14, 19, 23) of 24.
_OUT_FRACTIONS = (10 / 24, 15 / 24, 20 / 24, 1.0)


def default_out_indices(depth: int) -> tuple[int, ...]:
    """(9, 14, 19, 23) for 24 blocks, the same fractions of the depth otherwise (distinct)."""
    return tuple(sorted({max(0, round(depth * f) - 1) for f in _OUT_FRACTIONS}))


def check_out_indices(out_indices, depth: int) -> tuple[int, ...]:
    indices = tuple(out_indices)
    if (not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices)
            or list(indices) != sorted(set(indices)) or not 0 <= indices[0] <= indices[-1] < depth):
        raise ValueError(f"out_indices={out_indices!r} is not accepted; give increasing block indices in "
                         f"0..{depth - 1} (the last feeds the main head, the others the auxiliary heads)")
    return indices


class SegmentationModel(nn.Module):
    """``backbone``: a prompted timm ViT (``svpt.prompt(..., num_classes=0)``). Its maps at
    ``out_indices`` (prompt rows removed, :mod:`svpt.dense`) feed the main head (the last index)
    and, for SETR-PUP, one auxiliary head per other index (the linear decoder uses the last
    index only). The backbone keeps its own eval mode (svpt's prompted models do); ``train()``
    switches the decoder's BatchNorm and the prompts' dropout."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "setr-pup",
                 out_indices=None, channels: int = 256, aux_weight: float = 0.4) -> None:
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder={decoder!r} is not accepted; accepted: {', '.join(DECODERS)}")
        depth = len(backbone.blocks)
        indices = default_out_indices(depth) if out_indices is None else check_out_indices(out_indices, depth)
        if decoder == "linear":
            indices = indices[-1:]
        self.backbone, self.out_indices, self.decoder, self.num_classes = backbone, indices, decoder, num_classes
        self.aux_weight = aux_weight if len(indices) > 1 else 0.0
        num_aux = len(indices) - 1 if self.aux_weight > 0 else 0
        self.decode_head, self.aux_heads = build_heads(decoder, backbone.embed_dim, backbone.patch_embed.patch_size[0],
                                                       num_classes, channels, num_aux)
        self.channels = channels

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """The heads' logits (main head first; auxiliary heads in training) at their own
        resolution, or with ``labels`` [B, H, W] the training loss (a forward, for DDP)."""
        logits = self.head_logits(images)
        return logits if labels is None else self.loss(logits, labels)

    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        wanted = self.out_indices if self.training and len(self.aux_heads) else self.out_indices[-1:]
        maps = self.backbone.forward_intermediates(images, indices=list(wanted), stop_early=True,
                                                   intermediates_only=True)
        logits = [self.decode_head(maps[-1])]
        if len(wanted) > 1:
            logits += [head(m) for head, m in zip(self.aux_heads, maps[:-1])]
        return logits

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The main head's logits at the images' size, float32."""
        return resize(self.head_logits(images)[0].float(), images.shape[-2:])

    def loss(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """mmseg's loss: cross-entropy of each head's logits (resized to the labels) averaged over
        all pixels (ignored ones count as 0, mmseg's ``avg_non_ignore=False``); auxiliary heads
        weighted by ``aux_weight``."""
        total = 0.0
        for i, head in enumerate(logits):
            ce = F.cross_entropy(resize(head.float(), labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX,
                                 reduction="sum") / labels.numel()
            total = total + (1.0 if i == 0 else self.aux_weight) * ce
        return total

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.decode_head.parameters()) + list(self.aux_heads.parameters())

    def describe(self) -> dict:
        """What the checkpoint must match, besides the prompts' method and options."""
        return {"decoder": self.decoder, "num_classes": self.num_classes, "out_indices": list(self.out_indices),
                "channels": self.channels, "aux_heads": len(self.aux_heads)}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Prompts (METHOD.md's keys), decoder and heads (parameters and BatchNorm statistics)."""
        state = dict(prompt_state_dict(self.backbone))
        state.update((f"decode_head.{k}", v) for k, v in self.decode_head.state_dict().items())
        state.update((f"aux_heads.{k}", v) for k, v in self.aux_heads.state_dict().items())
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: every key of :meth:`trainable_state`, no other, same shapes."""
        heads = ("decode_head.", "aux_heads.")
        load_prompt_state_dict(self.backbone, {k: v for k, v in state.items() if not k.startswith(heads)})
        for prefix, module in (("decode_head.", self.decode_head), ("aux_heads.", self.aux_heads)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def resize(logits: torch.Tensor, size) -> torch.Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- checkpoints
def _checkpoint_metadata(model: SegmentationModel) -> dict[str, str]:
    meta = prompt_metadata(model.backbone)
    meta.update(format=CHECKPOINT_FORMAT, segmentation=json.dumps(model.describe(), sort_keys=True))
    return meta


def save_checkpoint(model: SegmentationModel, path: str | os.PathLike) -> None:
    """Prompts, heads and decoder as safetensors, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()}
    atomic_write(path, save_safetensors(tensors, metadata=_checkpoint_metadata(model)))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a segmentation checkpoint; a :class:`ConfigError` if it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"segmentation checkpoint {path!r}: no such file")
    try:
        with safe_open(path, "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"{path!r} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path!r} is not an svpt segmentation checkpoint (no '{CHECKPOINT_FORMAT}' metadata)")
    return meta, tensors


def is_segmentation_checkpoint(path: str | os.PathLike) -> bool:
    try:
        read_checkpoint(path)
    except ConfigError:
        return False
    return True


def load_checkpoint(model: SegmentationModel, path: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` into a model built the same way."""
    meta, tensors = read_checkpoint(path)
    expected = _checkpoint_metadata(model)
    for field in ("method", "num_prompts", "options", "segmentation"):
        if meta.get(field) != expected[field]:
            raise ConfigError(f"{os.fspath(path)!r} was saved from {field}={meta.get(field)}, this model has "
                            f"{field}={expected[field]}; build the model as the run did")
    model.load_trainable_state(tensors)
