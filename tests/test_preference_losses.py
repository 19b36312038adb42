"""Preference losses (alignflow.algorithms.preference) against hand-derived values and limiting cases.

Notation as in docs/preference.md: ℓ(z) = softplus(-z) = log(1 + e^{-z}), h = (LP_θ(y_w) - LP_ref(y_w)) -
(LP_θ(y_l) - LP_ref(y_l)). Expected numbers are written out from the formulas with ``math``.
"""

import dataclasses
import math

import pytest
import torch

from alignflow.algorithms.preference import (
    PrefInputs,
    apo_extrapolate,
    cdpo_loss,
    cpl_loss,
    dpo_loss,
    hinge_loss,
    inpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    pro_loss,
    refuel_loss,
    robust_dpo_loss,
    simpo_loss,
    treg_loss,
    treg_token_rewards,
)
from alignflow.algorithms.preference_table import PREFERENCE_LOSSES

D = torch.float64


def sp(z):
    """ℓ(-z) helper: softplus(z) = log(1 + e^z)."""
    return math.log1p(math.exp(z))


def T(*values, grad=False):
    return torch.tensor(values, dtype=D, requires_grad=grad)


def pair(pc, pr, rc=None, rr=None, lc=None, lr=None, **kw):
    """One-or-more-row pairwise inputs; policy log-probs require grad."""
    f = lambda v, g=False: None if v is None else T(*(v if isinstance(v, (list, tuple)) else [v]), grad=g)
    return PrefInputs(
        policy_chosen_logps=f(pc, True),
        policy_rejected_logps=f(pr, True),
        ref_chosen_logps=f(rc),
        ref_rejected_logps=f(rr),
        chosen_lengths=f(lc),
        rejected_lengths=f(lr),
        **kw,
    )


