"""``alignflow mpo``: its schema (a ``po`` stage and an ``rl`` stage)."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.po import POConfig
from alignflow.config.rl import AlgoConfig, RLConfig
from alignflow.config.sections import DataConfig, HubConfig, ModelConfig, RewardSourceConfig, TaskConfig


@dataclasses.dataclass
class MPOOptions:
    delta: float = field(
        1.0,
        doc="Reward-gap threshold: pairs with |r(chosen) - r(rejected)| > delta are easy (DPO), "
        "the rest hard (RL on their prompts). Tuned per reward scale (paper value "
        "unverified); -inf: everything easy, no RL stage.",
        allow_inf=True,
    )


@dataclasses.dataclass
class MPOConfig:
    """``alignflow mpo``: mixed preference optimisation (Gou & Nguyen 2024). Score every pair with ``reward``, split
    easy/hard by ``mpo.delta``, run DPO (section ``dpo``, an ``alignflow po`` config) on the easy pairs from the SFT
    model, then online RL (section ``rl``, an ``alignflow rl`` config) on the hard pairs' prompts with the DPO model as
    the initial policy AND the KL reference. The stages' model/data/reward/task/output_dir keys are set from the
    top-level ones (setting them in dpo.* or rl.* is an error)."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="The SFT policy (stage-1 initialisation and "
        "reference). Empty: the built-in task's model after "
        "dpo.builtin.sft_steps of SFT.",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="preference", eval_fraction=0.0),
        doc="Preference pairs. Empty: the built-in task's prompts answered by the SFT model, "
        "gold-labelled (dpo.builtin).",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig, doc="Scores the pairs for the split, and is the RL stage's reward."
    )
    mpo: MPOOptions = field(default_factory=MPOOptions, doc="The easy/hard split.")
    dpo: POConfig = field(default_factory=POConfig, doc="Stage 1 (loss, optim, train, ref_cache, builtin).")
    rl: RLConfig = field(
        default_factory=lambda: RLConfig(algo=AlgoConfig(name="ppo")),
        doc="Stage 2 (algo, kl, rollout, optim, train, critic, dapo).",
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
    output_dir: str = field("runs/mpo", doc="Run directory; the stages write to <output_dir>/dpo and <output_dir>/rl.")
    eval_prompts: int = field(
        64,
        doc="Held-out prompts of the built-in task sampled (2 each, temperature 1) after "
        "SFT, DPO and RL for eval/gold_reward_*; 0 disables.",
        range=(0, None),
    )
