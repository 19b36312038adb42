"""``alignflow demo``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.rl import RL_ALGORITHMS
from alignflow.config.sections import TaskConfig


@dataclasses.dataclass
class DemoConfig:
    """``alignflow demo``: the whole pipeline on the built-in ``reviews`` task in a few minutes on a CPU."""

    output_dir: str = field("runs/demo", doc="Run directory (report.md, plots, models).")
    seed: int = field(0, doc="Seed for everything.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="The built-in task.")
    sft_steps: int = field(400, doc="SFT optimiser steps.", range=(1, None))
    sft_lr: float = field(3e-3, doc="SFT peak learning rate.", range=(0.0, None))
    sft_batch_size: int = field(32, doc="SFT rows per step.", range=(1, None))
    num_prompts: int = field(
        1024, doc="Prompts sampled from the SFT policy to build preference pairs.", range=(8, None)
    )
    samples_per_prompt: int = field(8, doc="Samples per prompt; disjoint pairs of them are labelled.", range=(2, None))
    max_new_tokens: int = field(40, doc="Tokens generated per sample.", range=(1, None))
    temperature: float = field(1.0, doc="Sampling temperature of the SFT policy.", range=(0.0, None))
    rm_steps: int = field(300, doc="Reward-model optimiser steps.", range=(1, None))
    rm_lr: float = field(1e-3, doc="Reward-model peak learning rate.", range=(0.0, None))
    rm_batch_size: int = field(32, doc="Pairs per reward-model step.", range=(1, None))
    eval_fraction: float = field(0.15, doc="Pairs held out to measure reward-model accuracy.", range=(0.05, 0.5))
    rl_algo: str = field(
        "ppo", doc="Online RL stage against the learned reward model; none skips it.", choices=("none",) + RL_ALGORITHMS
    )
    rl_steps: int = field(24, doc="RL steps (one rollout batch each).", range=(1, None))
    rl_lr: float = field(3e-4, doc="RL actor learning rate (constant).", range=(0.0, None))
    rl_rows_per_step: int = field(
        64,
        doc="Responses sampled per RL step (PPO: one per prompt; group methods: rows / rl_n prompts).",
        range=(1, None),
    )
    rl_n: int = field(
        8, doc="Group size of the group methods (GRPO, RLOO, ...); PPO samples one per prompt.", range=(2, None)
    )
    rl_kl_coef: float = field(0.1, doc="KL coefficient beta to the SFT policy.", range=(0.0, None))
    rl_eval_every: int = field(
        5, doc="RL steps between greedy evaluations on held-out prompts (gold and proxy reward).", range=(1, None)
    )
    progress: bool = field(True, doc="Show progress bars.")
