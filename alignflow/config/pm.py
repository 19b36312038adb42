"""``alignflow pm``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import DataConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig


@dataclasses.dataclass
class PMOptions:
    symmetric: bool = field(
        False,
        doc="Enforce P(y>y') + P(y'>y) = 1: P = sigmoid((z(x,y,y') - z(x,y',y))/2); "
        "false: P = sigmoid(z(x,y,y')), its asymmetry measured (pm/symmetry_gap).",
    )


@dataclasses.dataclass
class PMConfig:
    """``alignflow pm``: a pairwise preference model P(y > y' | x) trained on pairs shown in both orders
    (docs/pairwise_rm.md)."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Backbone (a causal LM; a new one-logit head).")
    data: DataConfig = field(default_factory=lambda: DataConfig(format="preference"), doc="Preference pairs.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4), doc="Optimiser.")
    train: TrainConfig = field(default_factory=TrainConfig, doc="Loop settings.")
    pm: PMOptions = field(default_factory=PMOptions, doc="Preference-model options.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
