"""``svpt train`` / ``svpt eval``: training prompts on a frozen timm ViT, from Python or the CLI.

    from svpt.training import TrainConfig, train
    result = train(TrainConfig(model="vit_base_patch16_224", weights="ViT-B_16.npz",
                               data="vtab-1k/cifar", epochs=100, output="runs/cifar"))

Modules: ``config`` (every setting, saved as the run's config.json), ``backbone`` (timm model
and weights files), ``loop`` (epochs, evaluation, DDP), ``state`` (atomic checkpoint and
resume files), ``records`` (metrics.jsonl, metrics.csv, curves.png), ``progress`` (the bar).
"""
from .config import ConfigError, TrainConfig
from .loop import evaluate_prompts, train

__all__ = ["ConfigError", "TrainConfig", "evaluate_prompts", "train"]
