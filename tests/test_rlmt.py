"""RLMT: the answer after the thinking by hand, and the reward role scoring only that answer (reward.answer_*)."""

from __future__ import annotations

import torch

from alignflow.batch import Batch
from alignflow.rewards.thinking import answer_part
from alignflow.trainers.roles import RewardRole


def test_answer_part_by_hand():
    assert answer_part("<think>a</think>\n\nB", "</think>") == "B"
    assert answer_part("no thinking here", "</think>") == "no thinking here"
    assert answer_part("no thinking here", "</think>", strict=True) == "[NULL]"
    zero = "<think> plan </think> <response> the answer </response> trailing"
    assert answer_part(zero, "<response>", "</response>") == "the answer"
    assert answer_part("x</think>y</think>z", "</think>") == "y</think>z"  # the first delimiter ends the thinking
    assert answer_part("anything", "") == "anything"


class _Lengths:
    """A stand-in CompositeReward with one source: the number of characters of each response it is given."""

    def __init__(self):
        self.parts = [("len", None, 1.0)]
        self.seen = None

    def evaluate(self, batch):
        self.seen = batch
        return {"len": torch.tensor([float(len(r)) for r in batch["response"]])}, {}


def test_reward_role_scores_the_answer_only():
    """'<think>abc</think> hello' scores len('hello') = 5 with reward.answer_after=</think>, 24 without; the
    sources get the text only (token ids dropped), and the caller's batch keeps its full response."""
    batch = Batch(
        {"response_ids": torch.ones(2, 3, dtype=torch.long), "scores_hint": torch.zeros(2)},
        {"prompt": ["p", "q"], "response": ["<think>abc</think> hello", "plain"]},
    )
    comp = _Lengths()
    out = RewardRole(comp, answer=("</think>", "", False)).score(batch)
    assert out["scores"].tolist() == [5.0, 5.0]
    assert "response_ids" not in comp.seen.tensors and "scores_hint" in comp.seen.tensors
    assert batch["response"][0] == "<think>abc</think> hello"
    assert RewardRole(_Lengths()).score(batch)["scores"].tolist() == [24.0, 5.0]
    assert RewardRole(_Lengths(), answer=("</think>", "", True)).score(batch)["scores"].tolist() == [5.0, 6.0]
