"""``alignflow sft``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import DataConfig, HubConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig


@dataclasses.dataclass
class SFTConfig:
    """``alignflow sft``: supervised fine-tuning."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Policy model.")
    data: DataConfig = field(default_factory=DataConfig, doc="Training data.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4), doc="Optimiser.")
    train: TrainConfig = field(default_factory=TrainConfig, doc="Loop settings.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
