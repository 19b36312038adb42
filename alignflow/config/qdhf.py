"""``alignflow qdhf``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import OptimConfig, TaskConfig, TrainConfig


@dataclasses.dataclass
class QDHFSection:
    data_path: str = field(
        "", doc="Rated rows ({prompt, completions}) whose responses form the pool; empty: the task's rated.jsonl."
    )
    triplets: int = field(1000, doc="Similarity judgements (ref, x1, x2) asked of the task's judge.", range=(1, None))
    dims: int = field(
        2, doc="Learned descriptor dimensions K (paper: the number of QD measures, e.g. 2).", range=(1, None)
    )
    margin: float = field(0.05, doc="Triplet-loss margin m (paper: 0.05).", range=(0.0, None))
    bins: int = field(5, doc="Archive cells per descriptor dimension.", range=(1, None))
    quality_quantile: float = field(
        0.5, doc="Only pool samples whose gold reward reaches this quantile enter the archive.", range=(0.0, 1.0)
    )
    policy: str = field(
        "",
        doc="QD selection at generation: a policy (model directory or builtin:sft) samples `samples` responses per "
        "held-out prompt and k = `select` are kept by MAP-Elites over the learned descriptors (quality = gold), "
        "against best-of-k; empty: off.",
    )
    samples: int = field(16, doc="policy: responses sampled per prompt (n).", range=(1, None))
    select: int = field(4, doc="policy: responses kept per prompt (k).", range=(1, None))
    prompts: int = field(32, doc="policy: held-out prompts sampled.", range=(1, None))
    max_new_tokens: int = field(48, doc="policy: generation budget per response.", range=(1, None))


@dataclasses.dataclass
class QDHFConfig:
    """``alignflow qdhf``: quality diversity through human feedback on the reviews task: descriptors learned from
    similarity judgements, a MAP-Elites archive over them, against best-of-n. Of the ``train`` section it reads
    output_dir, overwrite, max_steps (descriptor-learning steps), seed, log_every and progress."""

    qdhf: QDHFSection = field(default_factory=QDHFSection, doc="QDHF options.")
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2), doc="Optimiser (Adam at optim.lr).")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=200), doc="Loop.")
    task: TaskConfig = field(default_factory=TaskConfig, doc="Built-in task (reviews): its pool and its judge.")