def full_inputs(B=4, seed=0, equal=False, n_tok=5):
    """Every PrefInputs field for B rows; ``equal``: all log-probs equal (π = π_ref = π_t), chosen scored higher."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.full(s, -2.0, dtype=D) if equal else -3.0 + torch.randn(*s, generator=g, dtype=D)
    tok_c, tok_r = rnd(B, n_tok) / 2, rnd(B, n_tok) / 2
    mask_c = torch.ones(B, n_tok, dtype=torch.bool)
    mask_r = torch.ones(B, n_tok, dtype=torch.bool)
    mask_r[:, -1] = False
    leaf = lambda t: t.clone().requires_grad_(True)
    return PrefInputs(
        policy_chosen_logps=leaf(tok_c.sum(1)),
        policy_rejected_logps=leaf((tok_r * mask_r).sum(1)),
        ref_chosen_logps=rnd(B),
        ref_rejected_logps=rnd(B),
        chosen_lengths=mask_c.sum(1).to(D),
        rejected_lengths=mask_r.sum(1).to(D),
        chosen_rewards=torch.ones(B, dtype=D),
        rejected_rewards=torch.zeros(B, dtype=D),
        prev_chosen_logps=rnd(B),
        prev_rejected_logps=rnd(B),
        policy_chosen_token_logps=leaf(tok_c),
        policy_rejected_token_logps=leaf(tok_r),
        chosen_token_rewards=(rnd(B, n_tok) + 3.0).clamp(-0.5, 0.5),
        rejected_token_rewards=-0.1 * torch.ones(B, n_tok, dtype=D),
        chosen_mask=mask_c,
        rejected_mask=mask_r,
        policy_logps=leaf(rnd(B)),
        ref_logps=rnd(B),
        desirable=torch.arange(B) % 2 == 0,
        policy_kl_logps=rnd(B),
        ref_kl_logps=rnd(B),
        user_conditioned=(torch.arange(B) % 2 == 0).to(D),  # P-DPO: rows alternate user / generic conditioning
    )


def select_rows(inputs, idx):
    """Rows ``idx`` of every batch-aligned field (the KTO mismatched-pair fields are kept whole)."""
    out = {}
    for name, value in vars(inputs).items():
        keep_whole = value is None or name in ("policy_kl_logps", "ref_kl_logps")
        out[name] = value if keep_whole else value[idx]
    return PrefInputs(**out)


# ----------------------------------------------------------------------------------------------- DPO family
def test_dpo_hand_value_and_metrics():
    """h = (-10 - -11) - (-12 - -12) = 1, β = 0.1: loss = ℓ(0.1) = log(1 + e^{-0.1}) = log(1.904837) = 0.644397.
    Chosen reward β·1 = 0.1, rejected 0, margin βh = 0.1, accuracy 1."""
    loss, m = dpo_loss(pair(-10.0, -12.0, -11.0, -12.0), beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)), abs=1e-12)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert m["pref/chosen_reward"].item() == pytest.approx(0.1)
    assert m["pref/rejected_reward"].item() == pytest.approx(0.0)
    assert m["pref/margin"].item() == pytest.approx(0.1)
    assert m["pref/accuracy"].item() == 1.0


def test_dpo_at_init_is_log2_with_gradient_weight_half():
    """π = π_ref: h = 0, loss = ℓ(0) = log 2; dL/dLP_θ(y_w) = -β·σ(-βh) / B = -0.1·0.5 / 2 = -0.025 per row."""
    inp = pair([-5.0, -7.0], [-6.0, -4.0], [-5.0, -7.0], [-6.0, -4.0])
    loss, _ = dpo_loss(inp, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.allclose(inp.policy_chosen_logps.grad, T(-0.025, -0.025))
    assert torch.allclose(inp.policy_rejected_logps.grad, T(0.025, 0.025))


def test_dpo_beta_to_zero_tends_to_log2_and_gradient_scale_beta_over_two():
    """Taylor: ℓ(z) = log 2 - z/2 + z²/8 + O(z⁴). With h = 3, β = 1e-5 (z = 3e-5) the loss is
    log 2 - 1.5e-5 + 1.125e-10, which tends to log 2; dL/dh = -β·σ(-βh) → -β/2 (the gradient scale vanishes with β)."""
    beta = 1e-5
    inp = pair(-1.0, -4.0, 0.0, 0.0)
    loss, _ = dpo_loss(inp, beta=beta)
    loss.backward()
    z = beta * 3
    assert loss.item() == pytest.approx(math.log(2) - z / 2 + z * z / 8, abs=1e-14)
    assert inp.policy_chosen_logps.grad.item() / beta == pytest.approx(-0.5, abs=1e-4)


def test_cdpo_hand_value_zero_smoothing_and_finite_optimum():
    """ε = 0.1, z = βh = 0.1: (1-ε)ℓ(z) + εℓ(-z) = ℓ(z) + ε·z (since ℓ(-z) = ℓ(z) + z) = 0.644397 + 0.01 = 0.654397.
    ε = 0 equals DPO. Optimum: d/dz = -(1-ε)σ(-z) + εσ(z) = 0 at σ(z*) = 1 - ε, i.e. h* = logit(0.9)/β."""
    inp = pair(-10.0, -12.0, -11.0, -12.0)
    assert cdpo_loss(inp, label_smoothing=0.1)[0].item() == pytest.approx(0.654397, abs=1e-6)
    assert dpo_loss(inp, label_smoothing=0.0)[0].item() == dpo_loss(inp)[0].item()
    h_star = math.log(0.9 / 0.1) / 0.1
    opt = pair(h_star, 0.0, 0.0, 0.0)
    dpo_loss(opt, beta=0.1, label_smoothing=0.1)[0].backward()
    assert abs(opt.policy_chosen_logps.grad.item()) < 1e-12
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(inp, label_smoothing=0.7)


def test_robust_dpo_hand_value_and_limits():
    """ε = 0.1, z = 0.1: [(1-ε)ℓ(z) - εℓ(-z)]/(1-2ε) = [(1-2ε)ℓ(z) - εz]/(1-2ε) = 0.644397 - 0.01/0.8 = 0.631897.
    ε = 0 is DPO; at init (z = 0) the loss is [(1-2ε) log 2]/(1-2ε) = log 2; ε = 0.5 is rejected."""
    inp = pair(-10.0, -12.0, -11.0, -12.0)
    assert robust_dpo_loss(inp, label_smoothing=0.1)[0].item() == pytest.approx(0.631897, abs=1e-6)
    assert robust_dpo_loss(inp, label_smoothing=0.0)[0].item() == pytest.approx(dpo_loss(inp)[0].item())
    init = pair(-3.0, -4.0, -3.0, -4.0)
    assert robust_dpo_loss(init, label_smoothing=0.3)[0].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match=r"label_smoothing=0.5 is outside \[0.0, 0.5\)"):
        robust_dpo_loss(inp, label_smoothing=0.5)


def test_ipo_values_init_and_fixed_point():
    """τ = 0.1, target 1/(2τ) = 5. Chosen log-ratio (-10 - -12) = 2 over 4 tokens = 0.5, rejected (-9 - -8) = -1 over
    2 tokens = -0.5: length-averaged h = 1, loss (1 - 5)² = 16; summed h = 3, loss (3 - 5)² = 4.
    At init h = 0: loss 25. Fixed point h = 5 (summed): dL/dh = 2(h - 5) = 0."""
    inp = pair(-10.0, -9.0, -12.0, -8.0, 4.0, 2.0)
    assert ipo_loss(inp, beta=0.1)[0].item() == pytest.approx(16.0)
    assert ipo_loss(inp, beta=0.1, length_normalize=False)[0].item() == pytest.approx(4.0)
    assert ipo_loss(pair(-3.0, -5.0, -3.0, -5.0, 2.0, 3.0), beta=0.1)[0].item() == pytest.approx(25.0)
    fixed = pair(-1.0, -6.0, 0.0, 0.0)
    loss, _ = ipo_loss(fixed, beta=0.1, length_normalize=False)
    loss.backward()
    assert loss.item() == pytest.approx(0.0) and fixed.policy_chosen_logps.grad.item() == pytest.approx(0.0)


def test_hinge_value_and_flat_region():
    """max(0, 1 - βh): h = 1, β = 0.1 gives 0.9; at init 1; h = 20 (βh = 2 > 1) gives 0 with zero gradient."""
    assert hinge_loss(pair(-10.0, -12.0, -11.0, -12.0))[0].item() == pytest.approx(0.9)
    assert hinge_loss(pair(-2.0, -2.0, -2.0, -2.0))[0].item() == pytest.approx(1.0)
    far = pair(0.0, -20.0, 0.0, 0.0)
    loss, _ = hinge_loss(far)
    loss.backward()
    assert loss.item() == 0.0 and far.policy_chosen_logps.grad.item() == 0.0


def test_simpo_hand_values_and_gamma_zero_is_reference_free_normalised_dpo():
    """β = 2, γ = 1. LP̄_w = -6/3 = -2, LP̄_l = -10/4 = -2.5: z = 2·(0.5) - 1 = 0, loss log 2.
    Equal LP̄ (= -2): z = -γ = -1, loss ℓ(-1) = log(1 + e) = 1.313262.
    γ = 0: SimPO(β) = DPO(β) with LP_ref ≡ 0 and log-probs replaced by LP/|y|."""
    assert simpo_loss(pair(-6.0, -10.0, lc=3.0, lr=4.0), beta=2.0, gamma=1.0)[0].item() == pytest.approx(math.log(2))
    eq = simpo_loss(pair(-6.0, -8.0, lc=3.0, lr=4.0), beta=2.0, gamma=1.0)[0].item()
    assert eq == pytest.approx(math.log(1 + math.e)) and eq == pytest.approx(1.313262, abs=1e-6)
    inp = full_inputs(seed=3)
    pc, pr = inp.policy_chosen_logps / inp.chosen_lengths, inp.policy_rejected_logps / inp.rejected_lengths
    zeros = torch.zeros_like(pc)
    ref_free = PrefInputs(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=zeros, ref_rejected_logps=zeros
    )
    a = simpo_loss(inp, beta=2.5, gamma=0.0, reduction="none")[0]
    b = dpo_loss(ref_free, beta=2.5, reduction="none")[0]
    assert torch.allclose(a, b)


def test_orpo_hand_value_equal_probabilities_and_certain_response():
    """P̄_w = 0.5, P̄_l = 0.25 (one token each): log odds_w = log(0.5/0.5) = 0, log odds_l = log(0.25/0.75) = -log 3.
    L = -log 0.5 + 0.1·ℓ(log 3) = 0.693147 + 0.1·log(1 + 1/3) = 0.693147 + 0.028768 = 0.721915.
    P̄_w = P̄_l (LP̄ = -1 on 2 and 3 tokens): L = NLL + λ·log 2 = 1 + 0.1·log 2. LP̄ = 0 (P̄ = 1) stays finite."""
    loss, m = orpo_loss(pair(math.log(0.5), math.log(0.25), lc=1.0, lr=1.0), lam=0.1)
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * math.log(4 / 3), abs=1e-7)
    assert loss.item() == pytest.approx(0.721915, abs=1e-6)
    assert m["pref/margin"].item() == pytest.approx(math.log(3), abs=1e-6)
    assert m["orpo/nll"].item() == pytest.approx(math.log(2))
    assert orpo_loss(pair(-2.0, -3.0, lc=2.0, lr=3.0))[0].item() == pytest.approx(1 + 0.1 * math.log(2))
    certain = pair(0.0, -1.0, lc=2.0, lr=2.0)
    loss, _ = orpo_loss(certain)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(certain.policy_chosen_logps.grad).all()


def test_inpo_hand_value_and_ipo_limit():
    """η = 0.5, τ = 0.4 (ητ = 0.2): policy diff -5 - -7 = 2, ref diff 0, π_t diff -5.5 - -6.5 = 1:
    h_t = 2 - 0.2·0 - 0.8·1 = 1.2, loss (1.2 - 0.25)² = 0.9025.
    ητ = 1 (η = 2, τ = 0.5): h_t = h and loss (h - 1)² = IPO with summed log-probs and τ_IPO = 1/η = 0.5."""
    inp = pair(-5.0, -7.0, -6.0, -6.0, prev_chosen_logps=T(-5.5), prev_rejected_logps=T(-6.5))
    assert inpo_loss(inp, eta=0.5, tau=0.4)[0].item() == pytest.approx(0.9025)
    full = full_inputs(seed=1)
    a = inpo_loss(full, eta=2.0, tau=0.5, reduction="none")[0]
    b = ipo_loss(full, beta=0.5, length_normalize=False, reduction="none")[0]
    assert torch.allclose(a, b)


def test_refuel_hand_value_and_equal_q_fixed_point():
    """h = (-1 - -3) - (-4 - -5) = 2 - 1 = 1; with η = 1 and Q̂ = (2, 0): loss (1 - 1·2)² = 1.
    Q̂(y) = Q̂(y') and h = 0: loss 0 with zero gradient (the log-ratio difference is driven to 0)."""
    inp = pair(-1.0, -4.0, -3.0, -5.0, chosen_rewards=T(2.0), rejected_rewards=T(0.0))
    assert refuel_loss(inp, eta=1.0)[0].item() == pytest.approx(1.0)
    fixed = pair(-1.0, -4.0, -1.0, -4.0, chosen_rewards=T(0.7), rejected_rewards=T(0.7))
    loss, _ = refuel_loss(fixed)
    loss.backward()
    assert loss.item() == 0.0 and fixed.policy_chosen_logps.grad.item() == 0.0


# ----------------------------------------------------------------------------------------------- T-REG
def test_treg_token_rewards_range_and_value():
    """r̂ = σ(lp⁺ - lp⁻) - 0.5: equal log-probs give 0, lp⁺ - lp⁻ = log 3 gives 3/4 - 1/2 = 0.25; masked -> 0."""
    pos, neg = T(-1.0, math.log(3) - 2.0, 50.0).view(1, 3), T(-1.0, -2.0, -50.0).view(1, 3)
    r = treg_token_rewards(pos, neg, torch.tensor([[True, True, False]]))
    assert torch.allclose(r, T(0.0, 0.25, 0.0).view(1, 3))
    big = treg_token_rewards(T(100.0).view(1, 1), T(-100.0).view(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert big.item() == pytest.approx(0.5)


def test_treg_hand_value_and_reductions_to_base():
    """h = 0 (π = π_ref), β = 0.1: w = σ(0) = 0.5. Chosen tokens lp = (-1, -2), r̂ = (0.5, -0.5):
    L_REG(y_w) = -0.1·(0.5·-1 + -0.5·-2) = -0.05; rejected lp = (-1), r̂ = 0.25: L_REG(y_l) = -0.1·(-0.25) = 0.025.
    α = 0.5: loss = log 2 + 0.5·0.5·(-0.05 + 0.025) = 0.693147 - 0.00625 = 0.686897. α = 0 or r̂ ≡ 0 give DPO."""
    inp = pair(
        -3.0,
        -1.0,
        -3.0,
        -1.0,
        policy_chosen_token_logps=T(-1.0, -2.0).view(1, 2),
        policy_rejected_token_logps=T(-1.0, 7.0).view(1, 2),
        chosen_token_rewards=T(0.5, -0.5).view(1, 2),
        rejected_token_rewards=T(0.25, 9.0).view(1, 2),
        chosen_mask=torch.tensor([[1, 1]]),
        rejected_mask=torch.tensor([[1, 0]]),
    )
    loss, m = treg_loss(inp, beta=0.1, alpha=0.5)
    assert loss.item() == pytest.approx(math.log(2) - 0.00625, abs=1e-12)
    assert loss.item() == pytest.approx(0.686897, abs=1e-6)
    full = full_inputs(seed=2)
    dpo = dpo_loss(full, reduction="none")[0]
    assert torch.allclose(treg_loss(full, alpha=0.0, reduction="none")[0], dpo)
    zero_r = dataclasses.replace(
        full, chosen_token_rewards=torch.zeros(4, 5, dtype=D), rejected_token_rewards=torch.zeros(4, 5, dtype=D)
    )
    assert torch.allclose(treg_loss(zero_r, alpha=0.5, reduction="none")[0], dpo)
    assert torch.allclose(
        treg_loss(full, beta=2.0, gamma=1.0, alpha=0.0, base="simpo", reduction="none")[0],
        simpo_loss(full, reduction="none")[0],
    )


# ----------------------------------------------------------------------------------------------- KTO
def kto_inputs(pol, ref, desirable, kl_pol, kl_ref):
    return PrefInputs(
        policy_logps=T(*pol, grad=True),
        ref_logps=T(*ref),
        desirable=torch.tensor(desirable),
        policy_kl_logps=T(*kl_pol, grad=True),
        ref_kl_logps=T(*kl_ref),
    )


def test_kto_hand_value_and_detached_reference_point():
    """r = (-8 - -10, -6 - -5) = (2, -1); mismatched pairs (-5 - -6.5, -5 - -5.5) = (1.5, 0.5): z_0 = max(0, 1) = 1.
    Desirable row: 1 - σ(0.1·(2 - 1)) = σ(-0.1) = 0.475021; undesirable: 1 - σ(0.1·(1 - -1)) = σ(-0.2) = 0.450166.
    Mean (λ_D = λ_U = 1) = 0.462594; with λ_U = 2 the second row doubles: (0.475021 + 0.900332)/2 = 0.687677.
    z_0 is detached: no gradient reaches the mismatched-pair log-probs."""
    inp = kto_inputs([-8.0, -6.0], [-10.0, -5.0], [True, False], [-5.0, -5.0], [-6.5, -5.5])
    loss, m = kto_loss(inp, beta=0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert loss.item() == pytest.approx((sig(-0.1) + sig(-0.2)) / 2)
    assert loss.item() == pytest.approx(0.462594, abs=1e-6)
    assert kto_loss(inp, lambda_u=2.0)[0].item() == pytest.approx((sig(-0.1) + 2 * sig(-0.2)) / 2)
    assert m["kto/z0"].item() == pytest.approx(1.0)
    assert m["pref/chosen_reward"].item() == pytest.approx(0.2)
    assert m["pref/rejected_reward"].item() == pytest.approx(-0.1)
    loss.backward()
    assert inp.policy_kl_logps.grad is None
    assert inp.policy_logps.grad[0] < 0 < inp.policy_logps.grad[1]


def test_kto_init_clipped_reference_point_override_and_symmetry():
    """At init (r = 0, z_0 = 0) every row is 0.5. A negative mismatched-pair mean clips to z_0 = 0.
    Equal weights are symmetric: a desirable row with r - z_0 = d and an undesirable one with r - z_0 = -d have the
    same loss σ(-βd). ``z0=`` overrides the in-batch estimate."""
    init = kto_inputs([-3.0, -4.0], [-3.0, -4.0], [True, False], [-2.0], [-2.0])
    assert torch.allclose(kto_loss(init, reduction="none")[0], T(0.5, 0.5))
    neg = kto_inputs([-3.0], [-3.0], [True], [-9.0], [-2.0])
    assert kto_loss(neg)[1]["kto/z0"].item() == 0.0
    sym = kto_inputs([-1.0, -7.0], [-4.0, -4.0], [True, False], [-1.0], [-1.0])
    per = kto_loss(sym, reduction="none")[0]
    assert per[0].item() == pytest.approx(per[1].item())
    override = kto_loss(sym, z0=3.0, reduction="none")[0]
    assert override[0].item() == pytest.approx(0.5)
    assert override[1].item() == pytest.approx(1 - 1 / (1 + math.exp(-0.6)))
    with pytest.raises(ValueError, match="desirable must be bool"):
        kto_loss(dataclasses.replace(sym, desirable=T(0.0, 2.0)))


# ----------------------------------------------------------------------------------------------- CPL / PRO
def test_cpl_hand_value_unbiased_limit_and_bc_term():
    """α = 0.1, λ = 0.5: A⁺ = 0.1·-10 = -1, A⁻ = 0.1·-30 = -3, z = -1 - 0.5·-3 = 0.5, loss ℓ(0.5) = 0.474077.
    λ = 1 with equal log-probs: ℓ(0) = log 2. BC ("pos"): + 0.5·(10/5) = 1.0; ("all"): + 0.5·(40/15)."""
    inp = pair(-10.0, -30.0, lc=5.0, lr=10.0)
    assert cpl_loss(inp)[0].item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert cpl_loss(inp)[0].item() == pytest.approx(0.474077, abs=1e-6)
    assert cpl_loss(pair(-4.0, -4.0), lam=1.0)[0].item() == pytest.approx(math.log(2))
    base = math.log1p(math.exp(-0.5))
    assert cpl_loss(inp, bc_weight=0.5, bc_data="pos")[0].item() == pytest.approx(base + 1.0)
    assert cpl_loss(inp, bc_weight=0.5, bc_data="all")[0].item() == pytest.approx(base + 0.5 * 40 / 15)


def test_cpl_bc_pretraining_loss_hand_value():
    """CPL-BC's pre-training loss is the BC term alone: summed log-probs -4 and -2 over lengths 2 and 3 give
    ("all") (4 + 2) / (2 + 3) = 1.2 and ("pos") 4 / 2 = 2.0; the same as cpl_loss(bc_weight=1) minus its CPL part."""
    from alignflow.algorithms.preference import cpl_bc_loss

    inp = pair(-4.0, -2.0, lc=2.0, lr=3.0)
    assert cpl_bc_loss(inp)[0].item() == pytest.approx(1.2)
    assert cpl_bc_loss(inp, bc_data="pos")[0].item() == pytest.approx(2.0)
    assert cpl_bc_loss(inp)[0].item() == pytest.approx(cpl_loss(inp, bc_weight=1.0)[0].item() - cpl_loss(inp)[0].item())


def test_cpl_ranked_equals_explicit_pair_loop():
    """A ranked list of 3 averages ℓ(A_k - λA_i) over the 3 ordered pairs (k < i); a padded row of 2 has one pair."""
    logps = T(-3.0, -5.0, -9.0, -2.0, -6.0, 0.0).view(2, 3)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = cpl_loss(PrefInputs(ranked_logps=logps, ranked_mask=mask), alpha=0.2, lam=0.7, reduction="none")[0]
    want = []
    for b in range(2):
        n = int(mask[b].sum())
        ls = [
            math.log1p(math.exp(-(0.2 * logps[b, k].item() - 0.7 * 0.2 * logps[b, i].item())))
            for k in range(n)
            for i in range(k + 1, n)
        ]
        want.append(sum(ls) / len(ls))
    assert torch.allclose(got, T(*want))


def pro_reference(s, r, nll1, w=0.05):
    """Explicit PRO for one row: Σ_k L_k + w(n-1)²·NLL_sum(y¹), written straight from the formula."""
    n, total = len(s), 0.0
    for k in range(n - 1):
        temps = {i: (r[k] - r[i]) if r is not None else 1.0 for i in range(k + 1, n)}
        top = max(temps.values())
        num = math.exp(s[k] * top)
        total += -math.log(num / (num + sum(math.exp(s[i] * temps[i]) for i in temps)))
    return total + w * (n - 1) ** 2 * nll1


def test_pro_hand_value_n3():
    """s = LP/|y| = (-2/2, -2/1, -6/2) = (-1, -2, -3), r = (3, 1, 0).
    k = 1: T = (2, 3), T_1^1 = 3; logits (s1·3, s2·2, s3·3) = (-3, -4, -9): L_1 = log(1 + e^{-1} + e^{-6}) = 0.315072.
    k = 2: T_2^3 = 1 = T_2^2; logits (-2, -3): L_2 = log(1 + e^{-1}) = 0.313262.
    SFT term: 0.05·(3-1)²·NLL_sum(y¹) = 0.05·4·2 = 0.4. Total 1.028334."""
    inp = PrefInputs(
        ranked_logps=T(-2.0, -2.0, -6.0, grad=True).view(1, 3),
        ranked_lengths=T(2.0, 1.0, 2.0).view(1, 3),
        ranked_rewards=T(3.0, 1.0, 0.0).view(1, 3),
    )
    loss, m = pro_loss(inp)
    want = math.log(1 + math.exp(-1) + math.exp(-6)) + math.log(1 + math.exp(-1)) + 0.4
    assert loss.item() == pytest.approx(want) and loss.item() == pytest.approx(1.028334, abs=1e-6)
    assert m["pro/rank_loss"].item() == pytest.approx(want - 0.4)


def test_pro_two_responses_equals_pairwise_form():
    """n = 2: L = ℓ((r¹ - r²)(s_1 - s_2)) + 0.05·(2-1)²·NLL_sum(y¹), both from pairwise fields and ranked fields."""
    inp = full_inputs(seed=5)
    inp.chosen_rewards = T(2.0, 0.5, 1.0, 3.0)
    inp.rejected_rewards = T(-1.0, 0.0, 0.9, 1.0)
    s1, s2 = inp.policy_chosen_logps / inp.chosen_lengths, inp.policy_rejected_logps / inp.rejected_lengths
    want = (
        torch.nn.functional.softplus(-(inp.chosen_rewards - inp.rejected_rewards) * (s1 - s2))
        + 0.05 * -inp.policy_chosen_logps
    )
    got = pro_loss(inp, reduction="none")[0]
    assert torch.allclose(got, want)
    ranked = PrefInputs(
        ranked_logps=torch.stack([inp.policy_chosen_logps, inp.policy_rejected_logps], 1),
        ranked_lengths=torch.stack([inp.chosen_lengths, inp.rejected_lengths], 1),
        ranked_rewards=torch.stack([inp.chosen_rewards, inp.rejected_rewards], 1),
    )
    assert torch.allclose(pro_loss(ranked, reduction="none")[0], want)


@pytest.mark.parametrize("scored", [True, False])
def test_pro_vectorised_equals_explicit_loop_with_ragged_lists(scored):
    """Rows with n = 4, 3 and 2 (padding holds garbage, even NaN) match the per-row formula; without scores T ≡ 1."""
    g = torch.Generator().manual_seed(0)
    logps = -1.0 - 5 * torch.rand(3, 4, generator=g, dtype=D)
    lengths = torch.randint(1, 6, (3, 4), generator=g).to(D)
    rewards = torch.sort(torch.randn(3, 4, generator=g, dtype=D), dim=1, descending=True).values
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    logps = logps.masked_fill(~mask, float("nan")).requires_grad_(True)
    inp = PrefInputs(
        ranked_logps=logps, ranked_lengths=lengths, ranked_rewards=rewards if scored else None, ranked_mask=mask
    )
    got = pro_loss(inp, reduction="none")[0]
    for b in range(3):
        n = int(mask[b].sum())
        s = [(logps[b, i] / lengths[b, i]).item() for i in range(n)]
        r = [rewards[b, i].item() for i in range(n)] if scored else None
        assert got[b].item() == pytest.approx(pro_reference(s, r, -logps[b, 0].item()), rel=1e-10)
    got.sum().backward()
    assert torch.isfinite(logps.grad).all() and (logps.grad[~mask] == 0).all()


# ----------------------------------------------------------------------------------------------- APO
def test_apo_extrapolation_value_and_alpha_zero():
    """(1 + α)·LP_new - α·LP_prev with α = 0.3, new -2, prev -3: -2.6 + 0.9 = -1.7. α = 0 returns new (iterative DPO);
    a per-prompt constant added to both checkpoints' log-probs leaves the DPO loss with that reference unchanged."""
    assert apo_extrapolate(T(-2.0), T(-3.0), alpha=0.3).item() == pytest.approx(-1.7)
    new, prev = T(-2.0, -5.0), T(-3.0, -4.0)
    assert torch.equal(apo_extrapolate(new, prev, alpha=0.0), new)
    inp = full_inputs(seed=4)
    ref_c = apo_extrapolate(inp.ref_chosen_logps, inp.prev_chosen_logps)
    ref_r = apo_extrapolate(inp.ref_rejected_logps, inp.prev_rejected_logps)
    const = T(1.0, -2.0, 3.0, 0.5)  # const(x): the same for both responses of a prompt
    ref_c2 = apo_extrapolate(inp.ref_chosen_logps + const, inp.prev_chosen_logps)
    ref_r2 = apo_extrapolate(inp.ref_rejected_logps + const, inp.prev_rejected_logps)
    a = dpo_loss(dataclasses.replace(inp, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r), reduction="none")[0]
    b = dpo_loss(dataclasses.replace(inp, ref_chosen_logps=ref_c2, ref_rejected_logps=ref_r2), reduction="none")[0]
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="same shape"):
        apo_extrapolate(T(1.0, 2.0), T(1.0))


# ----------------------------------------------------------------------------------------------- every loss
ALL = sorted(PREFERENCE_LOSSES)


@pytest.mark.parametrize("name", ALL)
def test_reductions_and_weights(name):
    """'none' sums to mean·B and equals 'sum'; unit weights change nothing; 0/1 weights equal dropping rows."""
    fn, B = PREFERENCE_LOSSES[name].fn, 4
    inp = full_inputs(B, seed=7)
    mean, metrics = fn(inp)
    per = fn(inp, reduction="none")[0]
    assert per.shape == (B,)
    assert per.sum().item() == pytest.approx(mean.item() * B)
    assert fn(inp, reduction="sum")[0].item() == pytest.approx(per.sum().item())
    assert fn(inp, weights=torch.ones(B, dtype=D))[0].item() == pytest.approx(mean.item())
    w = T(1.0, 0.0, 1.0, 1.0)
    sub = select_rows(inp, torch.tensor([0, 2, 3]))
    assert fn(inp, weights=w)[0].item() == pytest.approx(fn(sub)[0].item())
    for key, v in fn(inp, weights=w)[1].items():
        assert v.item() == pytest.approx(fn(sub)[1][key].item()), key
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("name", ALL)
def test_batch_equals_loop_over_rows(name):
    """The vectorised per-row losses equal calling the loss on each row alone."""
    fn = PREFERENCE_LOSSES[name].fn
    inp = full_inputs(4, seed=11)
    per = fn(inp, reduction="none")[0]
    for b in range(4):
        assert per[b].item() == pytest.approx(fn(select_rows(inp, torch.tensor([b])))[0].item())


@pytest.mark.parametrize("name", ALL)
def test_finite_with_all_equal_inputs_and_gradient_signs(name):
    """π = π_ref = π_t, every log-prob equal, chosen scored higher: loss and gradients are finite, raising the chosen
    log-prob lowers the loss and raising the rejected one raises it (KTO: desirable vs undesirable rows)."""
    fn = PREFERENCE_LOSSES[name].fn
    inp = full_inputs(4, equal=True)
    loss, metrics = fn(inp)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    if name == "kto":
        g, d = inp.policy_logps.grad, inp.desirable
        assert (g[d] < 0).all() and (g[~d] > 0).all()
    else:
        assert (inp.policy_chosen_logps.grad < 0).all() and (inp.policy_rejected_logps.grad > 0).all()


@pytest.mark.parametrize("name", ALL)
def test_loss_inputs_table_is_exact(name):
    """Each loss runs on exactly the fields its table row's ``inputs`` lists, and removing any one names it in the
    error; the row needs a reference exactly when those fields include reference log-probs."""
    full = full_inputs(3, seed=2)
    spec = PREFERENCE_LOSSES[name]
    only = PrefInputs(**{f: getattr(full, f) for f in spec.inputs})
    spec.fn(only)
    for f in spec.inputs:
        with pytest.raises(ValueError, match=f"PrefInputs.{f}"):
            spec.fn(dataclasses.replace(only, **{f: None}))
    assert spec.reference == ("ref_chosen_logps" in spec.inputs or "ref_logps" in spec.inputs)


def test_bad_inputs_raise_clear_errors():
    inp = full_inputs(3)
    with pytest.raises(ValueError, match="reduction='avg' is not one of mean, sum, none"):
        dpo_loss(inp, reduction="avg")
    with pytest.raises(ValueError, match="ref_chosen_logps has 2 rows but PrefInputs.policy_chosen_logps has 3"):
        dpo_loss(dataclasses.replace(inp, ref_chosen_logps=T(1.0, 2.0)))
    with pytest.raises(ValueError, match="chosen_lengths row 1 has a response of length 0"):
        simpo_loss(dataclasses.replace(inp, chosen_lengths=T(2.0, 0.0, 3.0)))
    with pytest.raises(ValueError, match="should be \\(B,\\)"):
        dpo_loss(dataclasses.replace(inp, policy_chosen_logps=torch.zeros(3, 2, dtype=D)))
    bad_mask = torch.tensor([[True, False, True]])
    with pytest.raises(ValueError, match="ranked_mask row 0"):
        pro_loss(PrefInputs(ranked_logps=torch.zeros(1, 3), ranked_lengths=torch.ones(1, 3), ranked_mask=bad_mask))
    with pytest.raises(ValueError, match="weights has shape"):
        dpo_loss(inp, weights=torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="base='ipo' is not one of dpo, simpo"):
        treg_loss(inp, base="ipo")


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "kto", "pro"])
def test_micro_batch_sums_over_n_give_the_whole_batch_gradient(name):
    """Splitting 4 rows into micro-batches of 1 and 3, each with reduction='sum' divided by N = 4, gives the same
    gradient as the whole-batch mean (the convention trainers use for gradient accumulation)."""
    fn = PREFERENCE_LOSSES[name].fn
    field = "policy_logps" if name == "kto" else "policy_chosen_logps"
    whole = full_inputs(4, seed=9)
    fn(whole)[0].backward()
    split, grads = full_inputs(4, seed=9), []
    for idx in (torch.tensor([0]), torch.tensor([1, 2, 3])):
        part = select_rows(split, idx)
        leaf = getattr(part, field).detach().requires_grad_(True)
        (fn(dataclasses.replace(part, **{field: leaf}), reduction="sum")[0] / 4).backward()
        grads.append(leaf.grad)
    assert torch.allclose(torch.cat(grads), getattr(whole, field).grad)


def test_ranked_fields_must_share_shape():
    with pytest.raises(ValueError, match=r"ranked_lengths has shape \(2, 2\) but ranked_logps has \(2, 3\)"):
        pro_loss(PrefInputs(ranked_logps=torch.zeros(2, 3), ranked_lengths=torch.ones(2, 2)))
