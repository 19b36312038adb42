"""``alignflow merge``: fold a LoRA adapter into its base model and save the plain model (docs/models.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alignflow.config import ModelConfig
from alignflow.distributed.save import save_model
from alignflow.models.loading import (
    ModelLoadError,
    adapter_base,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)

logger = logging.getLogger(__name__)


def merge_adapter(cfg) -> Path:
    """``alignflow merge``: load ``cfg.adapter``'s base model, fold the LoRA adapter into its weights and save
    the plain model with the tokenizer to ``cfg.output`` (a ``MergeConfig``). Returns the output directory.

    The adapter's peft task decides the model class: a policy (CAUSAL_LM), a reward model (SEQ_CLS, with its
    trained head) or a value model (TOKEN_CLS)."""
    if not cfg.adapter or not cfg.output:
        raise ModelLoadError("alignflow merge needs adapter=DIR (a LoRA adapter directory) and output=DIR")
    base = adapter_base(cfg.adapter)
    if base is None:
        what = "does not exist" if not Path(cfg.adapter).exists() else "has no adapter_config.json"
        raise ModelLoadError(f"adapter={cfg.adapter}: {what}, so it is not a LoRA adapter directory")
    if Path(cfg.output).resolve() == Path(cfg.adapter).resolve():
        raise ModelLoadError(f"output={cfg.output} is the adapter directory itself; choose another directory")
    task = json.loads((Path(cfg.adapter) / "adapter_config.json").read_text()).get("task_type")
    tokenizer = load_tokenizer(cfg.adapter)
    model_cfg = ModelConfig(name_or_path=cfg.adapter, dtype=cfg.dtype)
    if task == "SEQ_CLS":
        model = load_reward_model(model_cfg, pad_token_id=tokenizer.pad_token_id)
    elif task == "TOKEN_CLS":
        model = load_value_model(model_cfg, pad_token_id=tokenizer.pad_token_id)
    else:
        model = load_causal_lm(model_cfg)
    save_model(model, tokenizer, cfg.output)
    logger.info("merged the LoRA adapter %s into %s: %s", cfg.adapter, base, cfg.output)
    return Path(cfg.output)
