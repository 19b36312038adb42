"""Pairwise preferences of a rollout group as a reward source (pairwise RLHF, ``docs/pairwise_rlhf.md``).

A *pair scorer* reads one order of a pair: ``ordered(prompts, firsts, seconds) -> (p (N,), failed (N,))`` with
``p`` the probability that the first response is the better one when it is shown first, and
``symmetrise(p_ab, p_ba)`` turns the two orders' readings into one symmetric ``P(a ≻ b)``. Two scorers:

* :class:`ModelPairScorer` -- a pairwise preference model from ``alignflow pm`` (``σ(z(x, a, b))``);
* :class:`JudgePairScorer` -- a pairwise LLM judge (:class:`~alignflow.rewards.judge.JudgeReward`, template
  ``pairwise``): 1 when it names the first response, 0 for the second; symmetrised as ``½ (p_ab + 1 - p_ba)``.

:class:`PairwiseReward` compares, for each row, either every other sample of its group (meta ``group``; the
rows of one prompt) -- value ``w_i = 1/(G-1) Σ_{j≠i} P[i, j]``, the win rate -- or an anchor response, value
``P(y ≻ anchor)``: the row's field ``anchor_field`` (anchor ``reference``) or the current policy's greedy response
to the prompt (anchor ``greedy``, meta :data:`GREEDY_ANCHOR`, which ``alignflow rl`` fills before scoring; a batch
without it -- the greedy evaluation, whose responses are the greedy ones -- is its own anchor). A response equal to
its anchor is worth exactly 1/2 and is not sent to the scorer. Besides the (B,) value it leaves per-row tensors in
``last_fields`` that the reward role adds to the batch, for the ``pairwise`` advantage of ``alignflow rl``:

* ``pair_prefs`` (B, G_max): row i's ``P[i, j]`` against the j-th sample of its group (batch order), 1/2 on
  the diagonal and past the group's size; ``pair_group_size`` (B,): the group's size when it was scored;
* ``anchor_prefs`` (B,): ``P(y ≻ anchor)`` (anchor mode);
* ``pair_symmetry_error`` (B,): the mean over the row's comparisons of ``|p_ab + p_ba - 1|``, how far the
  scorer's two orders disagree before symmetrising (0 for a perfectly order-consistent scorer).

A group of one (e.g. the greedy evaluation) has win rate 1/2. A failed judge verdict (``on_parse_failure:
fallback``) flags its rows in ``errors``, which the RL metrics count.
"""

from __future__ import annotations

import json

import torch

from alignflow.algorithms.pairwise_adv import group_win_rate_advantages
from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.rewards.base import output_device
from alignflow.rewards.judge import build_judge
from alignflow.rewards.preference_model import PreferenceModel
from alignflow.rewards.rules import RewardError

GREEDY_ANCHOR = "pairwise_greedy"  # meta: the policy's greedy response to the row's prompt (anchor=greedy)
ANCHORS = ("group", "reference", "greedy")


class ModelPairScorer:
    """One order of a pair read by a :class:`~alignflow.rewards.preference_model.PreferenceModel`."""

    def __init__(self, model):
        self.model = model

    def ordered(self, prompts: list, firsts: list[str], seconds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not firsts:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0)
        return self.model.ordered_win_prob(prompts, firsts, seconds), torch.zeros(len(firsts))

    def symmetrise(self, p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
        return self.model.symmetrise(p_ab, p_ba)


class JudgePairScorer:
    """One order of a pair read by a pairwise LLM judge (its own both-orders averaging is switched off: the
    pairwise source asks both orders itself)."""

    def __init__(self, judge):
        if judge.template != "pairwise":
            raise ValueError(f"a pairwise source needs the judge's pairwise template, got template={judge.template}")
        judge.both_orders = False
        self.judge = judge

    def ordered(self, prompts: list, firsts: list[str], seconds: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not firsts:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0)
        meta = {"prompt": list(prompts), "response": list(firsts), self.judge.anchor_field: list(seconds)}
        values, flags = self.judge.with_failures(Batch(meta=meta))
        return values.double().cpu(), flags["errors"].float().cpu()

    @staticmethod
    def symmetrise(p_ab: torch.Tensor, p_ba: torch.Tensor) -> torch.Tensor:
        return 0.5 * (p_ab + 1.0 - p_ba)


def group_rows(batch: Batch) -> list[list[int]]:
    """Row indices of each group, groups in order of first appearance: meta ``group`` when present, else rows
    with the same prompt."""
    keys = (
        batch.meta["group"] if "group" in batch.meta else [json.dumps(p, sort_keys=True) for p in batch.meta["prompt"]]
    )
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k if not torch.is_tensor(k) else int(k), []).append(i)
    return list(out.values())


