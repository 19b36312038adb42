"""``alignflow superhf``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import (
    DataConfig,
    HubConfig,
    ModelConfig,
    OptimConfig,
    RewardSourceConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
)


@dataclasses.dataclass
class SuperHFOptions:
    beta: float = field(
        0.35,
        doc="KL weight beta of CE(y*) + beta * max(0, KL(pi_0 || pi_theta)) (SuperHF paper: "
        "0.35); 0 is SFT on the best samples and loads no prior.",
        range=(0.0, None),
    )
    keep: int = field(1, doc="Completions kept per prompt: the top-k by reward (paper: top-1).", range=(1, None))


@dataclasses.dataclass
class SuperHFConfig:
    """``alignflow superhf``: SuperHF (Mukobi et al. 2023): sample ``rollout.n`` completions for each of
    ``rollout.prompts_per_step`` prompts, keep the best ``superhf.keep`` of each by reward, and fine-tune on them with
    CE plus a KL prior. ``train.batch_size`` kept completions make one optimiser step; ``train.max_steps`` counts
    SuperHF steps (sample -> filter -> update; 0: ``train.epochs`` passes over the prompts)."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="Policy; its initial weights are the prior pi_0 (under LoRA: the policy with adapters disabled, no copy).",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt' and any fields the rewards read).",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-5, scheduler="constant"), doc="Optimiser (paper: lr 2e-5)."
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=2, packing=False, max_steps=100, log_every=1),
        doc="Loop settings.",
    )
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=2, n=16, top_p=0.95),
        doc="Sampling of the candidates (paper: 2 prompts x 16, temperature 1, "
        "top-p 0.95) and the greedy held-out evaluation.",
    )
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig, doc="Reward sources that rank the samples.")
    superhf: SuperHFOptions = field(default_factory=SuperHFOptions, doc="SuperHF loss and filtering.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
