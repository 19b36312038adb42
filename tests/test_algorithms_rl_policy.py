"""Policy / value / entropy losses and Safe RLHF pieces (alignflow.algorithms.policy / safe).

docs/online_rl.md, docs/ppo.md, docs/gspo.md, docs/safe_rlhf.md. Expected numbers are derived in the docstrings.
"""

import math

import pytest
import torch

from alignflow.algorithms.advantages import grpo_advantages
from alignflow.algorithms.core import AGG_MODES
from alignflow.algorithms.kl import kl_loss
from alignflow.algorithms.policy import (
    POLICY_LOSSES,
    entropy_bonus,
    entropy_from_logits,
    gspo_policy_loss,
    ppo_policy_loss,
    value_loss,
    vanilla_pg_loss,
)
from alignflow.algorithms.safe import LagrangeMultiplier, safe_combined_advantages, safe_shaped_rewards

ONE = torch.ones(1, 1)


def _ppo_single(ratio, adv, **kw):
    """One token with ρ = ratio (lp_old = 0, lp_θ = log ρ); returns (surrogate = −loss, dL/dlp_θ)."""
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = ppo_policy_loss(lp, torch.zeros(1, 1), torch.tensor([[adv]]), ONE, **kw)
    loss.backward()
    return -loss.item(), lp.grad.item(), metrics


# ----------------------------------------------------------------------------------------------- PPO clip
def test_ppo_clip_paper_values():
    """Â = +1, ε = 0.2. ρ = 1.5: min(1.5·1, clip(1.5, 0.8, 1.2)·1) = 1.2, and the clipped branch is constant, so the
    gradient is 0. ρ = 0.5: min(0.5, 0.8) = 0.5, unclipped: d(−ρÂ)/dlp = −ρÂ = −0.5 (non-zero)."""
    surrogate, grad, metrics = _ppo_single(1.5, 1.0)
    assert surrogate == pytest.approx(1.2) and grad == 0.0 and metrics["policy/clipfrac"].item() == 1.0
    surrogate, grad, metrics = _ppo_single(0.5, 1.0)
    assert surrogate == pytest.approx(0.5) and grad == pytest.approx(-0.5) and metrics["policy/clipfrac"].item() == 0


def test_dapo_clip_higher_is_asymmetric():
    """ρ = 1.25, Â = +1: symmetric ε = 0.2 clips to 1.2 (grad 0); clip-higher ε_high = 0.28 leaves 1.25 unclipped
    (grad −1.25). On the low side (ρ = 0.75, Â = −1) both clip at 0.8: min(−0.75, −0.8) = −0.8, grad 0."""
    assert _ppo_single(1.25, 1.0)[:2] == (pytest.approx(1.2), 0.0)
    assert _ppo_single(1.25, 1.0, clip_high=0.28)[:2] == (pytest.approx(1.25), pytest.approx(-1.25))
    for kw in ({}, {"clip_high": 0.28}):
        assert _ppo_single(0.75, -1.0, **kw)[:2] == (pytest.approx(-0.8), 0.0)


