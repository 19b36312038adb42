"""``alignflow serve``: its schema."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field
from alignflow.config.sections import JudgeConfig


@dataclasses.dataclass
class ServeConfig:
    """``alignflow serve``: serve trained reward models, a pairwise preference model or an LLM judge on POST /score
    (docs/remote_rewards.md); each model re-renders the texts with its own tokenizer."""

    models: list[str] = field(default_factory=list, doc="Reward-model directories (k form an ensemble).")
    preference_model: str = field(
        "",
        doc="Instead: a pairwise preference model (alignflow pm); reward = P(response "
        "beats the row's anchor_field response).",
    )
    anchor_field: str = field("reference", doc="preference_model: the request key holding the anchor responses.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, doc="Instead: an LLM judge (judge.model or judge.url).")
    aggregation: str = field("mean", doc="Ensemble aggregation.", choices=("mean", "min", "uwo"))
    uwo_lambda: float = field(0.5, doc="Variance weight of the uwo aggregation.", range=(0.0, None))
    host: str = field("127.0.0.1", doc="Address to listen on (0.0.0.0: every interface).")
    port: int = field(8000, doc="Port; 0 picks a free one (printed at start).", range=(0, 65535))
    device: str = field("auto", doc="Device for the models: auto (cuda when available), cpu, cuda, cuda:N.")
    max_rows: int = field(1024, doc="Most rows one request may hold (more: HTTP 413).", range=(1, None))
    budget: int = field(
        8192, doc="Padded tokens per forward (speed only; scores do not depend on it).", range=(1, None)
    )
