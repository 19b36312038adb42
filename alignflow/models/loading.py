"""Load and save Hugging Face models and tokenizers: policy (causal LM), reward model, value model (critic).

A local directory and a hub id go through the same ``from_pretrained`` call, so the built-in tasks' tiny
models and ``Qwen/Qwen2.5-0.5B-Instruct`` load the same way. LoRA adapters come from peft. Weights are
written in safetensors only (transformers 5 has no pickle option) and atomically: a temporary directory is
filled, then renamed over the target, so a crash never leaves a half-written model behind.

A LoRA output (a directory with ``adapter_config.json``, as ``save_model`` writes for a peft model) loads as its
base model with the adapter merged in, so one stage's LoRA output is the next stage's model. A run directory
(one holding ``model/``) is refused with the path to use, and a directory without tokenizer files is named as such.
Transformers' table of newly initialised weights becomes one line naming the new head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from alignflow.config import ModelConfig
from alignflow.models.backbone import get_score_head

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class ModelLoadError(OSError):
    """A model or tokenizer could not be loaded; the message names the path and what to check."""


def load_error(what: str, name_or_path: str, err: Exception) -> ModelLoadError:
    if Path(name_or_path).exists():
        return ModelLoadError(f"could not load {what} from the local path {name_or_path!r}: {err}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = (
        "HF_HUB_OFFLINE is set, so only the local hub cache was searched"
        if offline
        else "if you are offline, download it first or set HF_HUB_OFFLINE=1 to use the local cache only"
    )
    return ModelLoadError(
        f"could not load {what} from {name_or_path!r}: it is not a local directory (cwd: "
        f"{os.getcwd()}) and it could not be loaded as a Hugging Face hub id ({hint}). Cause: {err}"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def _check_not_run_dir(name_or_path: str) -> None:
    """An alignflow run directory holds the model in ``model/``; say so instead of transformers' puzzling error."""
    path = Path(name_or_path)
    if not (path.is_dir() and (path / "model").is_dir()) or (path / "adapter_config.json").exists():
        return
    try:  # a run's config.json holds its sections (train, data, ...), a model's its model_type
        is_model = "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        is_model = False
    if not is_model:
        raise ModelLoadError(
            f"{name_or_path} is a run directory, not a model: its model is in {path / 'model'}; "
            f"use model.name_or_path={path / 'model'}"
        )


def adapter_base(name_or_path: str) -> str | None:
    """The base model of a LoRA adapter directory (``adapter_config.json``), None for anything else."""
    config = Path(name_or_path) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown")
    return base


