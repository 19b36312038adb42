"""Reward-model and cost-model scorers for online RL: a trained reward model (or an ensemble) as a reward.

:class:`RewardModelScorer` scores the sequences of a rollout batch with one or more ``*ForSequenceClassification``
models and returns one reward per row:

* **one model with k outputs** (``reward.ensemble_mode=heads``: k independently seeded heads on one backbone)
  -> k members, one per output;
* **k models** (``reward.ensemble_mode=models``, the ``member-i/model`` directories) -> k members; a member with
  several outputs (a multi-objective head) contributes the mean of its outputs, as in the reward trainer;
* **a gated multi-objective model** (ArmoRM: a directory trained with ``reward.gating=true`` holds
  ``gating.json``) -> ONE member, ``R = g(x)^T r(x, y)``: the gate reads the prompt's last-token hidden state
  and weights the K attribute scores, exactly as the trainer evaluates it (the attributes are objectives, not
  ensemble members, so they are never averaged or aggregated as such).

Members combine with :func:`alignflow.algorithms.reward.aggregate` (Coste et al. 2024; docs/reward_models.md)::

    mean:  R = (1/k) sum_i R_i
    min:   R = min_i R_i                                  (worst-case optimisation, WCO)
    uwo:   R = mean - lambda * (1/k) sum_i (R_i - mean)^2  (uncertainty-weighted, population variance)
    brme:  R = lambda_b * mean + (1 - lambda_b) * min_i R_i  (BRME's nominal plus worst-case objective)

Each row is re-packed before scoring as its real prompt tokens followed by its real response tokens, so no
padding reaches the reward model wherever it sat (left of the prompt, right of the response, or between the
two when prompts are right-padded), and the score of a row does not depend on how its batch was padded. A member
that shares the policy's tokenizer scores the token ids as they are (an id outside its vocabulary is an error).
A member with its OWN tokenizer (another vocabulary or chat template; ``tokenizer=`` gives the policy's, each
reward-model directory holds its own) scores the decoded texts re-rendered with its tokenizer and chat template
(:mod:`alignflow.rewards.foreign`), so an ensemble may mix tokenizers. A batch with texts and no token ids
(``alignflow serve``) is scored by every member from the texts.

:class:`CostModelScorer` is the same scorer for a *cost* model (Safe RLHF, Dai et al. 2023; docs/safe_rlhf.md).
Sign convention, as in Safe RLHF: **cost > 0 means unsafe**, cost <= 0 safe; the constraint is
``E[C] <= threshold`` and the reward of the Lagrangian objective is ``R - lambda_lag * C``. Its ensemble
aggregation is pessimistic for a cost: ``min`` becomes the largest member cost and ``uwo`` ADDS the variance
(``-aggregate(-C)``), so an uncertain response looks less safe, never safer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from alignflow.algorithms.reward import ENSEMBLE_AGGREGATIONS, aggregate
from alignflow.batch import Batch
from alignflow.config import ModelConfig
from alignflow.data.collate import pad_right
from alignflow.models import GatingNetwork, combine, last_token_hidden, load_reward_model, unwrap
from alignflow.models.heads import GATE_CONFIG
from alignflow.models.loading import load_error
from alignflow.models.sequences import score as score_sequences
from alignflow.rewards.base import output_device
from alignflow.rewards.foreign import TextRenderer, load_rm_tokenizer, max_positions, same_tokenizer, texts_of

PACK_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


def packed_sequences(batch: Batch) -> list[list[int]]:
    """Each row's real tokens: prompt tokens (``prompt_mask`` 1) then response tokens (``response_mask`` 1).

    Falls back to the tokens of ``input_ids`` where ``attention_mask`` is 1 when the batch has no prompt /
    response halves. An empty row is an error naming the row.
    """
    if all(k in batch.tensors for k in PACK_FIELDS):
        p_ids, p_mask, r_ids, r_mask = (batch.tensors[k].cpu() for k in PACK_FIELDS)  # (B, Tp), (B, Tr)
        seqs = [p_ids[i][p_mask[i].bool()].tolist() + r_ids[i][r_mask[i].bool()].tolist() for i in range(len(batch))]
    elif "input_ids" in batch.tensors and "attention_mask" in batch.tensors:
        ids, mask = batch.tensors["input_ids"].cpu(), batch.tensors["attention_mask"].cpu()  # (B, T)
        seqs = [ids[i][mask[i].bool()].tolist() for i in range(len(batch))]
    else:
        raise KeyError(
            f"reward-model scoring needs the tensors {', '.join(PACK_FIELDS)} (or input_ids and "
            f"attention_mask); the batch has {sorted(batch.keys())}"
        )
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"row {i} of the batch has no tokens to score (all masks are 0)")
    return seqs


def _num_labels(path: str, model_cfg: ModelConfig) -> int:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(
            path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise load_error("the reward model config", path, e) from e  # names a missing local directory as such
    return int(cfg.num_labels)


def load_members(
    paths: Sequence[str | nn.Module],
    device,
    model_cfg: ModelConfig | None = None,
    pad_token_id: int | None = None,
    pad_ids: Sequence[int | None] | None = None,
) -> list[nn.Module]:
    """Load every path as a trained reward model (head kept, ``num_labels`` read from its config); modules pass.
    ``pad_ids[i]`` (a member's own tokenizer's pad id) overrides ``pad_token_id`` for member i."""
    base = model_cfg or ModelConfig()
    models = []
    for i, p in enumerate(paths):
        if isinstance(p, nn.Module):
            models.append(p.to(device))
            continue
        cfg = dataclasses.replace(base, name_or_path=str(p))
        pad = pad_ids[i] if pad_ids is not None and pad_ids[i] is not None else pad_token_id
        models.append(load_reward_model(cfg, num_labels=_num_labels(str(p), cfg), device=device, pad_token_id=pad))
    return models


def load_gates(paths: Sequence[str | nn.Module], device) -> list[GatingNetwork | None]:
    """The ArmoRM gate saved next to each reward model (``gating.json``), or None for a member without one."""
    return [
        GatingNetwork.load(p, device) if isinstance(p, str) and (Path(p) / GATE_CONFIG).is_file() else None
        for p in paths
    ]


@torch.no_grad()
def prompt_embeddings(model: nn.Module, batch: Batch, pad_id: int, device) -> torch.Tensor:
    """Last-token hidden state of each row's real prompt tokens (the gate's input, as in training): (B, H)."""
    if "prompt_ids" not in batch.tensors or "prompt_mask" not in batch.tensors:
        raise KeyError(
            f"a gated (ArmoRM) reward model needs the prompt_ids and prompt_mask tensors to find the "
            f"prompt; the batch has {sorted(batch.keys())}"
        )
    ids, mask = batch.tensors["prompt_ids"].cpu(), batch.tensors["prompt_mask"].cpu()  # (B, Tp)
    prompts = [ids[i][mask[i].bool()].tolist() for i in range(len(batch))]
    was = model.training
    model.eval()
    h = last_token_hidden(
        model, pad_right(prompts, pad_id).to(device), pad_right([[1] * len(p) for p in prompts], 0).to(device)
    )  # (B, H)
    model.train(was)
    return h.float()


def member_tokenizers(paths: Sequence[str | nn.Module], given: Sequence | None, model_cfg) -> list:
    """Each member's own tokenizer: ``given[i]`` when set, else the one saved in its directory (None if none)."""
    cfg = model_cfg or ModelConfig()
    out = []
    for i, p in enumerate(paths):
        tok = given[i] if given is not None else None
        if tok is None and not isinstance(p, nn.Module):
            tok = load_rm_tokenizer(str(p), cfg.revision, cfg.trust_remote_code)
        out.append(tok)
    return out


