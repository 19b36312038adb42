"""``alignflow cgpo``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import ConfigError, field
from alignflow.config.sections import (
    DataConfig,
    HubConfig,
    JudgeConfig,
    ModelConfig,
    OptimConfig,
    RewardSourceConfig,
    RolloutConfig,
    TaskConfig,
    TrainConfig,
)

CGPO_UPDATES = ("crpg", "codpo", "crraft")


@dataclasses.dataclass
class CGPOOptions:
    update: str = field(
        "crpg",
        doc="Policy update: crpg (feasible samples weighted by their calibrated reward), codpo (DPO of the best "
        "feasible sample against the worst infeasible one, plus its NLL), crraft (fine-tune on the best feasible "
        "sample of each prompt). Formulas in docs/cgpo.md.",
        choices=CGPO_UPDATES,
    )
    rule_judges: dict[str, str] = field(
        default_factory=dict,
        doc="Rule judges: name -> 'module:function' (or 'file.py:function'); fn(prompts, responses, **row_fields) "
        "returns one value per sample, true (or >= 0.5) when the sample SATISFIES the constraint.",
    )
    principles: dict[str, str] = field(
        default_factory=dict,
        doc="LLM principle judges: name -> principle text, each asked as a yes/no question of cgpo.judge "
        "(a constraint per principle; yes = satisfied).",
    )
    judge: JudgeConfig = field(
        default_factory=lambda: JudgeConfig(template="principle"),
        doc="The LLM that answers cgpo.principles (model or url; the template is always principle).",
    )
    task_rewards: dict[str, str] = field(
        default_factory=dict,
        doc="Per-task reward models: a prompt row's 'task' field -> a reward-model directory or a "
        "'module:function' reward; rows without a 'task' field are scored by the reward section.",
    )
    anchor: str = field(
        "group_mean",
        doc="Anchor of the calibrated reward sigmoid(r - r_anchor): group_mean (the mean reward of the prompt's "
        "samples) or field (the reward of the row's cgpo.anchor_field response, as in the paper).",
        choices=("group_mean", "field"),
    )
    anchor_field: str = field("reference", doc="anchor=field: the prompt-row field holding the anchor response.")
    beta: float = field(0.1, doc="codpo: DPO temperature beta.", range=(0.0, None))
    lam: float = field(1.0, doc="codpo: weight of the chosen response's length-normalised NLL.", range=(0.0, None))


@dataclasses.dataclass
class CGPOConfig:
    """``alignflow cgpo``: CGPO (Xu et al. 2024, "The Perfect Blend"): each step samples ``rollout.n`` responses for
    each of ``rollout.prompts_per_step`` prompts, scores them with the reward model(s) (per task), judges them with
    a mixture of rule and LLM judges (constraints), and updates the policy with CRPG, CODPO or CRRAFT
    (``cgpo.update``). One optimiser step per CGPO step; ``train.max_steps`` counts CGPO steps."""

    model: ModelConfig = field(
        default_factory=ModelConfig, doc="Policy; its initial weights are CODPO's reference (a frozen copy)."
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="prompt", eval_fraction=0.0),
        doc="Prompts (rows with 'prompt', optionally 'task' and the anchor field).",
    )
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, scheduler="constant"), doc="Optimiser of the policy."
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(batch_size=1, packing=False, max_steps=100, log_every=1),
        doc="Loop settings (train.batch_size is unused: a step's whole sample is one update).",
    )
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(prompts_per_step=8, n=4),
        doc="Sampling (rollout.n is the group size G) and the greedy held-out evaluation.",
    )
    reward: RewardSourceConfig = field(
        default_factory=RewardSourceConfig, doc="Default reward sources (rows without a 'task' field)."
    )
    cgpo: CGPOOptions = field(default_factory=CGPOOptions, doc="Judges, per-task rewards and the update.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
    hub: HubConfig = field(default_factory=lambda: HubConfig(), doc="Push the trained model to the Hugging Face Hub.")

    def check_rules(self, prefix: str = "") -> None:
        """Rules between keys, run by the loader once the config is complete."""
        c = self.cgpo
        if not c.rule_judges and not c.principles:
            raise ConfigError(f"{prefix}cgpo: no judge; set cgpo.rule_judges and/or cgpo.principles (with cgpo.judge)")
        if c.principles and bool(c.judge.model) == bool(c.judge.url):
            raise ConfigError(
                f"{prefix}cgpo.judge: cgpo.principles needs exactly one of cgpo.judge.model and cgpo.judge.url"
            )
        both = sorted(set(c.rule_judges) & set(c.principles))
        if both:
            raise ConfigError(f"{prefix}cgpo: judge names {both} are both rule judges and principles; rename one")
        if c.update in ("codpo", "crraft") and self.rollout.n < 2:
            raise ConfigError(
                f"{prefix}rollout.n={self.rollout.n}: cgpo.update={c.update} compares samples, needs n >= 2"
            )
