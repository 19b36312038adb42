"""``alignflow refuel``: its schema (multi-turn REFUEL against an environment, docs/refuel.md)."""

from __future__ import annotations

import dataclasses
from typing import Any

from alignflow.config.loader import field
from alignflow.config.sections import DataConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig

COUNTING_USER = "alignflow.envs.counting_user:make_env"


@dataclasses.dataclass
class RefuelOptions:
    """One REFUEL step: roll-ins, two rollouts from each branch point, the regression loss."""

    episodes_per_step: int = field(32, doc="Roll-ins per step (two rollouts each: up to 2x episodes).", range=(1, None))
    horizon: int = field(
        3, doc="H: assistant turns per episode; the branch turn h is uniform in 1..H.", range=(1, None)
    )
    eta: float = field(
        1.0, doc="Scale of the return difference in (lr(y) - lr(y') - eta * (Q(y) - Q(y')))^2.", range=(0.0, None)
    )
    temperature: float = field(1.0, doc="Sampling temperature of every turn.", range=(1e-6, None))
    max_new_tokens: int = field(4, doc="Tokens per assistant turn at most.", range=(1, None))
    max_total_tokens: int = field(512, doc="Tokens per episode at most (all turns).", range=(2, None))
    eval_episodes: int = field(
        100,
        doc="Sampled episodes (seeded) of the evaluation before and after training (eval/return_mean).",
        range=(1, None),
    )


@dataclasses.dataclass
class RefuelEnvConfig:
    path: str = field(
        COUNTING_USER,
        doc="The environment: 'pkg.module:factory' or 'file.py:factory' (docs/environments.md); the default is "
        "the built-in simulated user of the counting dialogue.",
    )
    kwargs: dict[str, Any] = field(default_factory=dict, doc="Keyword arguments of the environment factory.")


@dataclasses.dataclass
class WarmStartConfig:
    """The built-in model's warm start (model.name_or_path empty, counting dialogue only): SFT on simulated
    conversations that answer right with probability ``right``."""

    sft_steps: int = field(
        150, doc="SFT steps of the warm start; 0 starts REFUEL from the untrained model.", range=(0, None)
    )
    conversations: int = field(2000, doc="Simulated conversations in the warm-start corpus.", range=(1, None))
    right: float = field(0.5, doc="Probability that an answer of the corpus is right.", range=(0.0, 1.0))
    lr: float = field(3e-3, doc="Warm-start learning rate (constant).", range=(0.0, None))


@dataclasses.dataclass
class RefuelConfig:
    """``alignflow refuel``: multi-turn REFUEL (Gao et al. 2024, "Regressing the Relative Future"). Each step rolls
    in ``refuel.episodes_per_step`` episodes with the current policy to a random turn h, branches two rollouts to the
    end, and regresses the difference of their log-ratios on the difference of their future returns (one optimiser
    step). ``train.max_steps`` counts REFUEL steps. With ``model.name_or_path`` empty the built-in task's tiny model
    (task.name, default calculator: its tokenizer has the digits) is warm-started on the counting dialogue."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="Policy; empty: the built-in task's tiny model after the warm start (warm_start.*).",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="auto", eval_fraction=0.0),
        doc="Rows given to the environment's reset (their fields are the environment's); empty with the default "
        "environment: 64 counting-dialogue rows.",
    )
    env: RefuelEnvConfig = field(default_factory=RefuelEnvConfig, doc="The environment (simulated user).")
    refuel: RefuelOptions = field(default_factory=RefuelOptions, doc="REFUEL step.")
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig, doc="Warm start of the built-in model.")
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-3, scheduler="constant", weight_decay=0.0), doc="Optimiser."
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=30, log_every=1, packing=False), doc="Loop settings."
    )
    task: TaskConfig = field(
        default_factory=lambda: TaskConfig(
            name="calculator", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, num_sft=8, num_pairs=8
        ),
        doc="Built-in task whose tokenizer and tiny model are used when model.name_or_path is empty.",
    )
