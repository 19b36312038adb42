"""CGPO: constraint judges, CRPG / CODPO / CRRAFT updates and per-judge satisfaction, against hand-derived values."""

import math

import pytest
import torch

from alignflow.algorithms.cgpo import (
    codpo_loss,
    codpo_pairs,
    constraint_satisfaction,
    crpg_loss,
    crraft_loss,
    crraft_select,
    judge_violations,
)
from alignflow.tasks import reviews_judge

S1, S2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-2))  # sigmoid(1) = 0.731059, sigmoid(2) = 0.880797


def test_crpg_weights_feasible_samples_by_calibrated_reward():
    """r = (1, 0, 2), anchor 0, sample 3 violates judge 0 -> w = (s(1), s(0), 0) = (0.731059, 0.5, 0);
    log pi = (-1, -2, -3): loss = -(0.731059 * -1 + 0.5 * -2 + 0 * -3) / 3 = 1.731059 / 3 = 0.577020."""
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss, w = crpg_loss(logp, torch.tensor([1.0, 0.0, 2.0]), torch.zeros(3), torch.tensor([[0, 0], [0, 0], [1, 0]]))
    assert torch.allclose(w, torch.tensor([S1, 0.5, 0.0]))
    assert loss.item() == pytest.approx((S1 + 1.0) / 3, abs=1e-6)
    loss.backward()
    assert torch.allclose(logp.grad, -w / 3)


def test_codpo_pairs_and_loss():
    """r = (1, 3, 2, 0), only sample 1 infeasible: chosen = best feasible (2, r = 2), rejected = the
    infeasible one (1). No infeasible sample: chosen 1 (r = 3), rejected the lowest r (3). None feasible: no pair.
    Loss: lp_c = -2, ref_c = -3, lp_r = -4, ref_r = -3 -> margin 1 - (-1) = 2; beta 0.5 -> -log s(1) = 0.313262;
    minus lam * lp_c / len_c = -1 * -2 / 4 = +0.5 -> 0.813262."""
    r = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert codpo_pairs(r, torch.tensor([[0], [1], [0], [0]])) == [(2, 1)]
    assert codpo_pairs(r, torch.zeros(4, 1)) == [(1, 3)]
    assert codpo_pairs(r, torch.ones(4, 1)) == []
    t = torch.tensor
    loss = codpo_loss(t([-2.0]), t([-3.0]), t([-4.0]), t([-3.0]), t([4]), beta=0.5, lam=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.5, abs=1e-6)


def test_crraft_keeps_best_feasible_per_group():
    """Groups of 2: r = (1, 3 | 2, 0), samples 1 and 3 infeasible -> kept 0 and 2; log pi = (-1, -5, -2, -7):
    loss = -(s(1) * -1 + s(2) * -2) / 2 = (0.731059 + 1.761594) / 2 = 1.246326."""
    r, v = torch.tensor([1.0, 3.0, 2.0, 0.0]), torch.tensor([[0], [1], [0], [1]])
    assert crraft_select(r[:2], v[:2]) == 0 and crraft_select(r, torch.ones(4, 1)) is None
    loss = crraft_loss(torch.tensor([-1.0, -5.0, -2.0, -7.0]), r, torch.zeros(4), v, group_size=2)
    assert loss.item() == pytest.approx((S1 + 2 * S2) / 2, abs=1e-6)
    assert crraft_loss(torch.zeros(2, requires_grad=True), r[:2], torch.zeros(2), torch.ones(2, 1), 2).item() == 0


def test_judges_and_satisfaction_per_judge():
    """Violations ((0,1), (0,0), (1,1), (0,0)): judge a satisfied 3/4, b 2/4, both 2/4 (samples 2 and 4)."""
    sat = constraint_satisfaction(torch.tensor([[0, 1], [0, 0], [1, 1], [0, 0]]), ["a", "b"])
    assert sat == {"constraints/a": 0.75, "constraints/b": 0.5, "constraints/all": 0.5}
    judges = reviews_judge.rule_judges(("grammatical", "finished"))
    v = judge_violations(judges, ["Review : the plot"] * 2, [" was dull .", " was dull dull"])
    assert v.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="returned 1 verdicts for 2 samples"):
        judge_violations({"bad": lambda p, r: [True]}, ["x", "y"], ["a", "b"])