class RewardModelScorer:
    """Score rollout rows with a reward model or an ensemble; ``__call__(batch) -> (B,)``.

    paths: reward-model directories / hub ids (k members) or one multi-output model (k heads); already
    loaded ``nn.Module`` s are accepted too. aggregation: ``mean`` | ``min`` | ``uwo``; uwo_lambda: the
    variance weight of ``uwo``. device: where the models run. budget: padded tokens per forward (a
    performance knob; results do not depend on it). model_cfg: dtype / attention / revision for loading.
    pad_token_id: written into a loaded model's config when it has none. name: the metric prefix.
    brme_lambda: the nominal weight of ``brme`` (1 = mean, 0 = worst case). A directory holding an ArmoRM gate
    is scored gated (one member); it must share the policy's tokenizer (the gate reads the prompt's tokens).
    tokenizer: the policy's tokenizer (or its path); a member whose own tokenizer differs from it re-renders the
    texts. tokenizers: one tokenizer (or None) per member, overriding those found in the member directories.

    :meth:`member_scores` gives the raw (B, k) member scores (the last call's are also kept in
    ``last_member_scores``), :meth:`score` the aggregate and metrics
    ``rollout/<name>_mean`` and, for k > 1, ``rollout/<name>_member_std`` (mean over rows of the population std
    across members, the ensemble's disagreement).
    """

    name = "reward_model"

    def __init__(
        self,
        paths: str | nn.Module | Sequence[str | nn.Module],
        aggregation: str = "mean",
        uwo_lambda: float = 0.5,
        device="cpu",
        *,
        budget: int = 8192,
        model_cfg: ModelConfig | None = None,
        pad_token_id: int | None = None,
        name: str | None = None,
        tokenizer=None,
        tokenizers: Sequence | None = None,
        brme_lambda: float = 0.5,
    ):
        if aggregation not in ENSEMBLE_AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is not one of {', '.join(ENSEMBLE_AGGREGATIONS)}")
        if uwo_lambda < 0:
            raise ValueError(f"uwo_lambda must be >= 0, got {uwo_lambda}")
        if not 0.0 <= brme_lambda <= 1.0:
            raise ValueError(f"brme_lambda must lie in [0, 1], got {brme_lambda}")
        if isinstance(paths, (str, nn.Module)):
            paths = [paths]
        if not paths:
            raise ValueError(f"{type(self).__name__} needs at least one reward model path")
        if tokenizers is not None and len(tokenizers) != len(paths):
            raise ValueError(f"tokenizers: {len(tokenizers)} given for {len(paths)} reward models")
        self.device = torch.device(device)
        self.name = name or self.name
        toks = member_tokenizers(list(paths), tokenizers, model_cfg)
        if isinstance(tokenizer, str) and any(t is not None for t in toks):  # the policy's, by path
            tokenizer = load_rm_tokenizer(tokenizer, (model_cfg or ModelConfig()).revision)
        # A member is foreign when it has a tokenizer and it differs from the policy's (tokenizer=None: unknown,
        # token ids are scored as they are, as before).
        self.foreign = [t is not None and tokenizer is not None and not same_tokenizer(t, tokenizer) for t in toks]
        pads = [t.pad_token_id if f else None for t, f in zip(toks, self.foreign, strict=False)]
        self.models = load_members(list(paths), self.device, model_cfg, pad_token_id, pads)
        self.renderers = [
            None if t is None else TextRenderer(t, max_positions(unwrap(m)), f"{self.name} member {i}")
            for i, (t, m) in enumerate(zip(toks, self.models, strict=False))
        ]
        self.aggregation, self.uwo_lambda, self.budget = aggregation, float(uwo_lambda), int(budget)
        self.brme_lambda = float(brme_lambda)
        self.pad_ids = [unwrap(m).config.pad_token_id or 0 for m in self.models]
        self.gates = load_gates(list(paths), self.device)
        for j, (g, f) in enumerate(zip(self.gates, self.foreign, strict=True)):
            if g is not None and f:
                raise ValueError(
                    f"{self.name}: {paths[j]} is a gated (ArmoRM) reward model with its own tokenizer; "
                    "the gate reads the prompt's token ids, so it must share the policy's tokenizer"
                )
        first = unwrap(self.models[0]).config
        # One model: every output is a member (a gated model: one member). Several models: one member each.
        self.per_model = int(first.num_labels) if len(self.models) == 1 and self.gates[0] is None else 1
        self.vocabs = [m.get_input_embeddings().num_embeddings for m in self.models]
        self.last_member_scores: torch.Tensor | None = None

    @property
    def num_members(self) -> int:
        return self.per_model * len(self.models)

    def _token_seqs(self, seqs: list[list[int]], j: int) -> list[list[int]]:
        """The policy's token ids for member j, checked against its vocabulary."""
        vocab = self.vocabs[j]
        bad = next((i for i, s in enumerate(seqs) if max(s) >= vocab or min(s) < 0), None)
        if bad is not None:
            raise ValueError(
                f"{self.name}: row {bad} has token ids outside the reward model's vocabulary "
                f"[0, {vocab}) (member {j}); save the reward model with its own tokenizer (alignflow "
                "rm does) and pass the policy's tokenizer so that it re-renders the texts"
            )
        return seqs

    def _member_seqs(self, batch: Batch, j: int, cache: dict) -> list[list[int]]:
        """Member j's input: the policy's token ids, or the texts re-rendered with its own tokenizer."""
        has_tokens = any(k in batch.tensors for k in ("input_ids", "prompt_ids"))
        if not self.foreign[j] and (has_tokens or self.renderers[j] is None):
            if "ids" not in cache:
                cache["ids"] = packed_sequences(batch)
            return self._token_seqs(cache["ids"], j)
        if "texts" not in cache:
            cache["texts"] = texts_of(batch, self.name)
        return self.renderers[j].encode(*cache["texts"])

    def member_scores(self, batch: Batch) -> torch.Tensor:
        """Raw member scores (B, k), float32, on the batch's device."""
        cols, cache = [], {}
        for j, m in enumerate(self.models):
            seqs = self._member_seqs(batch, j, cache)
            s = score_sequences(m, seqs, self.pad_ids[j], self.device, self.budget)  # (B, per_model * K)
            if self.gates[j] is not None:  # ArmoRM: R = g(x)^T r(x, y), one member
                w = self.gates[j](prompt_embeddings(m, batch, self.pad_ids[j], self.device)).float().cpu()  # (B, K)
                cols.append(combine(s, w)[:, None])  # (B, 1)
                continue
            cols.append(s.view(s.shape[0], self.per_model, -1).mean(-1))  # (B, per_model)
        return torch.cat(cols, -1).to(output_device(batch))  # (B, k)

    def aggregate(self, members: torch.Tensor) -> torch.Tensor:
        """(B, k) -> (B,) with the configured aggregation."""
        return aggregate(members, self.aggregation, self.lam)

    @property
    def lam(self) -> float:
        """The configured aggregation's parameter: ``brme_lambda`` for brme, else ``uwo_lambda``."""
        return self.brme_lambda if self.aggregation == "brme" else self.uwo_lambda

    def score(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(aggregated (B,), metrics)."""
        members = self.member_scores(batch)  # (B, k)
        self.last_member_scores = members  # for callers that log or filter on the members after scoring
        out = self.aggregate(members)  # (B,)
        metrics = {f"rollout/{self.name}_mean": out.mean().item()}
        if members.shape[1] > 1:
            metrics[f"rollout/{self.name}_member_std"] = members.std(-1, unbiased=False).mean().item()
        return out, metrics

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.score(batch)[0]


class CostModelScorer(RewardModelScorer):
    """A cost model (Safe RLHF): same scoring, cost > 0 = unsafe; pessimistic ensemble aggregation.

    ``min`` returns the LARGEST member cost and ``uwo`` returns mean + lambda * variance: both are
    ``-aggregate(-C)``, the reward-side rule applied to the negated cost. ``mean`` is unchanged.
    """

    name = "cost_model"

    def aggregate(self, members: torch.Tensor) -> torch.Tensor:
        return -aggregate(-members, self.aggregation, self.lam)
