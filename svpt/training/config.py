"""Every setting of a training run; saved as ``config.json`` in the run directory."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot be used; the message says what is accepted."""


# Settings that may differ when a run is resumed: they do not change what is trained
# (the evaluation batch size changes evaluation numbers by rounding only; eager and CUDA-graph
# steps compute the same numbers).
RESUME_MAY_CHANGE = ("workers", "threads", "stop_after_epoch", "output", "progress", "device_data",
                     "eval_batch_size", "cuda_graphs")


@dataclass
class TrainConfig:
    # model
    model: str | None = None            # timm name; None: the quick-start model (backbone.QUICKSTART)
    model_kwargs: dict = field(default_factory=dict)
    weights: str | None = None
    img_size: int | None = None         # None: the data's own size (built-in data) or the model's
    # method
    method: str = "svpt"
    num_prompts: int = 8
    options: dict = field(default_factory=dict)  # METHOD.md options given explicitly
    backend: str = "auto"
    # data and protocol
    data: str | None = None             # None: built-in data
    protocol: str | None = None         # tune, final, max-test (training.protocol); None: final if the
                                        # data has a test split, else tune
    train_split: str | None = None      # None: the protocol's
    eval_split: str | None = None       # None: the protocol's
    augment: str | None = None          # none, crop-flip, resized-crop-flip; None: the data's (FGVC: crop-flip)
    val_fraction: float = 0.1
    limit_train: int | None = None
    limit_eval: int | None = None
    # optimisation
    epochs: int = 4
    batch_size: int = 32                # global: split evenly over the processes
    eval_batch_size: int = 256          # global; no gradients, so larger than training's
    lr: float = 3e-2
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    seed: int = 0
    amp: bool = True                    # bf16 autocast on CUDA (ignored on CPU)
    # run
    output: str | None = None
    workers: int | None = None
    threads: int | None = None          # CPU intra-op threads; None: 1 for the quick-start model, else torch's
    device: str | None = None
    device_data: str = "auto"           # auto: decode once, keep on the device when it fits; always; never (DataLoader)
    cuda_graphs: str = "auto"           # auto: replay each batch size's training step from a CUDA graph where
                                        # it can run (one CUDA process, no prompt dropout); on; off
    stop_after_epoch: int | None = None
    progress: str = "auto"              # auto (bar on a TTY, lines otherwise), bar, lines, none

    def check(self) -> "TrainConfig":
        from ..data import AUGMENTATIONS
        from .batches import DEVICE_DATA
        from .protocol import PROTOCOLS
        from .steps import CUDA_GRAPHS

        positive = {"num_prompts": self.num_prompts, "epochs": self.epochs, "batch_size": self.batch_size,
                    "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not accepted; it must be an integer >= 1")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} is not accepted; it must be > 0")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ConfigError("--weight-decay and --warmup-epochs must be >= 0")
        choices = {"optimizer": ("sgd", "adamw"), "progress": ("auto", "bar", "lines", "none"),
                   "protocol": PROTOCOLS, "augment": AUGMENTATIONS, "device_data": DEVICE_DATA,
                   "cuda_graphs": CUDA_GRAPHS}
        for name, accepted in choices.items():
            value = getattr(self, name)
            if value not in accepted and not (value is None and name in ("protocol", "augment")):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not accepted; "
                                  f"accepted: {', '.join(accepted)}")
        for name in ("limit_train", "limit_eval", "img_size", "stop_after_epoch", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not accepted; it must be an integer >= 1")
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"config has unknown settings {unknown}; was it written by another svpt version?")
        return cls(**data)


def read_run_config(run_dir: str) -> dict[str, Any]:
    """The ``config.json`` of a run directory: the settings and what they resolved to."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not an svpt run directory (no config.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
