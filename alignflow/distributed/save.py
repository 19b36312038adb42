"""Saving a trained model: safetensors and config (or a LoRA adapter), written atomically; a sharded (FSDP2)
model is gathered first. Lives beside the checkpoints because a sharded save is a collective. ``alignflow merge``
(:mod:`alignflow.trainers.merge`) uses it to save a LoRA output with its adapters folded in."""

from __future__ import annotations

from torch import nn

from alignflow.distributed.checkpoint import atomic_dir, export_hf
from alignflow.distributed.shard import is_sharded


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
