"""``alignflow vpl``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import DataConfig, ModelConfig, OptimConfig, TaskConfig, TrainConfig


@dataclasses.dataclass
class VPLSection:
    embedding: str = field(
        "hidden",
        doc="What a (prompt, response) is to the reward model: the frozen model's mean last hidden state, or the "
        "reviews task's four attribute ratings (task_ratings; the reviews task's data only).",
        choices=("hidden", "task_ratings"),
    )
    latent: int = field(
        8, doc="Width of the user latent z; 0 = a plain Bradley-Terry reward model (no encoder).", range=(0, None)
    )
    hidden: int = field(64, doc="Width of the encoder's and the decoder's MLPs.", range=(1, None))
    context_pairs: int = field(
        4, doc="Labelled pairs of a user the encoder reads (paper: 2-4 or more).", range=(1, None)
    )
    kl_weight: float = field(
        0.01, doc="w_KL on KL(q(z|C) || N(0, I)) (paper: 3e-6 with a 512-wide latent).", range=(0.0, None)
    )
    kl_anneal_steps: int = field(
        50, doc="Steps over which w_KL rises linearly from 0 (0: no annealing).", range=(0, None)
    )
    eval_contexts: int = field(
        4, doc="Context sets drawn per user at evaluation (accuracies are averaged).", range=(1, None)
    )


@dataclasses.dataclass
class VPLConfig:
    """``alignflow vpl``: a variational preference-learning reward model (VPL) on a frozen model's embeddings.

    Reads ``data.path`` (training pairs with a ``user`` field) and ``data.eval_path`` (held-out pairs of the same
    users); empty paths use the built-in reviews task's users (``user_pairs.jsonl``, ``user_eval.jsonl``). Of the
    ``train`` section it reads output_dir, overwrite, max_steps, batch_size (pairs per step), seed, log_every,
    device and progress."""

    model: ModelConfig = field(default_factory=ModelConfig, doc="Frozen model whose mean hidden state embeds a text.")
    data: DataConfig = field(default_factory=lambda: DataConfig(format="preference"), doc="User pairs.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3), doc="Optimiser (Adam at optim.lr).")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=300, batch_size=64), doc="Loop.")
    vpl: VPLSection = field(default_factory=VPLSection, doc="VPL options.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (used when paths are empty).")