def load_tokenizer(name_or_path: str, revision: str = "main", trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with a pad token (eos when the tokenizer has none) and right padding.

    A LoRA adapter directory without tokenizer files uses its base model's tokenizer."""
    if not name_or_path:
        raise ModelLoadError("no tokenizer given: set model.tokenizer or model.name_or_path")
    _check_not_run_dir(name_or_path)
    local = Path(name_or_path)
    if local.is_dir() and not any((local / f).exists() for f in TOKENIZER_FILES):
        base = adapter_base(name_or_path)
        if base is not None:
            return load_tokenizer(base, revision, trust_remote_code)
        raise ModelLoadError(
            f"no tokenizer in {name_or_path}: it has none of {', '.join(TOKENIZER_FILES)}; set "
            "model.tokenizer to a directory or hub id that has one"
        )
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise load_error("a tokenizer", name_or_path, e) from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer {name_or_path!r} has neither a pad token nor an eos token to pad with")
        tok.pad_token = tok.eos_token
        logger.info(
            "tokenizer %s has no pad token; padding with the eos token %r (id %d)",
            name_or_path,
            tok.eos_token,
            tok.eos_token_id,
        )
    tok.padding_side = "right"  # every alignflow batch is right-padded; the rollout engine handles left itself
    return tok


_TASK_TYPES = {
    AutoModelForCausalLM: "CAUSAL_LM",
    AutoModelForSequenceClassification: "SEQ_CLS",
    AutoModelForTokenClassification: "TOKEN_CLS",
}


class _HeldReport(logging.Filter):
    """Holds back transformers' load-report table (a warning of ``transformers.modeling_utils``) while a model
    loads, so that the caller can replace the expected case (a new head) by one line and replay anything else."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _held_load_report():
    target = logging.getLogger("transformers.modeling_utils")
    held = _HeldReport()
    target.addFilter(held)
    try:
        yield held
    finally:
        target.removeFilter(held)


def _report_loading(model: nn.Module, info: dict, held: _HeldReport, head: bool) -> None:
    """Replay the held report unless the only difference from the checkpoint is a new score head (``head``)."""
    missing = list(info.get("missing_keys", ()))
    expected = False
    if head and missing and not info.get("unexpected_keys") and not info.get("mismatched_keys"):
        name = next(n for n, m in model.named_modules() if m is get_score_head(model))
        expected = all(k.startswith(name + ".") for k in missing)
    if not expected:
        for record in held.records:
            logging.getLogger("transformers.modeling_utils").handle(record)


def _adapter_head_rows(adapter_dir: str) -> int | None:
    """Outputs of the score head saved with a SEQ_CLS/TOKEN_CLS adapter (None when it saved none)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith((".score.weight", ".classifier.weight")):
                return f.get_slice(key).get_shape()[0]
    return None


def _load_adapter(auto_cls, cfg: ModelConfig, what: str, base: str, **kwargs):
    """Base model + the LoRA adapter in ``cfg.name_or_path``, merged: (model, loading_info).

    An adapter saved for the same kind of model (peft task SEQ_CLS/TOKEN_CLS) carries its trained head, which
    is then not new."""
    from peft import PeftConfig, PeftModel

    logger.info(
        "%s: %s is a LoRA adapter on %s; loading the base model and merging the adapter into it",
        what,
        cfg.name_or_path,
        base,
    )
    try:
        config = PeftConfig.from_pretrained(cfg.name_or_path)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{cfg.name_or_path}/adapter_config.json: not a peft adapter config: {e}") from e
    same_kind = config.task_type == _TASK_TYPES.get(auto_cls)
    if same_kind and config.task_type != "CAUSAL_LM" and kwargs.get("num_labels") is None:
        kwargs["num_labels"] = _adapter_head_rows(cfg.name_or_path)  # the trained head's outputs
    model, info = _from_pretrained(auto_cls, dataclasses.replace(cfg, name_or_path=base), what, **kwargs)
    try:
        if not same_kind:  # e.g. a policy's adapter under a reward model: plain LoRA layers, no task wrapper
            config.task_type = None
        model = PeftModel.from_pretrained(model, cfg.name_or_path, config=config).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError) as e:
        raise ModelLoadError(f"could not apply the LoRA adapter {cfg.name_or_path!r} to {base!r}: {e}") from e
    for p in model.parameters():  # peft froze the base; the merged model is an ordinary model again
        p.requires_grad_(True)
    if same_kind and config.task_type in ("SEQ_CLS", "TOKEN_CLS"):
        info = {**info, "missing_keys": []}
    return model, info


