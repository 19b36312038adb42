"""Reward and value heads: sequence scores, per-token values, and the ArmoRM gating network.

* :func:`sequence_scores` -- a ``*ForSequenceClassification`` model's scores (B, K) pooled at the LAST real
  token of each row (the last position whose attention mask is 1). K = 1 is a scalar reward model,
  K > 1 either K attribute scores (multi-objective, ArmoRM stage 1) or an ensemble of K seeded heads.
  Pooling by the mask (not by ``input_ids != pad_token_id`` as transformers does) stays right when the pad
  token is the eos token and a response ends with eos.
* :func:`token_values` -- the PPO critic's value of every position (B, T).
* :class:`GatingNetwork` and :func:`combine` -- ArmoRM stage 2 (Wang et al. 2024, "Interpretable
  Preferences via Multi-Objective Reward Modeling and Mixture-of-Experts"): an MLP on the prompt
  embedding gives weights ``g(x) = beta * softmax(MLP(x) / tau)`` and the reward is ``R = g(x)^T r``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignflow.models.backbone import get_score_head, hidden_states, last_token_index
from alignflow.models.varlen import flat_last_hidden

GATE_WEIGHTS, GATE_CONFIG = "gating.safetensors", "gating.json"


def last_token_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state (B, H) at each row's last real token (right or left padding)."""
    h = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    idx = last_token_index(attention_mask)  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), idx]  # (B, H)


def sequence_scores(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, seq_lens: list[int] | None = None
) -> torch.Tensor:
    """Reward-model scores (B, num_labels) in float32, from the last real token of each row.

    ``seq_lens``: ``input_ids`` is instead ONE padding-free row (1, N) of B sequences laid end to end
    (``attention_mask`` None; see :mod:`alignflow.models.varlen`); each is scored at its own last token.
    """
    if seq_lens is not None:
        pooled = flat_last_hidden(model, input_ids, seq_lens)  # (B, H)
    else:
        pooled = last_token_hidden(model, input_ids, attention_mask)  # (B, H)
    return get_score_head(model)(pooled).float()  # (B, K)


def token_values(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Critic values (B, T) in float32: ``values[:, t]`` is V of the state made of tokens <= t.

    ``attention_mask`` may be (B, T) or a packed (B, 1, T, T) mask with restarting ``position_ids``.
    """
    h = hidden_states(model, input_ids, attention_mask, position_ids)  # (B, T, H)
    return get_score_head(model)(h).squeeze(-1).float()  # (B, T)


class GatingNetwork(nn.Module):
    """ArmoRM gate: prompt embedding (B, H) -> objective weights (B, K) in ``beta * simplex``.

    ``layers`` hidden layers of width ``hidden`` (ReLU, dropout), a linear map to K logits, then
    ``beta * softmax(logits / temperature)`` with a learned scale ``beta`` (init 1). Paper defaults:
    3 x 1024, dropout 0.2, temperature 10.
    """

    def __init__(
        self,
        hidden_size: int,
        num_objectives: int,
        hidden: int = 1024,
        layers: int = 3,
        dropout: float = 0.2,
        temperature: float = 10.0,
    ):
        super().__init__()
        if num_objectives < 1 or hidden_size < 1 or layers < 0 or temperature <= 0:
            raise ValueError(
                f"GatingNetwork: bad sizes hidden_size={hidden_size} num_objectives={num_objectives} "
                f"layers={layers} temperature={temperature}"
            )
        self.config = {
            "hidden_size": hidden_size,
            "num_objectives": num_objectives,
            "hidden": hidden,
            "layers": layers,
            "dropout": dropout,
            "temperature": temperature,
        }
        blocks: list[nn.Module] = []
        width = hidden_size
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, num_objectives))
        self.mlp = nn.Sequential(*blocks)
        self.beta = nn.Parameter(torch.ones(()))
        self.temperature = temperature

    def forward(self, prompt_embedding: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(prompt_embedding)  # (B, K)
        return self.beta * torch.softmax(logits / self.temperature, dim=-1)  # (B, K), rows sum to beta

    def save(self, model_dir) -> None:
        """Write ``gating.safetensors`` and ``gating.json`` into ``model_dir`` (each file replaced atomically)."""
        d = Path(model_dir)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = d / f"{GATE_WEIGHTS}.tmp-{os.getpid()}"
        save_file(tensors, str(tmp))
        os.replace(tmp, d / GATE_WEIGHTS)
        tmp = d / f"{GATE_CONFIG}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(self.config, indent=2))
        os.replace(tmp, d / GATE_CONFIG)

    @classmethod
    def load(cls, model_dir, device="cpu") -> GatingNetwork:
        """Rebuild a gate saved by :meth:`save` (in eval mode)."""
        d = Path(model_dir)
        for name in (GATE_CONFIG, GATE_WEIGHTS):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} does not exist: {d} holds no gating network")
        gate = cls(**json.loads((d / GATE_CONFIG).read_text()))
        try:
            gate.load_state_dict(load_file(str(d / GATE_WEIGHTS)))
        except RuntimeError as e:
            raise ValueError(f"{d / GATE_WEIGHTS} does not match {d / GATE_CONFIG}: {e}") from e
        return gate.to(device).eval()


def combine(scores: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Gated reward ``R = sum_k gate_k * score_k``: scores (B, K), gate (B, K) -> (B,)."""
    if scores.shape != gate.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and gate {tuple(gate.shape)} must have the same shape")
    return (scores * gate).sum(-1)  # (B,)


def gated_scores(
    model: nn.Module,
    gate: GatingNetwork,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ArmoRM scoring in ONE backbone pass: ``(R (B,), attribute scores (B, K), gate weights (B, K))``.

    The prompt embedding is the hidden state at the last prompt token (index ``prompt_lengths - 1``); with
    causal attention it equals the last-token state of the prompt alone, so no second forward is needed.
    Rows are right-padded; ``prompt_lengths`` (B,) counts each row's prompt tokens.
    """
    h = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    rows = torch.arange(h.shape[0], device=h.device)
    scores = get_score_head(model)(h[rows, last_token_index(attention_mask)]).float()  # (B, K)
    prompt_h = h[rows, prompt_lengths.to(h.device) - 1]  # (B, H)
    weights = gate(prompt_h.to(next(gate.parameters()).dtype))  # (B, K)
    return combine(scores, weights.float()), scores, weights
