"""``alignflow merge`` and ``alignflow merge_models``: their schemas."""

from __future__ import annotations

import dataclasses

from alignflow.config.loader import field


@dataclasses.dataclass
class MergeConfig:
    """``alignflow merge adapter=DIR output=DIR``: fold a LoRA adapter (a directory with adapter_config.json, e.g.
    the model/ of a run with model.lora.enabled=true) into its base model and save the plain merged model."""

    adapter: str = field("", doc="LoRA adapter directory; its adapter_config.json names the base model.")
    output: str = field("", doc="Directory for the merged model and the tokenizer (replaced if it exists).")
    dtype: str = field(
        "float32",
        doc="dtype the base model is loaded and the merged model saved in.",
        choices=("float32", "bfloat16", "float16", "auto"),
    )


@dataclasses.dataclass
class MergeModelsConfig:
    """``alignflow merge_models models=[A,B] weights=[0.5,0.5] output=DIR``: the weighted average of several
    same-architecture causal LMs (SALSA, Balanced Actor Initialization; docs/merging.md). Use DIR as an RL run's
    ``model.name_or_path`` (the actor's start) or ``ref_model`` (the KL reference)."""

    models: list[str] = field(
        default_factory=list,
        doc="Model directories or hub ids (same architecture and tokenizer); the first one's tokenizer is saved.",
    )
    weights: list[float] = field(default_factory=list, doc="One weight >= 0 per model, summing to 1; empty: equal.")
    output: str = field("", doc="Directory for the merged model, its tokenizer and merge.json (replaced if it exists).")
    dtype: str = field(
        "float32",
        doc="dtype the models are loaded and the merged model saved in.",
        choices=("float32", "bfloat16", "float16"),
    )
