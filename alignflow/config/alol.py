"""``alignflow alol``: its schema."""

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

# ----------------------------------------------------------------------------------------------- SuperHF, A-LoL
ALOL_VARIANTS = ("alol", "seq", "ref_free", "kl")  # = alignflow.algorithms.offline.ALOL_VARIANTS (a test checks)


@dataclasses.dataclass
class ALoLOptions:
    variant: str = field(
        "alol",
        doc="Loss: A-LoL (sequence importance weight), seq (per-token weights), ref_free "
        "(weight 1) or kl (weight 1 plus kl_beta * (LP_theta - LP_ref)).",
        choices=ALOL_VARIANTS,
    )
    clip: float = field(0.9, doc="Importance weight clip c: w in [1 - c, 1 + c] (paper: 0.9).", range=(0.0, None))
    kl_beta: float = field(0.2, doc="beta of the kl variant (LoL-RL README: 0.2).", range=(0.0, None))
    sampling: str = field(
        "uniform",
        doc="Training-row order: uniform epochs, or good_priority (rows drawn with "
        "probability proportional to their advantage, with replacement).",
        choices=("uniform", "good_priority"),
    )
    reward_field: str = field(
        "reward", doc="Data field holding R(x, y); rows without it are scored once by the reward sources."
    )


@dataclasses.dataclass
class ValueFitConfig:
    num_prompts: int = field(0, doc="Distinct training prompts used to fit V_ref; 0 = all of them.", range=(0, None))
    hidden_size: int = field(
        256, doc="Width of the value MLP on the reference's last prompt hidden state.", range=(1, None)
    )
    steps: int = field(300, doc="Full-batch Adam steps of the MSE fit.", range=(1, None))
    lr: float = field(1e-3, doc="Learning rate of the value MLP.", range=(0.0, None))


@dataclasses.dataclass
class ALoLConfig:
    """``alignflow alol``: A-LoL (Baheti et al. 2023), offline policy gradient on fixed prompt-completion data.

    R(x, y) comes from the rows' ``alol.reward_field`` or is scored once by ``reward``; V_ref(x) is an MLP on the
    frozen reference's prompt hidden state, fit to the rewards of ``rollout.n`` samples per prompt from the reference
    (``rollout.temperature``/``top_p``/``top_k``/``max_new_tokens``; ``rollout.prompts_per_step`` prompts per
    generation call). Rows with A = R - V_ref <= 0 are dropped. ``train.batch_size`` rows per optimiser step;
    ``rollout.eval_prompts`` held-out prompts are decoded greedily at the end. Preference rows are accepted: both
    responses become rows, scored by ``reward``. The reference is the policy's initial weights; everything it is needed
    for is computed once before training, so no second model is held.
    """

    model: ModelConfig = field(default_factory=ModelConfig, doc="Policy; its initial weights are the reference pi_ref.")
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="auto", eval_fraction=0.0),
        doc="Fixed data: prompt_completion rows (optional reward field) or preference rows. "
        "Empty: the built-in task's preference pairs, both responses of each.",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-4, scheduler="constant"),
        doc="Optimiser (LoL-RL's HH script: lr 2e-4, constant, QLoRA LLaMA-7B).",
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=16, packing=False, log_every=1),
        doc="Loop settings (LoL-RL's HH script: 16 rows per step).",
    )
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=64, n=4),
        doc="Sampling from pi_ref for the value fit, and the held-out evaluation.",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig, doc="Reward sources: score rows without a reward, and pi_ref's samples."
    )
    alol: ALoLOptions = field(default_factory=ALoLOptions, doc="A-LoL loss and sampling.")
    value: ValueFitConfig = field(default_factory=ValueFitConfig, doc="The reference value estimate V_ref(x).")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
