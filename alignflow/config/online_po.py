"""``alignflow online_po``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.po import POLossConfig
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

# ----------------------------------------------------------------------------------------------- online / iterative PO
ONLINE_PO_METHODS = ("iterative_dpo", "inpo", "apo", "nash_md")


@dataclasses.dataclass
class OnlinePOOptions:
    method: str = field(
        "iterative_dpo",
        doc="iterative_dpo (RLHF Workflow: sample, best-vs-worst pairs, DPO, "
        "repeat), inpo (loss inpo against the previous round's policy), apo "
        "(iterative DPO with a Nesterov-extrapolated reference), nash_md "
        "(Nash-MD-PG against the policy/reference mixture).",
        choices=ONLINE_PO_METHODS,
    )
    rounds: int = field(
        3, doc="Rounds (sample -> label -> train); RLHF Workflow and INPO: 3 iterations.", range=(1, None)
    )
    prompts_per_round: int = field(
        256, doc="Fresh training prompts answered in each round (RLHF Workflow: 20k).", range=(1, None)
    )
    steps_per_round: int = field(
        0,
        doc="Optimiser steps per round; 0: epochs_per_round passes over the round's "
        "pairs. Fix it to compare runs after the same number of updates.",
        range=(0, None),
    )
    epochs_per_round: float = field(
        2.0,
        doc="Passes over a round's pairs when steps_per_round is 0 (RLHF Workflow: 2 epochs per iteration).",
        range=(0.0, None),
    )
    ref_update: str = field(
        "initial",
        doc="iterative_dpo's reference: the initial policy in every round (RLHF "
        "Workflow's code), or the previous round's policy (the proximal-point "
        "form that APO accelerates; apo = previous with alpha 0).",
        choices=("initial", "previous"),
    )
    apo_alpha: float = field(
        0.3,
        doc="APO momentum alpha: the next reference is (1 + alpha) * LP(round-start "
        "policy) - alpha * LP(previous round-start policy); 0 is iterative DPO with "
        "ref_update=previous (alpha 0.3 unverified).",
        range=(0.0, None),
    )
    mixture_coef: float = field(
        0.5,
        doc="Nash-MD: beta of the opponent pi_mix ∝ pi^(1-beta) * pi_ref^beta, per token "
        "(TRL mixture_coef 0.5); 0 is self-play, 1 plays the reference.",
        range=(0.0, 1.0),
    )
    kl_coef: float = field(
        0.1, doc="Nash-MD-PG: KL(pi || pi_ref) coefficient of the loss (TRL beta 0.1).", range=(0.0, None)
    )
    preference_scale: float = field(
        1.0,
        doc="Nash-MD: P(y beats y') = sigmoid((r(y) - r(y')) / scale) from the "
        "reward sources (a Bradley-Terry preference model).",
        range=(1e-6, None),
    )
    preference_model: str = field(
        "",
        doc="Nash-MD: a pairwise preference model directory (alignflow pm); P(y beats "
        "y') is read from it instead of sigmoid of a reward difference.",
    )
    eval_samples: int = field(
        2,
        doc="Samples per held-out prompt (rollout.eval_prompts of them, temperature "
        "rollout.temperature, a fixed seed) for eval/* after every round.",
        range=(1, None),
    )


@dataclasses.dataclass
class OnlinePOConfig:
    """``alignflow online_po``: online / iterative preference optimisation (iterative DPO, INPO, APO, Nash-MD).

    Each round answers ``online.prompts_per_round`` fresh prompts ``rollout.n`` times with the current policy, scores
    the answers with ``reward``, and trains for ``online.steps_per_round`` optimiser steps of ``train.batch_size``
    pairs (best vs worst answer of a prompt; ties skipped) with a fresh optimiser. ``rollout.prompts_per_step`` is the
    number of prompts per generation call; ``rollout.eval_prompts`` held-out prompts are SAMPLED (not greedy) after
    every round. ``train.max_steps``/``train.epochs`` are not used (see ``online.*``); ``train.save_every`` counts
    rounds."""

    model: ModelConfig = field(
        default_factory=ModelConfig,
        doc="Policy; usually the SFT model (e.g. runs/sft/model). Empty: the built-in task's untrained tiny model.",
    )
    ref_model: str = field(
        "",
        doc="Reference pi_ref; empty: the policy's initial weights (a frozen copy, or under "
        "LoRA the policy with its adapters disabled).",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt' and any fields the rewards read). Empty: the built-in "
        "task's prompts and held-out prompts.",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-7, scheduler="constant"),
        doc="Optimiser, rebuilt every round (RLHF Workflow: lr 5e-7).",
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=128, log_every=1),
        doc="Loop settings; batch_size = pairs per optimiser step (RLHF Workflow: 128).",
    )
    loss: POLossConfig = field(
        default_factory=POLossConfig,
        doc="Preference loss of iterative_dpo/apo (any pairwise "
        "loss but kto); inpo needs name=inpo; unused by "
        "nash_md.",
    )
    online: OnlinePOOptions = field(default_factory=OnlinePOOptions, doc="Rounds and method.")
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=64, n=8),
        doc="Sampling (RLHF Workflow: n = 8 answers per prompt, best vs worst).",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig,
        doc="Reward sources that rank the answers (reward models, task rewards, Python functions).",
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")
