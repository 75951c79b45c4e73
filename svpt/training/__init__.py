"""``svpt train`` / ``svpt eval``: training prompts on a frozen timm ViT, from Python or the CLI.

    from svpt.training import TrainConfig, train
    result = train(TrainConfig(model="vit_base_patch16_224", weights="ViT-B_16.npz",
                               data="vtab-1k/cifar", epochs=100, output="runs/cifar"))
    result["accuracy"], result["metric"]   # 'test accuracy after the last epoch (100)'

Modules: ``config`` (every setting, saved as the run's config.json), ``protocol`` (tune /
final / max-test: which splits a run reads and what it reports), ``backbone`` (timm model
and weights files), ``batches`` (device-resident data or a DataLoader), ``steps`` (the training
step, eager or replayed from a CUDA graph), ``loop`` (epochs, evaluation, DDP), ``state``
(atomic checkpoint and resume files), ``writer`` (those files written in a background thread),
``records`` (metrics.jsonl, metrics.csv, curves.png), ``progress`` (the bar).
"""
from .config import ConfigError, TrainConfig
from .loop import BackboneCache, evaluate_prompts, train
from .protocol import PROTOCOLS, Plan, make_plan

__all__ = ["BackboneCache", "ConfigError", "PROTOCOLS", "Plan", "TrainConfig", "evaluate_prompts", "make_plan", "train"]
