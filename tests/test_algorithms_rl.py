"""Masked helpers, loss aggregation and KL estimators/controllers (alignflow.algorithms.core / kl).

docs/online_rl.md (aggregation, KL). Every expected number is derived by hand in the test's docstring.
"""

import math

import pytest
import torch

from alignflow.algorithms.core import AGG_MODES, aggregate, masked_mean, masked_sum, masked_var, masked_whiten
from alignflow.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_penalty_rewards,
    make_kl_controller,
    sequence_kl,
)

NAN = float("nan")


def _random_batch(B=8, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right-padded
    return loss, mask


# ----------------------------------------------------------------------------------------------- masked helpers
def test_masked_mean_sum_ignore_padding_even_nan():
    """x = [[1, 2, nan], [4, 5, 6]], mask = [[1, 1, 0], [1, 1, 1]].

    masked_sum = 1+2+4+5+6 = 18; masked_mean = 18/5 = 3.6; row means [1.5, 5]. The NaN is at a padded position and
    must not leak (a multiply-by-mask implementation would return NaN).
    """
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert masked_sum(x, m).item() == pytest.approx(18.0)
    assert masked_mean(x, m).item() == pytest.approx(3.6)
    assert torch.allclose(masked_mean(x, m, dim=-1), torch.tensor([1.5, 5.0]))


def test_masked_mean_all_masked_is_zero_not_nan():
    """No valid entry: Σ m·x / max(Σ m, 1) = 0 / 1 = 0 (and per-row likewise)."""
    x = torch.randn(2, 3)
    m = torch.zeros(2, 3)
    assert masked_mean(x, m).item() == 0.0
    assert torch.equal(masked_mean(x, m, dim=-1), torch.zeros(2))


def test_masked_var_matches_torch_var_of_selected():
    """Unbiased and population variance of the valid entries equal torch.var of x[mask]."""
    x, m = _random_batch()
    sel = x[m]
    assert masked_var(x, m).item() == pytest.approx(sel.var(unbiased=True).item(), rel=1e-5)
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(sel.var(unbiased=False).item(), rel=1e-5)


def test_masked_whiten_mean_zero_std_one_and_zero_outside():
    """After whitening, valid entries have mean 0 and unbiased std 1; padded ones are 0.

    With shift_mean=False only the scale changes: mean stays μ, std becomes 1.
    Hand case: valid x = [1, 3] -> μ = 2, var = ((1)² + (1)²)/1 = 2, whitened = ±1/√2.
    """
    x, m = _random_batch(seed=1)
    w = masked_whiten(x, m)
    assert abs(w[m].mean().item()) < 1e-6 and w[m].std().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.all(w[~m] == 0)
    w2 = masked_whiten(x, m, shift_mean=False)
    assert w2[m].mean().item() == pytest.approx(x[m].mean().item(), abs=1e-5)
    assert w2[m].std().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(w2[m] - w[m], torch.full_like(w[m], x[m].mean().item()), atol=1e-5)
    hand = masked_whiten(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]), eps=0.0)
    assert torch.allclose(hand, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]))