class PairwiseReward:
    """``reward(batch) -> (B,)``: the win rate within the group, or P(y ≻ anchor) (module docstring)."""

    def __init__(self, scorer, anchor: str = "group", anchor_field: str = "reference", name: str = "pairwise"):
        if anchor not in ANCHORS:
            raise ValueError(f"pairwise anchor must be one of {', '.join(ANCHORS)}, got {anchor!r}")
        self.scorer, self.anchor, self.anchor_field, self.name = scorer, anchor, anchor_field, name
        self.last_fields: dict = {}

    def _group(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        groups = group_rows(batch)
        prompts, responses = list(batch.meta["prompt"]), list(batch.meta["response"])
        pairs = [(g, a, b) for g, idx in enumerate(groups) for a in range(len(idx)) for b in range(len(idx)) if a != b]
        p, failed = self.scorer.ordered(
            [prompts[groups[g][a]] for g, a, _ in pairs],
            [responses[groups[g][a]] for g, a, _ in pairs],
            [responses[groups[g][b]] for g, _, b in pairs],
        )
        raw = {(g, a, b): i for i, (g, a, b) in enumerate(pairs)}
        width = max(len(idx) for idx in groups)
        prefs = torch.full((len(batch), width), 0.5, dtype=torch.float64)
        sizes, sym_err, errors = torch.zeros(len(batch)), torch.zeros(len(batch)), torch.zeros(len(batch))
        values = torch.full((len(batch),), 0.5, dtype=torch.float64)
        for g, idx in enumerate(groups):
            size = len(idx)
            sizes[idx] = float(size)
            if size < 2:
                continue
            mat = torch.full((size, size), 0.5, dtype=torch.float64)
            for a in range(size):
                for b in range(size):
                    if a != b:
                        p_ab, p_ba = p[raw[g, a, b]], p[raw[g, b, a]]
                        mat[a, b] = self.scorer.symmetrise(p_ab.view(1), p_ba.view(1))[0]
                        sym_err[idx[a]] += float((p_ab + p_ba - 1.0).abs()) / (size - 1)
                        errors[idx[a]] = max(float(errors[idx[a]]), float(failed[raw[g, a, b]]))
            prefs[idx, :size] = mat
            values[idx] = group_win_rate_advantages(mat) + 0.5
        self.last_fields = {"pair_prefs": prefs.float(), "pair_group_size": sizes, "pair_symmetry_error": sym_err}
        return values.float(), errors

    def _anchors(self, batch: Batch) -> list:
        """Each row's anchor response (anchor ``reference``: the row field; ``greedy``: meta GREEDY_ANCHOR)."""
        if self.anchor == "greedy":
            return list(batch.meta[GREEDY_ANCHOR]) if GREEDY_ANCHOR in batch.meta else list(batch.meta["response"])
        anchors = batch.meta.get(self.anchor_field) if self.anchor_field in batch.meta else None
        for i in range(len(batch)):
            if anchors is None or not isinstance(anchors[i], str):
                raise RewardError(
                    f"pairwise reward: row {i} has no {self.anchor_field!r} response to compare with "
                    "(reward.pairwise.anchor_field)",
                    self.name,
                    i,
                )
        return list(anchors)

    def _anchor(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = self._anchors(batch)
        prompts, ys = list(batch.meta["prompt"]), list(batch.meta["response"])
        ask = [i for i in range(len(batch)) if ys[i] != anchors[i]]  # y == anchor: P = 1/2 exactly, not asked
        ps, qs, aa = [prompts[i] for i in ask], [ys[i] for i in ask], [anchors[i] for i in ask]
        p, failed = self.scorer.ordered(ps + ps, qs + aa, aa + qs)
        k, n = len(ask), len(batch)
        p_ya, p_ay = torch.full((n,), 0.5, dtype=torch.float64), torch.full((n,), 0.5, dtype=torch.float64)
        p_ya[ask], p_ay[ask] = p[:k], p[k:]
        values = torch.full((n,), 0.5, dtype=torch.float64)
        values[ask] = self.scorer.symmetrise(p[:k], p[k:]).double()
        errors = torch.zeros(n)
        errors[ask] = torch.maximum(failed[:k], failed[k:]).float()
        values = values.float()
        self.last_fields = {"anchor_prefs": values, "pair_symmetry_error": (p_ya + p_ay - 1.0).abs().float()}
        return values, errors

    def with_failures(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """(values (B,), {"errors": (B,) 1 on rows with a comparison that fell back})."""
        missing = [k for k in ("prompt", "response") if k not in batch.meta]
        if missing:
            raise KeyError(f"pairwise reward: the batch has no meta {', '.join(missing)}")
        if not len(batch):
            self.last_fields = {}
            return torch.zeros(0), {"errors": torch.zeros(0)}
        values, errors = self._group(batch) if self.anchor == "group" else self._anchor(batch)
        device = output_device(batch)
        self.last_fields = {k: v.to(device) for k, v in self.last_fields.items()}
        return values.to(device), {"errors": errors.to(device)}

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.with_failures(batch)[0]


def build_pairwise(cfg, judge_cfg, device="cpu", seed: int = 0, key: str = "reward.pairwise") -> PairwiseReward:
    """A :class:`PairwiseReward` from a :class:`~alignflow.config.PairwiseRewardConfig` (and the judge section
    when ``judge`` is on); ConfigError naming ``key``."""

    if bool(cfg.model) == bool(cfg.judge):
        raise ConfigError(
            f"{key}: set exactly one of model (a preference-model directory from alignflow pm) and judge=true "
            f"(reward.judge with template pairwise); got model={cfg.model!r}, judge={cfg.judge}"
        )
    if cfg.judge:
        if judge_cfg.template != "pairwise":
            raise ConfigError(f"{key}.judge: reward.judge.template must be pairwise, got {judge_cfg.template}")
        scorer: ModelPairScorer | JudgePairScorer = JudgePairScorer(
            build_judge(judge_cfg, device, seed, key.rsplit(".", 1)[0] + ".judge")
        )
    else:
        scorer = ModelPairScorer(PreferenceModel(cfg.model, device))
    return PairwiseReward(scorer, cfg.anchor, cfg.anchor_field)
