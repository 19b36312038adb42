"""Advantage estimators and DAPO data-side shaping (alignflow.algorithms.advantages / dapo).

docs/online_rl.md and the algorithms' pages. Expected numbers are derived in the docstrings; vectorised code is checked
against explicit Python loops.
"""

import math

import pytest
import torch

from alignflow.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    returns_to_go,
    rloo_advantages,
)
from alignflow.algorithms.dapo import dynamic_sampling_filter, overlong_penalty
from alignflow.algorithms.kl import kl_penalty_rewards


def _right_padded(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    return rewards, values, mask, lengths


def _to_left_padding(x, lengths):
    """Move each row's first `length` entries to the end of the row (right -> left padding)."""
    out = torch.full_like(x, 123.0) if x.is_floating_point() else torch.zeros_like(x)
    T = x.shape[1]
    for i, n in enumerate(lengths.tolist()):
        out[i, T - n :] = x[i, :n]
    return out


def _gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE per row over its valid prefix, in plain Python floats."""
    adv = torch.zeros_like(rewards)
    for i, n in enumerate(lengths.tolist()):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv


# ----------------------------------------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_explicit_loop(gamma, lam):
    """Vectorised GAE equals the per-row backwards loop δ_t = r_t + γV_{t+1} − V_t, Â_t = δ_t + γλÂ_{t+1}
    (V after the last valid token = 0); returns = Â + V on valid tokens, 0 elsewhere."""
    r, v, m, lengths = _right_padded()
    adv, ret = gae(r, v, m, gamma, lam)
    expected = _gae_loop(r, v, lengths, gamma, lam)
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(ret, torch.where(m, expected + v, 0.0), atol=1e-5)


def test_gae_hand_values_monte_carlo_td_and_mixed():
    """r = [0, 0, 1], V = [0.5, 0.2, 0.1].

    λ = γ = 1 (Monte Carlo): Â_t = Σ_{s≥t} r_s − V_t = [0.5, 0.8, 0.9], returns G = [1, 1, 1].
    λ = 0, γ = 0.9 (TD): Â_t = δ_t = [0 + 0.9·0.2 − 0.5, 0 + 0.9·0.1 − 0.2, 1 − 0.1] = [−0.32, −0.11, 0.9].
    γ = 1, λ = 0.5: δ = [−0.3, −0.1, 0.9]; Â₂ = 0.9, Â₁ = −0.1 + 0.45 = 0.35, Â₀ = −0.3 + 0.175 = −0.125.
    """
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.1]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.9]])) and torch.allclose(ret, torch.ones(1, 3))
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    assert torch.allclose(adv, torch.tensor([[-0.32, -0.11, 0.9]]))
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.125, 0.35, 0.9]]))


def test_gae_left_vs_right_padding_identical():
    """Left-padded rows (garbage 123 in the padding) give the same advantages on their valid tokens."""
    r, v, m, lengths = _right_padded(seed=1)
    adv_r, ret_r = gae(r, v, m, 1.0, 0.95)
    adv_l, ret_l = gae(
        _to_left_padding(r, lengths), _to_left_padding(v, lengths), _to_left_padding(m, lengths), 1.0, 0.95
    )
    assert torch.allclose(_to_left_padding(adv_r, lengths).masked_fill(~_to_left_padding(m, lengths), 0), adv_l)
    assert torch.allclose(_to_left_padding(ret_r, lengths).masked_fill(~_to_left_padding(m, lengths), 0), ret_l)


def test_gae_interior_gap_is_transparent():
    """A masked position inside a row (e.g. a tool output) is skipped: [r0, gap, r2] gives what [r0, r2] gives."""
    r, v = torch.tensor([[1.0, 50.0, 2.0]]), torch.tensor([[0.3, 99.0, 0.7]])
    adv, _ = gae(r, v, torch.tensor([[1, 0, 1]]), 0.9, 0.8)
    ref, _ = gae(r[:, [0, 2]], v[:, [0, 2]], torch.ones(1, 2), 0.9, 0.8)
    assert torch.allclose(adv[:, [0, 2]], ref) and adv[0, 1] == 0


def test_returns_to_go_discounted():
    """r = [1, 2, 3], γ = 0.5: G = [1 + 0.5·2 + 0.25·3, 2 + 0.5·3, 3] = [2.75, 3.5, 3]."""
    g = returns_to_go(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), gamma=0.5)
    assert torch.allclose(g, torch.tensor([[2.75, 3.5, 3.0]]))


# ----------------------------------------------------------------------------------------------- GRPO / RLOO
def test_grpo_hand_values():
    """r = [1, 0, 1, 0]: mean 0.5, unbiased std = sqrt(4·0.25/3) = 0.57735 -> Â = ±0.5/0.57735 = ±0.866.
    Dr. GRPO (no std): Â = ±0.5. All-equal rewards -> Â = 0 (ε keeps it finite)."""
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    a = grpo_advantages(r, group_size=4, eps=0.0)
    assert torch.allclose(a, torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.5 / math.sqrt(1 / 3))
    assert torch.allclose(dr_grpo_advantages(r, group_size=4), torch.tensor([0.5, -0.5, 0.5, -0.5]))
    assert torch.equal(grpo_advantages(torch.ones(4), group_size=4), torch.zeros(4))


def _grpo_loop(scores, ids, norm_by_std, eps):
    out = torch.zeros_like(scores)
    for gid in set(ids):
        idx = [i for i, x in enumerate(ids) if x == gid]
        grp = scores[idx]
        centred = grp - grp.mean()
        out[idx] = centred / (grp.std() + eps) if norm_by_std else centred
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_vectorised_vs_per_group_loop(norm_by_std):
    """group_size layout and shuffled string group_ids (uneven group sizes) both equal a per-group loop using
    torch.std (Bessel)."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(24, generator=g)
    ids = [i // 4 for i in range(24)]
    a = grpo_advantages(scores, group_size=4, norm_by_std=norm_by_std)
    assert torch.allclose(a, _grpo_loop(scores, ids, norm_by_std, 1e-6), atol=1e-6)
    names = [f"prompt-{i % 5}" for i in torch.randperm(24, generator=g).tolist()]  # groups of 4 or 5
    a = grpo_advantages(scores, group_ids=names, norm_by_std=norm_by_std)
    assert torch.allclose(a, _grpo_loop(scores, names, norm_by_std, 1e-6), atol=1e-6)


def test_rloo_hand_values_and_loop():
    """R = [1, 2, 3, 4]: A_i = R_i − mean of the others = [1 − 3, 2 − 8/3, 3 − 7/3, 4 − 2] = [−2, −2/3, 2/3, 2].
    Random groups equal an explicit leave-one-out loop; a singleton group is an error."""
    a = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), group_size=4)
    assert torch.allclose(a, torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0]))
    scores = torch.randn(12, generator=torch.Generator().manual_seed(1))
    loop = torch.tensor(
        [
            scores[i].item() - (scores[3 * (i // 3) : 3 * (i // 3) + 3].sum().item() - scores[i].item()) / 2
            for i in range(12)
        ]
    )
    assert torch.allclose(rloo_advantages(scores, group_size=3), loop, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), group_ids=[0, 0, 1])


def test_group_size_errors():
    with pytest.raises(ValueError, match="group_size=4"):
        grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="exactly one"):
        grpo_advantages(torch.zeros(4))


# ----------------------------------------------------------------------------------------------- ReMax / REINFORCE++
def test_remax_greedy_baseline():
    """Sequence form: A = R(y) − R(ȳ); when the sample is the greedy decode (same score) A = 0 exactly.
    Token form, r = [[0.1, −0.2, 2.0]], baseline 1: Â_t = Σ_{s≥t} r_s − 1 = [0.9, 0.8, 1.0]."""
    r = torch.tensor([0.3, 1.0, -2.0])
    assert torch.equal(remax_advantages(r, r.clone()), torch.zeros(3))
    assert torch.allclose(remax_advantages(r, torch.tensor([0.0, 2.0, -2.0])), torch.tensor([0.3, -1.0, 0.0]))
    tok = remax_advantages(torch.tensor([[0.1, -0.2, 2.0]]), torch.tensor([1.0]), torch.ones(1, 3))
    assert torch.allclose(tok, torch.tensor([[0.9, 0.8, 1.0]]))


def test_reinforce_pp_whitening_hand_values():
    """β = 0, scores R = [1, 3], lengths 1 and 3 (right padding). Returns-to-go put R on every token:
    G = [[1, ·, ·], [3, 3, 3]]. Over the 4 valid tokens μ = 10/4 = 2.5 and unbiased var = (1.5² + 3·0.5²)/3 = 1, so
    Â = [[−1.5, 0, 0], [0.5, 0.5, 0.5]] (mean 0, std 1)."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    tr = kl_penalty_rewards(torch.tensor([1.0, 3.0]), torch.zeros(2, 3), torch.zeros(2, 3), mask, beta=0.0)
    a = reinforce_pp_advantages(tr, mask)
    assert torch.allclose(a, torch.tensor([[-1.5, 0.0, 0.0], [0.5, 0.5, 0.5]]), atol=1e-6)


def test_reinforce_pp_random_batch_mean_zero_std_one():
    r, _, m, _ = _right_padded(seed=2)
    a = reinforce_pp_advantages(r, m)
    assert abs(a[m].mean().item()) < 1e-6 and a[m].std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.all(a[~m] == 0)


def test_broadcast_and_table():
    """Sequence advantages [2, −1] on masks [[1, 1, 0], [0, 1, 1]] -> [[2, 2, 0], [0, −1, −1]]."""
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]))
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "remax", "reinforce_pp"}


# ----------------------------------------------------------------------------------------------- DAPO data side
def test_dynamic_sampling_filter():
    """Groups of 4: all correct, mixed, all wrong. Only the mixed group (0 < #correct < G) is kept."""
    scores = torch.tensor([1.0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    keep = dynamic_sampling_filter(scores, group_size=4)
    assert keep.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="group_size=5"):
        dynamic_sampling_filter(scores, group_size=5)


def test_overlong_penalty_paper_values():
    """L_max = 20480, L_cache = 4096 -> soft zone starts at 16384.
    |y| = 16384 -> 0; 18432 -> (16384 − 18432)/4096 = −0.5; 20480 -> −1; 20481 (over budget) -> −1; 100 -> 0."""
    p = overlong_penalty(torch.tensor([100, 16384, 18432, 20480, 20481]), max_len=20480, cache_len=4096)
    assert torch.allclose(p, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=20)
