"""Benchmark suites with the papers' protocol: ``svpt vtab ROOT`` and ``svpt fgvc ROOT``.

    from svpt.protocols import SuiteConfig, run_suite
    from svpt.training import TrainConfig
    run_suite(SuiteConfig("vtab", "vtab-1k", TrainConfig(model="vit_base_patch16_224", weights="ViT-B_16.npz",
                          method="svpt", num_prompts=50, optimizer="sgd", epochs=100, batch_size=64),
                          grid="vpt", seeds=[42, 44, 82, 100, 800], output="runs/vtab"))

Each task: an optional lr x weight-decay grid of ``tune`` runs (train800 -> val200), the
best point by validation accuracy after the last epoch, then one ``final`` run per seed
(train800val200 -> test once, after the last epoch). ``results.md``, ``results.csv`` and
``results.png`` hold the table: per task mean +- std over seeds, the group means and the
overall mean as the papers compute them. The run protocols themselves are in
:mod:`svpt.training.protocol`.
"""
from .suite import SUITES, VPT_GRID_LRS, VPT_GRID_WDS, Suite, SuiteConfig, SuiteOutcome, run_suite

__all__ = ["SUITES", "Suite", "SuiteConfig", "SuiteOutcome", "VPT_GRID_LRS", "VPT_GRID_WDS", "run_suite"]
