"""Models: loading (local path or hub id), LoRA, reward/value heads, ArmoRM gating, memory-lean token log-probs."""

from alignflow.models.backbone import get_backbone, get_lm_head, get_score_head, hidden_states, unwrap
from alignflow.models.heads import (
    GatingNetwork,
    combine,
    gated_scores,
    last_token_hidden,
    sequence_scores,
    token_values,
)
from alignflow.models.loading import (
    ModelLoadError,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    seed_head_rows,
)
from alignflow.models.logprobs import token_logprobs

__all__ = [
    "GatingNetwork",
    "ModelLoadError",
    "combine",
    "gated_scores",
    "get_backbone",
    "get_lm_head",
    "get_score_head",
    "hidden_states",
    "last_token_hidden",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
    "seed_head_rows",
    "sequence_scores",
    "token_logprobs",
    "token_values",
    "unwrap",
]
