"""Reward-model maths against hand-derived values (docs/reward_models.md)."""

import math

import pytest
import torch

from alignflow.algorithms.reward import aggregate, bt_loss, calibration_error, regression_loss


def test_bt_plain_value():
    """r_c = 2, r_r = 1: L = -log sigma(1) = log(1 + e^-1) = 0.313262. r_c = 0, r_r = 1: log(1 + e) = 1.313262.
    The mean of the two rows is 0.813262."""
    loss, m = bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert m["reward/accuracy"] == 0.5
    assert m["reward/margin"] == pytest.approx(0.0)


def test_bt_margin_equal_to_gap_gives_log2():
    """With r_c - r_r = m the argument of the sigmoid is 0: L = -log(1/2) = log 2 (Llama 2 margin)."""
    loss, _ = bt_loss(torch.tensor([3.5]), torch.tensor([1.0]), margin=torch.tensor([2.5]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_bt_margin_zero_is_plain_bt():
    c, r = torch.tensor([0.3, -1.2]), torch.tensor([0.1, 0.4])
    assert bt_loss(c, r, torch.zeros(2))[0].item() == pytest.approx(bt_loss(c, r)[0].item())


def test_bt_heads_average_and_gradient_sign():
    """Two heads: per-row loss is the mean over heads. d/dr_c of softplus(-(r_c - r_r)) = -sigma(-(r_c - r_r)):
    at r_c = r_r = 0 it is -1/2 per head, divided by 2 heads and 1 row -> -0.25; raising r_c lowers the loss."""
    c = torch.zeros(1, 2, requires_grad=True)
    loss, _ = bt_loss(c, torch.zeros(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.allclose(c.grad, torch.full((1, 2), -0.25))


def test_bt_reduction_none_sums_to_mean_times_b():
    c, r = torch.randn(5), torch.randn(5)
    per, _ = bt_loss(c, r, reduction="none")
    assert per.shape == (5,)
    assert per.sum().item() == pytest.approx(bt_loss(c, r)[0].item() * 5, rel=1e-6)


def test_ensemble_aggregations_match_the_paper_example():
    """Scores (1.0, 1.2, 2.6): mean 1.6; population variance ((-.6)^2 + (-.4)^2 + 1^2)/3 = 1.52/3 = 0.50667;
    UWO with lambda 0.5 = 1.6 - 0.25333 = 1.34667; WCO = min = 1.0 (Coste et al.; docs/reward_models.md)."""
    s = torch.tensor([[1.0, 1.2, 2.6]])
    assert aggregate(s, "mean").item() == pytest.approx(1.6)
    assert aggregate(s, "min").item() == pytest.approx(1.0)
    assert aggregate(s, "uwo", 0.5).item() == pytest.approx(1.6 - 0.5 * 1.52 / 3, abs=1e-6)
    assert aggregate(s, "uwo", 0.5).item() == pytest.approx(1.34667, abs=1e-5)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mean"):
        aggregate(torch.zeros(2, 3), "median")


def test_regression_loss_ignores_unrated_entries():
    """pred (1, 2) vs target (0, 5) with the second attribute unrated: MSE = (1 - 0)^2 / 1 = 1."""
    loss, _ = regression_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 5.0]]), torch.tensor([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(1.0)


def test_calibration_error_hand_example():
    """Two pairs with diff = log 3 (p = 0.75, correct) and diff = -log 3 (p = 0.25: predicts rejected, wrong).
    Both have confidence 0.75 and fall in one bin with accuracy 1/2: ECE = |0.5 - 0.75| = 0.25.
    A perfectly calibrated set: 4 pairs at p = 0.75 of which 3 correct -> ECE 0."""
    d = math.log(3)
    assert calibration_error(torch.tensor([d, -d])) == pytest.approx(0.25, abs=1e-6)
    assert calibration_error(torch.tensor([d, d, d, -d])) == pytest.approx(0.0, abs=1e-6)