# ----------------------------------------------------------------------------------------------- aggregation
LOSS_2x3 = torch.tensor([[1.0, 2.0, NAN], [4.0, 5.0, 6.0]])
MASK_2x3 = torch.tensor([[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    "mode,kwargs,expected",
    [
        ("token_mean", {}, 18 / 5),
        ("seq_mean_token_mean", {}, (1.5 + 5.0) / 2),
        ("seq_mean_token_sum", {}, (3.0 + 15.0) / 2),
        ("seq_mean_token_sum_norm", {"norm_len": 4}, (3.0 / 4 + 15.0 / 4) / 2),
    ],
)
def test_aggregation_modes_worked_2x3(mode, kwargs, expected):
    """l = [[1, 2, ·], [4, 5, 6]] (· padded, holding NaN), mask = [[1, 1, 0], [1, 1, 1]].

    token_mean = (1+2+4+5+6)/5 = 3.6; seq_mean_token_mean = (3/2 + 15/3)/2 = 3.25;
    seq_mean_token_sum = (3 + 15)/2 = 9; seq_mean_token_sum_norm with L = 4: (3/4 + 15/4)/2 = 2.25.
    """
    assert aggregate(LOSS_2x3, MASK_2x3, mode, **kwargs).item() == pytest.approx(expected)


def test_aggregation_table_and_errors():
    """The table holds the four modes; a wrong name lists the valid ones; the norm mode needs L."""
    assert set(AGG_MODES) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"}
    with pytest.raises(ValueError, match="valid choices.*token_mean"):
        aggregate(LOSS_2x3, MASK_2x3, "mean")
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(LOSS_2x3, MASK_2x3, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="global_tokens"):
        aggregate(LOSS_2x3, MASK_2x3, "seq_mean_token_mean", global_tokens=5)


def test_aggregation_all_masked_row_not_counted_and_all_masked_batch_zero():
    """Adding an all-padding row changes no mode (it is not a sequence); an empty batch gives 0, not NaN."""
    loss = torch.cat([LOSS_2x3, torch.full((1, 3), NAN)])
    mask = torch.cat([MASK_2x3, torch.zeros(1, 3, dtype=MASK_2x3.dtype)])
    for mode in AGG_MODES:
        kw = {"norm_len": 4} if mode.endswith("norm") else {}
        assert aggregate(loss, mask, mode, **kw).item() == pytest.approx(
            aggregate(LOSS_2x3, MASK_2x3, mode, **kw).item()
        )
        assert aggregate(loss, torch.zeros_like(mask), mode, **kw).item() == 0.0


@pytest.mark.parametrize("mode", sorted(AGG_MODES))
def test_micro_batch_split_invariance(mode):
    """Split 8 rows into 4 micro-batches of 2; with the global count, Σ_k aggregate(part_k) == aggregate(all).

    token_mean divides by the global token count Σ m; seq modes by the global number of sequences (8). Gradients are
    linear in the loss, so equal sums mean equal accumulated gradients. The naive average of per-micro-batch
    token means differs (the lengths differ), which is the bug this guards against.
    """
    loss, mask = _random_batch(B=8, T=6, seed=3)
    loss = loss.requires_grad_()
    kw = {"norm_len": 6} if mode.endswith("norm") else {}
    whole = aggregate(loss, mask, mode, **kw)
    (g_whole,) = torch.autograd.grad(whole, loss)
    glob = {"global_tokens": int(mask.sum())} if mode == "token_mean" else {"global_seqs": 8}
    parts = sum(aggregate(l_k, m_k, mode, **kw, **glob) for l_k, m_k in zip(loss.split(2), mask.split(2), strict=False))
    (g_parts,) = torch.autograd.grad(parts, loss)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(g_parts, g_whole, atol=1e-7)
    if mode == "token_mean":
        naive = sum(aggregate(l_k, m_k, mode) for l_k, m_k in zip(loss.split(2), mask.split(2), strict=False)) / 4
        assert abs(naive.item() - whole.item()) > 1e-3


# ----------------------------------------------------------------------------------------------- KL estimators
def test_kl_estimators_hand_values_and_zero_at_equality():
    """lp_θ = log 0.5, lp_ref = log 0.25, so log r = lp_ref − lp_θ = −log 2.

    k1 = log 2 = 0.693147; k2 = ½ (log 2)² = 0.240227; k3 = r − 1 − log r = 0.5 − 1 + log 2 = 0.193147.
    With lp_θ = lp_ref all three are exactly 0.
    """
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_k1(lp, ref).item() == pytest.approx(math.log(2))
    assert kl_k2(lp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(lp, ref).item() == pytest.approx(0.5 - 1 + math.log(2))
    x = torch.randn(3, 4)
    for name, fn in KL_ESTIMATORS.items():
        assert torch.all(fn(x, x) == 0), name


def test_k3_nonnegative_elementwise():
    """k3 = e^u − u − 1 ≥ 0 for all u (convexity), checked on 10⁴ random log-ratios including large ones."""
    g = torch.Generator().manual_seed(0)
    lp, ref = 5 * torch.randn(100, 100, generator=g), 5 * torch.randn(100, 100, generator=g)
    assert torch.all(kl_k3(lp, ref) >= 0)
    assert torch.all(kl_k2(lp, ref) >= 0)


def test_kl_monte_carlo_matches_exact_categorical():
    """q = [0.5, 0.3, 0.2] (sampler), p = [0.45, 0.35, 0.2] (reference); KL(q‖p) = Σ q log(q/p) = 0.00644.

    With 10⁶ samples a ~ q the means of k1 and k3 match the exact KL to 1e-2 (both unbiased), k2 is ≥ 0 and close,
    and var(k3) < var(k1) (the KL is small, so k3 ≈ ½(log r)² has tiny variance).
    """
    q, p = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.45, 0.35, 0.2])
    exact = float((q * (q / p).log()).sum())
    g = torch.Generator().manual_seed(0)
    a = torch.multinomial(q, 1_000_000, replacement=True, generator=g)
    lp, ref = q.log()[a][None], p.log()[a][None]  # (1, N)
    k1, k3 = kl_k1(lp, ref), kl_k3(lp, ref)
    assert k1.mean().item() == pytest.approx(exact, abs=1e-2)
    assert k3.mean().item() == pytest.approx(exact, abs=1e-2)
    assert k3.var().item() < k1.var().item()


def test_kl_estimator_gradients_in_expectation():
    """Exact expectations over a categorical q_θ = softmax(θ), weights q detached (the sampling distribution).

    Σ_a sg[q(a)]·∇k2(a) = Σ q (lq − lp) ∇lq = ∇KL(q_θ‖p)   (reverse KL),
    Σ_a sg[q(a)]·∇k3(a) = Σ q (1 − p/q) ∇lq = −Σ p ∇lq = ∇KL(p‖q_θ)   (forward KL),
    Σ_a sg[q(a)]·∇k1(a) = Σ q ∇lq = ∇Σ q = 0.
    """
    theta = torch.tensor([0.3, -0.2, 0.5, 0.0], requires_grad=True)
    p = torch.tensor([0.1, 0.4, 0.3, 0.2])
    lq = torch.log_softmax(theta, -1)
    w = lq.exp().detach()

    def expected_grad(fn):
        return torch.autograd.grad((w * fn(lq[None], p.log()[None])[0]).sum(), theta, retain_graph=True)[0]

    reverse = torch.autograd.grad((lq.exp() * (lq - p.log())).sum(), theta, retain_graph=True)[0]
    forward = torch.autograd.grad((p * (p.log() - lq)).sum(), theta, retain_graph=True)[0]
    assert torch.allclose(expected_grad(kl_k2), reverse, atol=1e-6)
    assert torch.allclose(expected_grad(kl_k3), forward, atol=1e-6)
    assert torch.allclose(expected_grad(kl_k1), torch.zeros(4), atol=1e-6)


def test_kl_loss_aggregates_and_names_metric():
    """kl_loss with k1, token_mean on the 2x3 mask: mean of (lp − ref) over the 5 valid tokens.

    lp − ref = [[1, 2, ·], [4, 5, 6]] -> 18/5 = 3.6. Gradient w.r.t. lp on a valid token is 1/5.
    """
    lp = LOSS_2x3.nan_to_num(0.0).clone().requires_grad_()
    loss, metrics = kl_loss(lp, torch.zeros(2, 3), MASK_2x3, estimator="k1")
    assert loss.item() == pytest.approx(3.6) and metrics["policy/kl_loss"].item() == pytest.approx(3.6)
    loss.backward()
    assert torch.allclose(lp.grad, MASK_2x3.float() / 5)
    with pytest.raises(ValueError, match="valid choices"):
        kl_loss(lp, lp, MASK_2x3, estimator="k4")


# ----------------------------------------------------------------------------------------------- KL-shaped rewards
def test_kl_penalty_rewards_right_and_left_padding():
    """β = 0.1, k1 = lp_old − lp_ref. Row 0 right-padded mask [1, 1, 0], k1 = [1, 2, ·], R = 5:
    r = [−0.1, −0.2 + 5, 0] = [−0.1, 4.8, 0]. Row 1 left-padded mask [0, 1, 1], k1 = [·, 3, −1], R = −2:
    r = [0, −0.3, 0.1 − 2] = [0, −0.3, −1.9]. Row 2 all padding: zeros.
    """
    lp_old = torch.tensor([[1.0, 2.0, 9.0], [9.0, 3.0, -1.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    r = kl_penalty_rewards(torch.tensor([5.0, -2.0, 3.0]), lp_old, torch.zeros(3, 3), mask, beta=0.1)
    assert torch.allclose(r, torch.tensor([[-0.1, 4.8, 0.0], [0.0, -0.3, -1.9], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        kl_penalty_rewards(torch.zeros(2), lp_old, torch.zeros(3, 3), mask, beta=0.1)


def test_kl_reward_and_kl_loss_agree_in_sign():
    """Raising lp_θ on a token (above lp_ref) lowers its shaped reward and raises every KL loss estimate.

    r_t = −β(lp − ref): ∂r/∂lp = −β < 0. For lp > ref, ∂k1/∂lp = 1, ∂k2/∂lp = lp − ref > 0,
    ∂k3/∂lp = 1 − e^{ref − lp} > 0.
    """
    lp, ref, mask = torch.tensor([[0.2]]), torch.tensor([[0.0]]), torch.ones(1, 1)
    low = kl_penalty_rewards(torch.zeros(1), lp, ref, mask, beta=0.1)
    high = kl_penalty_rewards(torch.zeros(1), lp + 0.1, ref, mask, beta=0.1)
    assert high.item() < low.item()
    for name in KL_ESTIMATORS:
        x = lp.clone().requires_grad_()
        kl_loss(x, ref, mask, estimator=name)[0].backward()
        assert x.grad.item() > 0, name


def test_sequence_kl_sum_over_tokens_mean_over_rows():
    """k1 = [[1, 2, ·], [4, 5, 6]] -> per-row sums [3, 15], mean 9; an all-padding row is not counted."""
    lp = torch.cat([LOSS_2x3, torch.ones(1, 3)])
    mask = torch.cat([MASK_2x3, torch.zeros(1, 3, dtype=MASK_2x3.dtype)])
    assert sequence_kl(lp, torch.zeros(3, 3), mask).item() == pytest.approx(9.0)


# ----------------------------------------------------------------------------------------------- controllers
def test_adaptive_kl_controller_values():
    """β₀ = 0.2, target 6, horizon 10000, n = 256.

    KL = 6: e = 0 -> β unchanged (0.2). KL = 60 (10× target): e = clip(9, ±0.2) = 0.2 -> β = 0.2·(1 + 0.2·256/10⁴)
    = 0.2·1.00512 = 0.201024 (saturated: KL = 600 gives the same). KL = 6.6: e = 0.1 -> ×(1 + 0.1·256/10⁴) = ×1.00256.
    KL = 0: e = −0.2 -> ×(1 − 0.00512).
    """
    c = AdaptiveKLController(0.2, 6.0, 10000)
    assert c.update(6.0, 256) == pytest.approx(0.2)
    assert c.update(60.0, 256) == pytest.approx(0.201024)
    c2 = AdaptiveKLController(0.2, 6.0, 10000)
    assert c2.update(600.0, 256) == pytest.approx(0.201024)
    assert c2.update(6.6, 256) == pytest.approx(0.201024 * 1.00256)
    c3 = AdaptiveKLController(0.2, 6.0, 10000)
    assert c3.update(0.0, 256) == pytest.approx(0.2 * (1 - 0.00512))


def test_kl_controllers_state_dict_and_fixed():
    """A restored controller continues exactly; the fixed one never moves."""
    c = AdaptiveKLController(0.1, 2.0, 100)
    c.update(5.0, 10)
    restored = AdaptiveKLController(0.1, 2.0, 100)
    restored.load_state_dict(c.state_dict())
    assert restored.update(1.0, 10) == c.update(1.0, 10)
    f = FixedKLController(0.05)
    assert f.update(1e6, 1000) == 0.05 and f.value == 0.05
    f2 = FixedKLController(0.0)
    f2.load_state_dict(f.state_dict())
    assert f2.value == 0.05
    assert isinstance(make_kl_controller("adaptive", 0.2), AdaptiveKLController)
    with pytest.raises(ValueError, match="valid choices"):
        make_kl_controller("pid", 0.2)
