"""``alignflow merge_models``: interpolate the weights of several same-architecture causal LMs and save the result.

The merged model (``sum_i w_i * theta_i``, :func:`alignflow.models.merging.interpolate_state_dicts`) is an ordinary
model directory: an RL run starts its actor from it (``model.name_or_path=DIR``, Balanced Actor Initialization) or
uses it as the KL reference (``ref_model=DIR``, SALSA). docs/merging.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alignflow.config import ConfigError, MergeModelsConfig, ModelConfig
from alignflow.distributed.save import save_model
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.models.merging import check_merge_weights, interpolate_state_dicts

log = logging.getLogger("alignflow.merge_models")


def _check_config(cfg: MergeModelsConfig) -> list[float]:
    """The weights, after the user-facing checks of models / weights / output (ConfigError naming the key)."""
    if len(cfg.models) < 2:
        raise ConfigError(f"merge_models: models= needs at least two model directories, got {list(cfg.models)}")
    if not cfg.output:
        raise ConfigError("merge_models: output=DIR is required (where the merged model is written)")
    if any(Path(cfg.output).resolve() == Path(m).resolve() for m in cfg.models):
        raise ConfigError(f"merge_models: output={cfg.output} is one of the input models; choose another directory")
    try:
        return check_merge_weights(cfg.weights, len(cfg.models))
    except ValueError as e:
        raise ConfigError(f"merge_models: weights={list(cfg.weights)}: {e}") from None


def _check_tokenizers(cfg: MergeModelsConfig, tokenizer) -> None:
    """Every model must share the first one's vocabulary (merged embeddings index the same tokens)."""
    vocab = tokenizer.get_vocab()
    for m in cfg.models[1:]:
        if load_tokenizer(m).get_vocab() != vocab:
            raise ConfigError(
                f"merge_models: {m} has another tokenizer than {cfg.models[0]}; only models that share "
                "a vocabulary can be merged"
            )


def merge_models(cfg: MergeModelsConfig) -> Path:
    """Load ``cfg.models``, interpolate their weights with ``cfg.weights`` and save to ``cfg.output``.

    Writes the merged model, the first model's tokenizer and ``merge.json`` (the models and weights used).
    A model whose architecture differs (a tensor missing or of another shape) is an error naming it.
    """
    weights = _check_config(cfg)
    tokenizer = load_tokenizer(cfg.models[0])
    _check_tokenizers(cfg, tokenizer)
    models = [load_causal_lm(ModelConfig(name_or_path=m, dtype=cfg.dtype)) for m in cfg.models]
    try:
        merged = interpolate_state_dicts([m.state_dict() for m in models], weights, list(cfg.models))
    except ValueError as e:
        raise ConfigError(f"merge_models: {e}") from None
    target = models[0]
    target.load_state_dict(merged)
    save_model(target, tokenizer, cfg.output)
    (Path(cfg.output) / "merge.json").write_text(json.dumps({"models": list(cfg.models), "weights": weights}, indent=2))
    log.info("merged %s with weights %s into %s", ", ".join(cfg.models), weights, cfg.output)
    return Path(cfg.output)
