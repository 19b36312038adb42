"""Saving a trained model: safetensors and config (or a LoRA adapter), written atomically; a sharded (FSDP2)
model is gathered first. Lives beside the checkpoints because a sharded save is a collective. Also ``alignflow
merge`` (:func:`merge_adapter`), which loads a LoRA output and saves the merged model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from alignflow.config import ModelConfig
from alignflow.distributed.checkpoint import atomic_dir, export_hf
from alignflow.distributed.shard import is_sharded
from alignflow.models.loading import (
    ModelLoadError,
    adapter_base,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    load_value_model,
)

logger = logging.getLogger(__name__)


def save_model(model: nn.Module, tokenizer, out_dir, merge_lora: bool = False) -> nn.Module:
    """Write ``model`` (safetensors + config) and ``tokenizer`` to ``out_dir`` atomically; return what was saved.

    A peft model saves its adapters only (``adapter_model.safetensors``), unless ``merge_lora=True``: then the
    adapters are folded into the base weights IN PLACE (``merge_and_unload``) and the plain merged model is
    saved and returned -- use it, not the old peft wrapper, afterwards.
    An existing ``out_dir`` is replaced: moved aside, the new one renamed in, then the old one deleted.
    A sharded (FSDP2) model is collective: every rank calls this, the full weights are gathered and rank 0 writes
    one consolidated checkpoint (:func:`~alignflow.distributed.checkpoint.export_hf`).
    """
    if is_sharded(model):
        if merge_lora:  # merge_and_unload would rewrite sharded DTensor weights in place
            raise ValueError(
                "save_model: merge_lora=True is not supported for a sharded model; save the adapters "
                "(merge_lora=False) and merge them in one process"
            )
        export_hf(model, tokenizer, out_dir)
        return model
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return model


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
