"""``alignflow rm``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import (
    DataConfig,
    HubConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    TaskConfig,
    TrainConfig,
)


@dataclasses.dataclass
class RMConfig:
    """``alignflow rm``: reward-model training."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Reward-model backbone.")
    data: DataConfig = field(default_factory=lambda: DataConfig(format="preference"), doc="Preference or rated data.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4), doc="Optimiser.")
    train: TrainConfig = field(default_factory=TrainConfig, doc="Loop settings.")
    reward: RewardConfig = field(default_factory=RewardConfig, doc="Reward-model options.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
