"""Load and save Hugging Face models and tokenizers: policy (causal LM), reward model, value model (critic).

A local directory and a hub id go through the same ``from_pretrained`` call, so the built-in tasks' tiny
models and ``Qwen/Qwen2.5-0.5B-Instruct`` load the same way. LoRA adapters come from peft. Weights are
written in safetensors only (transformers 5 has no pickle option) and atomically: a temporary directory is
filled, then renamed over the target, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer)

from alignflow.config import ModelConfig
from alignflow.models.backbone import get_score_head

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded; the message names the path and what to check."""


def _load_error(what: str, name_or_path: str, err: Exception) -> ModelLoadError:
    if Path(name_or_path).exists():
        return ModelLoadError(f"could not load {what} from the local path {name_or_path!r}: {err}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = ("HF_HUB_OFFLINE is set, so only the local hub cache was searched" if offline else
            "if you are offline, download it first or set HF_HUB_OFFLINE=1 to use the local cache only")
    return ModelLoadError(f"could not load {what} from {name_or_path!r}: it is not a local directory (cwd: "
                          f"{os.getcwd()}) and it could not be loaded as a Hugging Face hub id ({hint}). Cause: {err}")


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a pad token (eos when the tokenizer has none) and right padding."""
    if not name_or_path:
        raise ModelLoadError("no tokenizer given: set model.tokenizer or model.name_or_path")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise _load_error("a tokenizer", name_or_path, e) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer {name_or_path!r} has neither a pad token nor an eos token to pad with")
        tok.pad_token = tok.eos_token
        logger.info("tokenizer %s has no pad token; padding with the eos token %r (id %d)",
                    name_or_path, tok.eos_token, tok.eos_token_id)
    tok.padding_side = "right"  # every alignflow batch is right-padded; the rollout engine handles left itself
    return tok


def _from_pretrained(auto_cls, cfg: ModelConfig, what: str, config_overrides: Optional[dict] = None, **extra):
    """``auto_cls.from_pretrained`` with the config's dtype/attention/revision; returns (model, loading_info).

    ``config_overrides`` are set on the model config before the model is built (for attributes such as
    ``classifier_dropout`` that ``from_pretrained`` would otherwise pass to the model constructor).
    """
    if not cfg.name_or_path:
        raise ModelLoadError(f"no {what} given: set model.name_or_path (a local directory or a hub id)")
    if cfg.dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype: {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    hub = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        if config_overrides:
            config = AutoConfig.from_pretrained(cfg.name_or_path, **hub, **extra)
            for key, value in config_overrides.items():
                setattr(config, key, value)
            extra = {"config": config}
        return auto_cls.from_pretrained(cfg.name_or_path, dtype=DTYPES[cfg.dtype], output_loading_info=True,
                                        attn_implementation=cfg.attn_implementation, **hub, **extra)
    except OSError as e:
        raise _load_error(what, cfg.name_or_path, e) from e
    except ValueError as e:  # e.g. an architecture with no class for this task
        raise ModelLoadError(f"could not load {what} from {cfg.name_or_path!r}: {e}") from e


def _finish(model: nn.Module, cfg: ModelConfig, task_type: str, device) -> nn.Module:
    """Gradient checkpointing and LoRA (when configured), then move to ``device``."""
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed the switch
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules
        if targets == ["all-linear"] or targets == "all-linear":
            targets = "all-linear"  # peft: every linear layer except the output head
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=targets, task_type=task_type)
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise ModelLoadError(f"model.lora.target_modules={cfg.lora.target_modules}: {e}") from e
    return model.to(device)


def load_causal_lm(cfg: ModelConfig, device="cpu") -> nn.Module:
    """The policy / reference model: ``AutoModelForCausalLM`` (in eval mode, as transformers returns it)."""
    model, _ = _from_pretrained(AutoModelForCausalLM, cfg, "a causal language model")
    return _finish(model, cfg, "CAUSAL_LM", device)


@torch.no_grad()
def seed_head_rows(head: nn.Linear, seed: int) -> None:
    """Initialise row i of a new (K, H) head from its own generator ``seed + i``: N(0, 1/(H+1)), zero bias.

    Rows seeded independently make an ensemble of k heads on one backbone ("independently seeded heads",
    Coste et al. 2024), and row i equals the one-head init of the i-th model of an ensemble of k separate
    models seeded ``seed .. seed+k-1``. The variance 1/(d_model+1) is the reward-head init of Stiennon et
    al. 2020 (Learning to summarize from human feedback); it gives scores of order 1 at the start.
    """
    K, H = head.weight.shape
    rows = [torch.randn(H, generator=torch.Generator().manual_seed(seed + i)) / (H + 1) ** 0.5 for i in range(K)]
    head.weight.copy_(torch.stack(rows).to(head.weight.dtype))  # (K, H)
    if head.bias is not None:
        head.bias.zero_()


def _init_new_head(model: nn.Module, info: dict, seed: Optional[int], what: str) -> None:
    head = get_score_head(model)
    name = next(n for n, m in model.named_modules() if m is head)
    new = any(k.startswith(name + ".") for k in info.get("missing_keys", ()))
    if new and seed is not None:
        seed_head_rows(head, seed)
    elif new:
        logger.info("%s: new %s head initialised from the global RNG (pass seed= for a reproducible one)", what, name)


def _pad_id(pad_token_id: Optional[int], what: str) -> dict:
    if pad_token_id is None:
        return {}
    if pad_token_id < 0:
        raise ModelLoadError(f"{what}: pad_token_id must be a token id >= 0, got {pad_token_id}")
    return {"pad_token_id": int(pad_token_id)}


def load_reward_model(cfg: ModelConfig, num_labels: Optional[int] = None, device="cpu", seed: Optional[int] = None,
                      pad_token_id: Optional[int] = None) -> nn.Module:
    """A scalar (``num_labels=1``), multi-objective or ensemble (``num_labels=K``) reward model.

    ``num_labels=None`` loads a trained reward model with the number of outputs it was saved with.

    ``AutoModelForSequenceClassification`` from a causal-LM checkpoint (the ``score`` head is new and, with
    ``seed``, each of its K rows is seeded by ``seed + i``) or from a trained reward model (head kept).
    ``pad_token_id`` (the tokenizer's) is written into the model config; score with
    :func:`alignflow.models.heads.sequence_scores`, which pools at the last attention-mask position.
    """
    if num_labels is not None and num_labels < 1:
        raise ModelLoadError(f"num_labels must be >= 1, got {num_labels}")
    labels = {} if num_labels is None else {"num_labels": num_labels}
    model, info = _from_pretrained(AutoModelForSequenceClassification, cfg, "a reward model", **labels,
                                   **_pad_id(pad_token_id, "reward model"))
    if model.config.pad_token_id is None:
        raise ModelLoadError(f"reward model {cfg.name_or_path!r}: its config has no pad_token_id; pass "
                             "pad_token_id=tokenizer.pad_token_id")
    _init_new_head(model, info, seed, "reward model")
    return _finish(model, cfg, "SEQ_CLS", device)


def load_value_model(cfg: ModelConfig, device="cpu", pad_token_id: Optional[int] = None,
                     seed: Optional[int] = None) -> nn.Module:
    """The PPO critic: ``AutoModelForTokenClassification`` with one label, a value per token.

    Dropout before the head is switched off (``classifier_dropout=0``) so values do not depend on
    train/eval mode. Read values with :func:`alignflow.models.heads.token_values`.
    """
    model, info = _from_pretrained(AutoModelForTokenClassification, cfg, "a value model", num_labels=1,
                                   config_overrides={"classifier_dropout": 0.0},
                                   **_pad_id(pad_token_id, "value model"))
    _init_new_head(model, info, seed, "value model")
    return _finish(model, cfg, "TOKEN_CLS", device)


def save_model(model: nn.Module, tokenizer, out_dir, merge_lora: bool = False) -> nn.Module:
    """Write ``model`` (safetensors + config) and ``tokenizer`` to ``out_dir`` atomically; return what was saved.

    A peft model saves its adapters only (``adapter_model.safetensors``), unless ``merge_lora=True``: then the
    adapters are folded into the base weights IN PLACE (``merge_and_unload``) and the plain merged model is
    saved and returned -- use it, not the old peft wrapper, afterwards.
    An existing ``out_dir`` is replaced: moved aside, the new one renamed in, then the old one deleted.
    A sharded (FSDP2) model is collective: every rank calls this, the full weights are gathered and rank 0 writes
    one consolidated checkpoint (:func:`alignflow.distributed.checkpoint.export_hf`).
    """
    from alignflow.distributed.checkpoint import atomic_dir, export_hf
    from alignflow.distributed.shard import is_sharded

    if is_sharded(model):
        if merge_lora:  # merge_and_unload would rewrite sharded DTensor weights in place
            raise ValueError("save_model: merge_lora=True is not supported for a sharded model; save the adapters "
                             "(merge_lora=False) and merge them in one process")
        export_hf(model, tokenizer, out_dir)
        return model
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return model