def test_dual_clip_caps_negative_advantages_only():
    """c = 3. Â = −1, ρ = 5: PPO loss max(5, 1.2) = 5 is capped at −c·Â = 3 (surrogate −3, grad 0).
    Â = −1, ρ = 2: loss 2 < 3, untouched, grad d(−ρÂ)/dlp = ρ = 2. Â = +1, ρ = 5: dual clip does not apply:
    loss max(−5, −1.2) = −1.2."""
    surrogate, grad, metrics = _ppo_single(5.0, -1.0, dual_clip=3.0)
    assert surrogate == pytest.approx(-3.0) and grad == 0.0 and metrics["policy/dual_clipfrac"].item() == 1.0
    assert _ppo_single(5.0, -1.0)[0] == pytest.approx(-5.0)
    assert _ppo_single(2.0, -1.0, dual_clip=3.0)[:2] == (pytest.approx(-2.0), pytest.approx(2.0))
    assert _ppo_single(5.0, 1.0, dual_clip=3.0)[0] == pytest.approx(1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        _ppo_single(1.0, 1.0, dual_clip=0.5)


def test_ppo_metrics_hand_values():
    """Two tokens, ρ = [1.5, 1.0], Â = +1: clipfrac = 1/2, ratio_mean = 1.25,
    approx_kl = mean[(ρ − 1) − log ρ] = (0.5 − log 1.5 + 0)/2 = 0.0472674."""
    lp = torch.tensor([[math.log(1.5), 0.0]])
    _, m = ppo_policy_loss(lp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    assert m["policy/clipfrac"].item() == 0.5 and m["policy/ratio_mean"].item() == pytest.approx(1.25)
    assert m["policy/approx_kl"].item() == pytest.approx((0.5 - math.log(1.5)) / 2)


# ----------------------------------------------------------------------------------------------- value / entropy / pg
def test_value_loss_clip_values():
    """ε_v = 0.2. V_old = 0, V = 1, G = 1: V^c = 0.2, L = ½·max((1−1)², (0.2−1)²) = ½·0.64 = 0.32; gradient 0
    (the clipped branch is constant in V). Without clipping L = 0. V_old = 0, V = 0.1, G = 1: V^c = V,
    L = ½·0.81 = 0.405, dL/dV = V − G = −0.9."""
    v = torch.ones(1, 1, requires_grad=True)
    loss, m = value_loss(v, torch.zeros(1, 1), ONE, ONE, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.32) and v.grad.item() == 0.0 and m["critic/clipfrac"].item() == 1.0
    assert value_loss(torch.ones(1, 1), torch.zeros(1, 1), ONE, ONE, clip=None)[0].item() == 0.0
    v = torch.full((1, 1), 0.1, requires_grad=True)
    loss, _ = value_loss(v, torch.zeros(1, 1), ONE, ONE, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.405) and v.grad.item() == pytest.approx(-0.9)


def test_entropy_bonus_and_target():
    """Uniform logits over V = 4: H = log 4 per token. Bonus loss = −log 4; with PPO-max target 35: |log 4 − 35|."""
    h = entropy_from_logits(torch.zeros(2, 3, 4))
    assert torch.allclose(h, torch.full((2, 3), math.log(4)))
    loss, m = entropy_bonus(h, torch.ones(2, 3))
    assert loss.item() == pytest.approx(-math.log(4)) and m["policy/entropy"].item() == pytest.approx(math.log(4))
    assert entropy_bonus(h, torch.ones(2, 3), target=35.0)[0].item() == pytest.approx(35 - math.log(4))


def test_vanilla_pg_rloo_form():
    """lp = [[−1, −2], [−3, ·]], A = [2, −1], seq_mean_token_sum: L = −½[2·(−3) + (−1)·(−3)] = −½(−3) = 1.5."""
    lp = torch.tensor([[-1.0, -2.0], [-3.0, float("nan")]])
    loss, _ = vanilla_pg_loss(lp, torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [1, 0]]))
    assert loss.item() == pytest.approx(1.5)


