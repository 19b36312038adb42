"""Reach inside a Hugging Face model: its transformer backbone, its output head, its last hidden states.

Log-probs, reward scores and values all start from the backbone's hidden states ``(B, T, H)`` and apply a
head to only the positions they need (chunks of T for the LM head, one position for a reward head). The
helpers here find the backbone and head the same way for a plain transformers model, a peft-wrapped one
(LoRA layers are injected in place, so the backbone found through the wrapper still runs the adapters and
``disable_adapter()`` still switches them off) and a ``torch.compile``-d one.

Masks: a 2-D ``attention_mask`` (B, T) of 1 = token, 0 = padding; when ``position_ids`` are not given they
are derived from it (``cumsum - 1``), so left-padded rows get the same positions as unpadded ones. A 4-D
mask (B, 1, T, T), boolean (True = may attend) or additive float, is the block-diagonal causal mask of
packed rows; it must come with ``position_ids`` that restart at every sample (``alignflow.data.collate.pack``).
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper and/or ``torch.compile`` (the model itself otherwise)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but the helpers work without it
        return model
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def get_backbone(model: nn.Module) -> nn.Module:
    """The transformer body (``LlamaModel`` for ``LlamaForCausalLM``) that returns hidden states."""
    base = unwrap(model)
    getter = getattr(base, "get_decoder", None)
    body = getter() if callable(getter) else None
    if body is None:
        body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is base:
        raise TypeError(
            f"cannot find the transformer backbone of {type(base).__name__}: it has no get_decoder() "
            f"and no '{getattr(base, 'base_model_prefix', '')}' sub-module"
        )
    return body


def get_lm_head(model: nn.Module) -> nn.Module:
    """The output projection hidden -> vocabulary logits (shared with the input embedding when tied)."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(unwrap(model)).__name__} has no language-model head (get_output_embeddings() is None)")
    return head


def get_score_head(model: nn.Module) -> nn.Module:
    """The classification head of a ``*ForSequenceClassification`` / ``*ForTokenClassification`` model."""
    base = unwrap(model)
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(
        f"{type(base).__name__} has no 'score' or 'classifier' head; load it with load_reward_model / load_value_model"
    )


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) counting only real tokens: ``cumsum(mask) - 1``, clamped at 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final-layer hidden states (B, T, H) of the backbone (after its final norm)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        if position_ids is None:
            raise ValueError("a 4-D (packed) attention_mask needs position_ids that restart at every sample")
        if not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
            raise ValueError(
                "a 4-D attention_mask must be boolean (True = may attend) or additive float "
                f"(0 / -inf), got {attention_mask.dtype}"
            )
    elif attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T) or (B, 1, T, T), got shape {tuple(attention_mask.shape)}")
    elif attention_mask is not None and position_ids is None:
        position_ids = positions_from_mask(attention_mask)  # (B, T)
    out = get_backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state  # (B, T, H)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last position whose 2-D mask is 1 (works for right and left padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D (B, T) attention_mask, got shape {tuple(attention_mask.shape)}")
    present = attention_mask.bool()
    empty = ~present.any(-1)
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} have no tokens (attention_mask all 0)")
    T = attention_mask.shape[1]
    return T - 1 - present.flip(-1).int().argmax(-1)  # (B,)
