"""A trained pairwise preference model as a probability P(y ≻ y' | x) (docs/pairwise_rm.md).

The model (``alignflow pm``) is a one-output sequence classifier read at TWO positions of ``x ⊕ a ⊕ b``: the
last token of ``a`` and the last token of ``b``. Its head gives ``u_a`` (``a`` scored after the prompt alone,
the model being causal) and ``u_b`` (``b`` scored after the prompt AND ``a``), and::

    z(x, a, b) = u_a - u_b            P(a ≻ b | x) = σ(z(x, a, b))

Without any interaction between the responses this is a Bradley-Terry model (``u`` a reward, ``z`` exactly
antisymmetric); the second response seeing the first lets it express preferences no scalar reward can (the
order effect is what ``pm/symmetry_gap`` measures). Tokens: the prompt, then each response ending with EOS,
exactly as the data pipeline tokenises a (prompt, completion) pair (:func:`alignflow.data.render.encode_pair`;
for a message-list prompt the completion is the assistant message's tokens under the chat template). The
directory holds ``pairwise_pm.json`` (``{"symmetric": bool}``) next to the weights and tokenizer.

:meth:`PreferenceModel.win_prob` always reads both orders, so the probability it returns is symmetric:

* enforced model: ``P = σ(½ (z(x, y, y') - z(x, y', y)))``;
* measured model: ``P = ½ (σ(z(x, y, y')) + 1 - σ(z(x, y', y)))`` (the mean of the two orders' answers).

In both, ``P(y ≻ y') + P(y' ≻ y) = 1`` and ``P(y ≻ y) = ½``. Sequences longer than the model's positions keep
at most a third of them per response (their first tokens) and the prompt's last tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from alignflow.config import ModelConfig
from alignflow.data.collate import pad_right, token_budget_groups
from alignflow.data.render import encode_pair
from alignflow.models import ModelLoadError, load_reward_model, load_tokenizer
from alignflow.models.backbone import get_score_head, hidden_states, last_token_index
from alignflow.rewards.base import output_device
from alignflow.rewards.rules import RewardError

META_FILE = "pairwise_pm.json"


def pair_sequence(prompt: list[int], a: list[int], b: list[int], max_len: int) -> tuple[list[int], int]:
    """(``prompt ⊕ a ⊕ b`` within ``max_len`` tokens, index of ``a``'s last token). Responses are cut to
    max_len // 3 tokens each, then the prompt on the left."""
    cap = max(1, max_len // 3)
    a, b = a[:cap], b[:cap]
    keep = max_len - len(a) - len(b)
    x = prompt[max(0, len(prompt) - keep) :]
    return x + a + b, len(x) + len(a) - 1


def pair_logits(model, items: list[tuple[list[int], int]], pad_id: int, device) -> torch.Tensor:
    """z = u_a - u_b (N,) float32 for (sequence, index of a's last token) items, in one right-padded forward."""

    ids = pad_right([s for s, _ in items], pad_id).to(device)  # (N, T)
    mask = pad_right([[1] * len(s) for s, _ in items], 0).to(device)  # (N, T)
    h = hidden_states(model, ids, mask)  # (N, T, H)
    rows = torch.arange(len(items), device=h.device)
    at_a = torch.tensor([c for _, c in items], device=h.device)  # (N,)
    head = get_score_head(model)
    u_a, u_b = head(h[rows, at_a]).float()[:, 0], head(h[rows, last_token_index(mask)]).float()[:, 0]
    return u_a - u_b


@torch.no_grad()
def score_pairs(model, items: list[tuple[list[int], int]], pad_id: int, device, budget: int = 8192) -> torch.Tensor:
    """:func:`pair_logits` of many items under a padded-token budget, in input order; (N,) on the CPU."""

    was = model.training
    model.eval()
    out = torch.zeros(len(items))
    for g in token_budget_groups([len(s) for s, _ in items], budget):
        out[g] = pair_logits(model, [items[i] for i in g], pad_id, device).cpu()
    model.train(was)
    return out


def write_meta(out_dir: Path, symmetric: bool) -> None:
    (Path(out_dir) / META_FILE).write_text(json.dumps({"symmetric": bool(symmetric)}) + "\n")


class PreferenceModel:
    """P(y ≻ y' | x) from a trained pairwise preference model; ``win_prob(prompts, ys, others) -> (B,)``.

    path: a directory written by ``alignflow pm`` (or pass ``model``, ``tokenizer`` and ``symmetric``).
    device: where it runs; budget: padded tokens per forward (speed only).
    """

    def __init__(
        self,
        path: str | None = None,
        device="cpu",
        *,
        model=None,
        tokenizer=None,
        symmetric: bool | None = None,
        budget: int = 8192,
    ):

        if path is not None:
            meta_path = Path(path) / META_FILE
            if not meta_path.is_file():
                raise ModelLoadError(f"preference model {path!r}: no {META_FILE}; train one with `alignflow pm`")
            symmetric = bool(json.loads(meta_path.read_text()).get("symmetric", False))
            tokenizer = load_tokenizer(str(path))
            model = load_reward_model(
                ModelConfig(name_or_path=str(path)), num_labels=1, device=device, pad_token_id=tokenizer.pad_token_id
            )
        if model is None or tokenizer is None or symmetric is None:
            raise ValueError("PreferenceModel needs a path, or model=, tokenizer= and symmetric=")
        self.model, self.tokenizer, self.symmetric = model.eval(), tokenizer, symmetric
        self.device, self.budget = torch.device(device), int(budget)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 4096))

    def encode(self, prompt: Any, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) as the data pipeline tokenises a (prompt, completion) pair."""

        completion = response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]
        enc = encode_pair(self.tokenizer, prompt, completion, 10**9, 10**9)
        return enc.input_ids[: enc.prompt_len], enc.input_ids[enc.prompt_len :]

    def logits(self, items: list[tuple[list[int], int]]) -> torch.Tensor:
        """z for each (``x ⊕ a ⊕ b``, index of a's last token) item: (N,) float32 on the CPU."""
        return score_pairs(self.model, items, self.tokenizer.pad_token_id, self.device, self.budget)

    def win_prob_ids(self, prompts: list[list[int]], ys: list[list[int]], others: list[list[int]]) -> torch.Tensor:
        """Symmetric P(y ≻ y') (module docstring) from token ids; (B,) float32 on the CPU."""
        ab = [pair_sequence(x, a, b, self.max_len) for x, a, b in zip(prompts, ys, others, strict=True)]
        ba = [pair_sequence(x, b, a, self.max_len) for x, a, b in zip(prompts, ys, others, strict=True)]
        z = self.logits(ab + ba)  # (2B,)
        z_ab, z_ba = z[: len(ab)], z[len(ab) :]
        if self.symmetric:
            return torch.sigmoid(0.5 * (z_ab - z_ba))
        return 0.5 * (torch.sigmoid(z_ab) + 1.0 - torch.sigmoid(z_ba))

    def ordered_win_prob(self, prompts: list, ys: list[str], others: list[str]) -> torch.Tensor:
        """ONE order's reading ``σ(z(x, y, y'))`` (y shown first), not symmetrised; (B,) float64 on the CPU.
        With both orders of a pair, :meth:`symmetrise` gives :meth:`win_prob`'s value and
        ``σ(z(x, y, y')) + σ(z(x, y', y)) - 1`` is the model's symmetry error on the pair."""
        xs, a, b = self.encode_pairs(prompts, ys, others)
        items = [pair_sequence(x, ya, yb, self.max_len) for x, ya, yb in zip(xs, a, b, strict=True)]
        return torch.sigmoid(self.logits(items).double())

    def symmetrise(self, p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
        """The symmetric P(a ≻ b) from the two orders' readings ``σ(z_ab)``, ``σ(z_ba)`` (module docstring):
        enforced ``σ(½ (z_ab - z_ba))`` (z recovered as the logit, in float64), measured ``½ (p_ab + 1 - p_ba)``."""
        if self.symmetric:
            p_ab, p_ba = p_ab.double().clamp(1e-15, 1 - 1e-15), p_ba.double().clamp(1e-15, 1 - 1e-15)
            return torch.sigmoid(0.5 * (torch.logit(p_ab) - torch.logit(p_ba)))
        return 0.5 * (p_ab + 1.0 - p_ba)

    def win_prob(self, prompts: list, ys: list[str], others: list[str]) -> torch.Tensor:
        """Symmetric P(y ≻ y') from texts (prompts: strings or message lists); (B,) float32 on the CPU."""
        return self.win_prob_ids(*self.encode_pairs(prompts, ys, others))

    def encode_pairs(self, prompts: list, ys: list[str], others: list[str]) -> tuple[list, list, list]:
        """Token ids of each prompt and of its two responses (rendered as the model was trained): (xs, ys, others)."""
        xs, a, b = [], [], []
        for p, y, o in zip(prompts, ys, others, strict=True):
            x, ya = self.encode(p, y)
            xs.append(x)
            a.append(ya)
            b.append(self.encode(p, o)[1])
        return xs, a, b


class PreferenceReward:
    """A preference model as a reward against an anchor: ``r(x, y) = P(y ≻ y_anchor | x)`` (pairwise RLHF with
    an anchor response), the anchor being the row field ``anchor_field`` (e.g. a reference answer)."""

    name = "preference"

    def __init__(self, model: PreferenceModel, anchor_field: str = "reference"):
        self.model, self.anchor_field = model, anchor_field

    def __call__(self, batch) -> torch.Tensor:
        anchors = batch.meta.get(self.anchor_field) if self.anchor_field in batch.meta else None
        for i in range(len(batch)):
            if anchors is None or not isinstance(anchors[i], str):
                raise RewardError(
                    f"preference reward: row {i} has no {self.anchor_field!r} response to compare "
                    "with (the anchor field)",
                    self.name,
                    i,
                )
        p = self.model.win_prob(list(batch.meta["prompt"]), list(batch.meta["response"]), list(anchors))
        return p.to(output_device(batch))