# ----------------------------------------------------------------------------------------------- GSPO
def test_gspo_paper_ratio_and_clip():
    """Token ratios {1.10, 0.95, 1.30, 0.90}: s = (1.1·0.95·1.3·0.9)^{1/4} = 1.22265^{1/4} = 1.0515.
    With Â = +1 and ε = (3e-4, 4e-4) s is out of range: loss = −(1 + 4e-4), zero gradient, clipfrac 1.
    With ε = 0.2 it is inside: loss = −s and dL/dlp_t = −s/4 = −0.26288 on every token."""
    ratios = torch.tensor([[1.10, 0.95, 1.30, 0.90]])
    lp = ratios.log().requires_grad_()
    mask, adv = torch.ones(1, 4), torch.tensor([1.0])
    loss, m = gspo_policy_loss(lp, torch.zeros(1, 4), adv, mask)
    loss.backward()
    assert m["policy/ratio_mean"].item() == pytest.approx(1.0515, abs=1e-4)
    assert loss.item() == pytest.approx(-1.0004) and torch.all(lp.grad == 0) and m["policy/clipfrac"].item() == 1
    lp.grad = None
    loss, _ = gspo_policy_loss(lp, torch.zeros(1, 4), adv, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    s = 1.22265**0.25
    assert loss.item() == pytest.approx(-s, abs=1e-4) and torch.allclose(lp.grad, torch.full((1, 4), -s / 4), atol=1e-4)


def test_gspo_token_form_equals_sequence_objective():
    """GSPO-token with one advantage per sequence and seq_mean_token_mean equals, in value and gradient,
    −(1/G) Σ_i min(s_i Â_i, clip(s_i) Â_i) with s_i = exp(mean_t(lp − lp_old)) differentiated directly."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lp_old = -torch.rand(B, T, generator=g)
    lp = (lp_old + 0.1 * torch.randn(B, T, generator=g)).requires_grad_()
    mask = torch.arange(T)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    adv = torch.randn(B, generator=g)
    loss, _ = gspo_policy_loss(lp, lp_old, adv, mask, clip_low=0.02, clip_high=0.02)
    (grad,) = torch.autograd.grad(loss, lp)
    s = torch.stack([torch.exp((lp[i, mask[i]] - lp_old[i, mask[i]]).mean()) for i in range(B)])
    ref = -torch.minimum(s * adv, s.clamp(0.98, 1.02) * adv).mean()
    (ref_grad,) = torch.autograd.grad(ref, lp)
    assert ((s < 0.98) | (s > 1.02)).any() and ((s > 0.98) & (s < 1.02)).any()  # both branches exercised
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and torch.allclose(grad, ref_grad, atol=1e-6)


# ----------------------------------------------------------------------------------------------- GRPO family knobs
def _paper_objective(method, lp, lp_old, scores, lengths, G, L_max):
    """The three papers' losses written out with explicit loops (python floats) and statistics.stdev-style std."""
    eps_low, eps_high = 0.2, 0.28 if method == "dapo" else 0.2
    total, n_tok = 0.0, sum(lengths)
    for i, n in enumerate(lengths):
        grp = scores[(i // G) * G : (i // G + 1) * G].tolist()
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        a = scores[i].item() - mean
        if method != "dr_grpo":
            a /= std + 1e-6
        seq = 0.0
        for t in range(n):
            rho = math.exp(lp[i, t].item() - lp_old[i, t].item())
            seq += min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
        total += {"grpo": seq / n / len(lengths), "dr_grpo": seq / (len(lengths) * L_max), "dapo": seq / n_tok}[method]
    return -total


KNOBS = {
    "grpo": {"norm_by_std": True, "agg": "seq_mean_token_mean", "clip_high": 0.2},
    "dr_grpo": {"norm_by_std": False, "agg": "seq_mean_token_sum_norm", "clip_high": 0.2, "norm_len": 8},
    "dapo": {"norm_by_std": True, "agg": "token_mean", "clip_high": 0.28},
}


@pytest.mark.parametrize("method", sorted(KNOBS))
def test_grpo_drgrpo_dapo_differ_only_in_knobs(method):
    """One code path (grpo_advantages + ppo_policy_loss) reproduces each paper's objective by its knobs:
    GRPO = std-normalised Â, 1/|o_i| per sequence then mean over sequences; Dr. GRPO = no std, Σ tokens/(N·L_max);
    DAPO = std-normalised Â, Σ tokens / Σ|o_i| with ε_high = 0.28. 2 prompts × G = 4, L_max = 8."""
    g = torch.Generator().manual_seed(4)
    G, B, T = 4, 8, 8
    lengths = [8, 3, 5, 1, 2, 7, 4, 6]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    lp_old = -torch.rand(B, T, generator=g)
    lp = lp_old + 0.3 * torch.randn(B, T, generator=g)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    k = dict(KNOBS[method])
    adv = grpo_advantages(scores, group_size=G, norm_by_std=k.pop("norm_by_std"))
    loss, _ = ppo_policy_loss(lp, lp_old, adv, mask, clip_low=0.2, **k)
    assert loss.item() == pytest.approx(_paper_objective(method, lp, lp_old, scores, lengths, G, T), rel=1e-5)
    others = [_paper_objective(o, lp, lp_old, scores, lengths, G, T) for o in KNOBS if o != method]
    assert all(abs(loss.item() - o) > 1e-4 for o in others)


def test_dr_grpo_equal_per_token_weights_across_lengths():
    """Two responses with Â = 1, lengths 10 and 100, ρ = 1. Per-token gradient −Â·w_i:
    Dr. GRPO (Σ/(2·100)): w = 1/200 for both. GRPO (seq_mean_token_mean): w = 1/(2·10) vs 1/(2·100), 10× apart."""
    mask = torch.arange(100)[None] < torch.tensor([10, 100])[:, None]
    for agg, kw, expected_ratio in [
        ("seq_mean_token_sum_norm", {"norm_len": 100}, 1.0),
        ("seq_mean_token_mean", {}, 10.0),
    ]:
        lp = torch.zeros(2, 100, requires_grad=True)
        ppo_policy_loss(lp, torch.zeros(2, 100), torch.ones(2), mask, agg=agg, **kw)[0].backward()
        assert lp.grad[0, 0].item() / lp.grad[1, 0].item() == pytest.approx(expected_ratio)
        if agg == "seq_mean_token_sum_norm":
            assert lp.grad[0, 0].item() == pytest.approx(-1 / 200)


# ----------------------------------------------------------------------------------------------- padding robustness
def _losses(lp, lp_old, adv, mask, agg):
    kw = {"agg": agg, "norm_len": 6} if agg.endswith("norm") else {"agg": agg}
    return {
        "ppo": ppo_policy_loss(lp, lp_old, adv, mask, dual_clip=3.0, **kw)[0],
        "gspo": gspo_policy_loss(lp, lp_old, adv, mask, clip_low=0.05, clip_high=0.05, **kw)[0],
        "pg": vanilla_pg_loss(lp, adv, mask, **kw)[0],
        "value": value_loss(lp, lp_old, adv, mask, clip=0.05, **kw)[0],
        "entropy": entropy_bonus(-lp, mask, **kw)[0],
        "kl": kl_loss(lp, lp_old, mask, estimator="k3", **kw)[0],
    }


def _batch(seed=0, B=5, T=6):
    g = torch.Generator().manual_seed(seed)
    lp_old = -torch.rand(B, T, generator=g)
    lp = lp_old + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    lengths = torch.tensor([6, 2, 4, 1, 5])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    return lp, lp_old, adv, mask, lengths


@pytest.mark.parametrize("agg", sorted(AGG_MODES))
def test_left_vs_right_padding_identical(agg):
    """Moving each row's tokens to the right end (left padding, garbage 1e4 in the pad slots) changes no loss value
    and moves the gradients with the tokens."""
    lp, lp_old, adv, mask, lengths = _batch()
    T = mask.shape[1]

    def left(x, fill):
        out = torch.full_like(x, fill) if x.is_floating_point() else torch.zeros_like(x)
        for i, n in enumerate(lengths.tolist()):
            out[i, T - n :] = x[i, :n]
        return out

    lp_r, lp_l = lp.clone().requires_grad_(), left(lp, 1e4).requires_grad_()
    right = _losses(lp_r, lp_old, adv, mask, agg)
    lefts = _losses(lp_l, left(lp_old, -1e4), left(adv, 1e4), left(mask, 0), agg)
    for name in right:
        (g_r,) = torch.autograd.grad(right[name], lp_r)
        (g_l,) = torch.autograd.grad(lefts[name], lp_l)
        assert lefts[name].item() == pytest.approx(right[name].item(), rel=1e-5, abs=1e-7), name
        assert torch.allclose(left(g_r, 0.0), g_l, atol=1e-6), name


@pytest.mark.parametrize("agg", sorted(AGG_MODES))
def test_all_masked_row_is_finite_and_inert(agg):
    """Appending a row with no valid token whose entries are NaN/inf leaves every loss equal to the loss without
    it, and all gradients finite (zero in that row)."""
    lp, lp_old, adv, mask, _ = _batch()
    T = mask.shape[1]
    lp2 = torch.cat([lp, torch.full((1, T), float("nan"))]).requires_grad_()
    old2 = torch.cat([lp_old, torch.full((1, T), -float("inf"))])
    adv2 = torch.cat([adv, torch.full((1, T), float("inf"))])
    mask2 = torch.cat([mask, torch.zeros(1, T, dtype=torch.bool)])
    base = _losses(lp, lp_old, adv, mask, agg)
    padded = _losses(lp2, old2, adv2, mask2, agg)
    for name in base:
        (g,) = torch.autograd.grad(padded[name], lp2)
        assert torch.isfinite(padded[name]) and torch.isfinite(g).all(), name
        assert padded[name].item() == pytest.approx(base[name].item(), rel=1e-6, abs=1e-7), name
        assert torch.all(g[-1] == 0), name


def test_policy_losses_table_and_shape_errors():
    assert set(POLICY_LOSSES) == {"ppo", "gspo", "vanilla_pg"}
    with pytest.raises(ValueError, match="logp_old has shape"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------- Safe RLHF
def test_safe_combined_advantage():
    """Â = (Â_R − λ·Â_C)/(1 + λ). λ = 0: Â_R (plain PPO). λ = 1, Â_R = 2, Â_C = 4: (2 − 4)/2 = −1.
    λ = 3, Â_R = 1, Â_C = −1: (1 + 3)/4 = 1."""
    ar, ac = torch.tensor([2.0, 1.0]), torch.tensor([4.0, -1.0])
    assert torch.equal(safe_combined_advantages(ar, ac, 0.0), ar)
    assert safe_combined_advantages(ar, ac, 1.0)[0].item() == pytest.approx(-1.0)
    assert safe_combined_advantages(ar, ac, torch.tensor(3.0))[1].item() == pytest.approx(1.0)


def test_lagrange_multiplier_updates():
    """λ₀ = 1 (log λ = 0), lr = 0.1, d = 0. Costs [1, 3]: C̄ = 2 > d, log λ ← 0 + 0.1·2·1 = 0.2, λ = e^0.2 = 1.2214
    (increases). Then costs [−10, −10] with window 4: C̄ = (1 + 3 − 20)/4 = −4, log λ ← 0.2 + 0.1·(−4)·1.2214 =
    −0.28855 (decreases). A huge cost saturates at λ_max = 5."""
    lag = LagrangeMultiplier(init=1.0, lr=0.1, max_value=5.0, threshold=0.0, window=4)
    assert lag.update(torch.tensor([1.0, 3.0])) == pytest.approx(math.exp(0.2))
    assert lag.update([-10.0, -10.0]) == pytest.approx(math.exp(0.2 - 0.4 * math.exp(0.2)))
    restored = LagrangeMultiplier(init=1.0, lr=0.1, max_value=5.0, threshold=0.0, window=4)
    restored.load_state_dict(lag.state_dict())
    assert restored.update([7.0]) == lag.update([7.0])
    assert lag.update([1e6]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="non-finite"):
        lag.update([float("nan")])
    with pytest.raises(ValueError, match="> 0"):
        LagrangeMultiplier(init=0.0)


def test_safe_shaped_rewards_sign_and_clip():
    """β = 0.1, k1 = [2, 1] (one row, two tokens), R = 3, C = 100:
    r = [−0.2, −0.1 + 3] = [−0.2, 2.9]; c = [0.2, 0.1 + 100] clipped to 50 -> [0.2, 50]."""
    r, c = safe_shaped_rewards(
        torch.tensor([3.0]),
        torch.tensor([100.0]),
        torch.tensor([[2.0, 1.0]]),
        torch.zeros(1, 2),
        torch.ones(1, 2),
        beta=0.1,
    )
    assert torch.allclose(r, torch.tensor([[-0.2, 2.9]])) and torch.allclose(c, torch.tensor([[0.2, 50.0]]))