def _from_pretrained(
    auto_cls, cfg: ModelConfig, what: str, config_overrides: dict | None = None, head: bool = False, **extra
):
    """``auto_cls.from_pretrained`` with the config's dtype/attention/revision; returns (model, loading_info).

    ``config_overrides`` are set on the model config before the model is built (for attributes such as
    ``classifier_dropout`` that ``from_pretrained`` would otherwise pass to the model constructor). ``head``: the
    class adds a score head, whose being new is reported by the caller in one line instead of transformers' table.
    """
    if not cfg.name_or_path:
        raise ModelLoadError(f"no {what} given: set model.name_or_path (a local directory or a hub id)")
    if cfg.dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype: {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    _check_not_run_dir(cfg.name_or_path)
    base = adapter_base(cfg.name_or_path)
    if base is not None:
        return _load_adapter(auto_cls, cfg, what, base, config_overrides=config_overrides, head=head, **extra)
    hub = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        if config_overrides:
            config = AutoConfig.from_pretrained(cfg.name_or_path, **hub, **extra)
            for key, value in config_overrides.items():
                setattr(config, key, value)
            extra = {"config": config}
        with _held_load_report() as held:
            model, info = auto_cls.from_pretrained(
                cfg.name_or_path,
                dtype=DTYPES[cfg.dtype],
                output_loading_info=True,
                attn_implementation=cfg.attn_implementation,
                **hub,
                **extra,
            )
    except OSError as e:
        raise load_error(what, cfg.name_or_path, e) from e
    except ValueError as e:  # e.g. an architecture with no class for this task
        raise ModelLoadError(f"could not load {what} from {cfg.name_or_path!r}: {e}") from e
    _report_loading(model, info, held, head)
    return model, info


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
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            task_type=task_type,
        )
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


def _init_new_head(model: nn.Module, info: dict, seed: int | None, what: str) -> None:
    """Seed a head the checkpoint did not have, and say so in one line."""
    head = get_score_head(model)
    name = next(n for n, m in model.named_modules() if m is head)
    new = any(k.startswith(name + ".") for k in info.get("missing_keys", ()))
    if not new:
        return
    shape = " x ".join(map(str, head.weight.shape))
    if seed is not None:
        seed_head_rows(head, seed)
        how = f"seeded from seed {seed}" if head.weight.shape[0] == 1 else f"row i seeded from seed {seed} + i"
    else:
        how = "initialised from the global RNG (pass seed= for a reproducible one)"
    logger.info(
        "%s: new %s head (%s) on %s, %s; every other weight comes from the checkpoint",
        what,
        name,
        shape,
        model.config._name_or_path or "the base model",
        how,
    )


def _pad_id(pad_token_id: int | None, what: str) -> dict:
    if pad_token_id is None:
        return {}
    if pad_token_id < 0:
        raise ModelLoadError(f"{what}: pad_token_id must be a token id >= 0, got {pad_token_id}")
    return {"pad_token_id": int(pad_token_id)}


def load_reward_model(
    cfg: ModelConfig,
    num_labels: int | None = None,
    device="cpu",
    seed: int | None = None,
    pad_token_id: int | None = None,
) -> nn.Module:
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
    model, info = _from_pretrained(
        AutoModelForSequenceClassification,
        cfg,
        "a reward model",
        head=True,
        **labels,
        **_pad_id(pad_token_id, "reward model"),
    )
    if model.config.pad_token_id is None:
        raise ModelLoadError(
            f"reward model {cfg.name_or_path!r}: its config has no pad_token_id; pass "
            "pad_token_id=tokenizer.pad_token_id"
        )
    _init_new_head(model, info, seed, "reward model")
    return _finish(model, cfg, "SEQ_CLS", device)


def load_value_model(
    cfg: ModelConfig, device="cpu", pad_token_id: int | None = None, seed: int | None = None
) -> nn.Module:
    """The PPO critic: ``AutoModelForTokenClassification`` with one label, a value per token.

    Dropout before the head is switched off (``classifier_dropout=0``) so values do not depend on
    train/eval mode. Read values with :func:`alignflow.models.heads.token_values`.
    """
    model, info = _from_pretrained(
        AutoModelForTokenClassification,
        cfg,
        "a value model",
        num_labels=1,
        head=True,
        config_overrides={"classifier_dropout": 0.0},
        **_pad_id(pad_token_id, "value model"),
    )
    _init_new_head(model, info, seed, "value model")
    return _finish(model, cfg, "TOKEN_CLS", device)
