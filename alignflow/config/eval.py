"""``alignflow eval``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import check_device, field
from alignflow.config.sections import DataConfig, TaskConfig


@dataclasses.dataclass
class EvalConfig:
    """``alignflow eval``: evaluate a policy (samples scored by the task's gold reward and/or a reward model, KL to a
    reference, length, diversity, accuracy), the reward-KL frontier of several policies, or a reward model
    (pairwise accuracy on preference data). Metrics: docs/eval.md."""

    policy: str = field("", doc="Policy model directory or hub id; empty skips policy evaluation.")
    reward_model: str = field("", doc="Reward model directory; scores policy samples, or is evaluated on data.path.")
    tokenizer: str = field("", doc="Tokenizer; empty means the policy's (or the reward model's) directory.")
    reference: str = field(
        "",
        doc="Reference policy (the SFT model in practice, same tokenizer) for eval/kl and "
        "the frontier's x axis; empty skips the KL metrics.",
    )
    frontier: list[str] = field(
        default_factory=list,
        doc="Policies for the reward-KL frontier (needs reference): "
        "model directories, alignflow checkpoints (checkpoints/step-N, "
        "loaded on the reference's architecture) or run directories "
        "(each checkpoint, then model/). Writes frontier.json/.png.",
    )
    data: DataConfig = field(
        default_factory=lambda: DataConfig(format="auto", eval_fraction=0.0),
        doc="Prompts (policy evaluation) or preference pairs (reward-model evaluation). "
        "Empty: the built-in task's held-out prompts.",
    )
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task for the gold reward.")
    users: bool = field(
        False,
        doc="Per-user evaluation of a personalised policy (P-DPO, its user_embeddings.safetensors): the built-in "
        "task's held-out user prompts (reviews), each generated after its user's soft prompt and scored by that "
        "user's gold reward; adds eval/gold_reward/<user>. Needs user embeddings in the policy.",
    )
    num_prompts: int = field(128, doc="Prompts sampled for policy evaluation.", range=(1, None))
    samples_per_prompt: int = field(
        4, doc="Samples per prompt (diversity is measured within a prompt).", range=(1, None)
    )
    max_new_tokens: int = field(48, doc="Tokens generated per sample.", range=(1, None))
    temperature: float = field(1.0, doc="Sampling temperature (0 = greedy).", range=(0.0, None))
    output_dir: str = field("runs/eval", doc="Where eval.json, samples.jsonl and the frontier files are written.")
    seed: int = field(0, doc="Sampling seed (every frontier policy gets the same prompts and seed).")
    device: str = field("auto", doc="Device: auto = cuda when available, else cpu.", check=check_device)
