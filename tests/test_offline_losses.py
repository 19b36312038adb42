"""Offline-RL pieces (alignflow.algorithms.offline): A-LoL, SuperHF's loss, MPO's split, against hand-derived values."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignflow.algorithms.offline import (
    ALOL_VARIANTS,
    OFFLINE_LOSSES,
    alol_advantages,
    alol_keep_mask,
    alol_loss,
    alol_sampling_weights,
    mpo_split,
    superhf_loss,
    superhf_select,
)

D = torch.float64


def rows():
    """Three rows of two tokens. Row 0: lp (-1, -2), A = 2; row 1: lp (-0.5, pad), A = 1; row 2: A = -1 (dropped)."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, float("nan")], [-3.0, -1.0]], dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    return logp, mask, torch.tensor([2.0, 1.0, -1.0], dtype=D)


def test_advantages_filter_and_good_priority_weights():
    """A = R - V = (3 - 1, 0 - 1, 2 - 1, 1 - 1) = (2, -1, 1, 0); kept where A > 0; sampling ∝ A⁺ = (2/3, 0, 1/3, 0)."""
    a = alol_advantages(torch.tensor([3.0, 0.0, 2.0, 1.0]), torch.ones(4))
    assert torch.equal(a, torch.tensor([2.0, -1.0, 1.0, 0.0]))
    assert torch.equal(alol_keep_mask(a), torch.tensor([True, False, True, False]))
    assert torch.allclose(alol_sampling_weights(a), torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    with pytest.raises(ValueError, match="no row has a positive advantage"):
        alol_sampling_weights(torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match="differ"):
        alol_advantages(torch.ones(3), torch.ones(2))


@pytest.mark.parametrize("variant", ALOL_VARIANTS)
def test_alol_at_reference_is_advantage_weighted_nll(variant):
    """π_θ = π_ref: w = 1 (and the KL term is 0) for every variant. Kept rows: row 0 A·NLL = 2·(1 + 2) = 6,
    row 1: 1·0.5 = 0.5; row 2 (A = -1) is discarded. Mean over kept rows: (6 + 0.5)/2 = 3.25.
    Gradient: dL/dlp[t] = -A/2 on kept tokens (KL variant: (-A + 0.2)/2, from the β·LP_θ term), 0 elsewhere
    (padding that holds NaN included)."""
    logp, mask, adv = rows()
    ref = logp.detach().clone()
    loss, m = alol_loss(logp, ref, mask, adv, variant=variant)
    assert loss.item() == pytest.approx(3.25)
    loss.backward()
    shift = 0.1 if variant == "kl" else 0.0
    want = torch.tensor([[-1.0 + shift, -1.0 + shift], [-0.5 + shift, 0.0], [0.0, 0.0]], dtype=D)
    assert torch.allclose(logp.grad, want)
    assert m["alol/kept_fraction"].item() == pytest.approx(2 / 3)
    assert m["alol/importance_weight"].item() == pytest.approx(1.0)
    assert m["alol/advantage"].item() == pytest.approx(1.5)
    assert m["alol/nll"].item() == pytest.approx((3.0 + 0.5) / 2)


def test_alol_sequence_weight_is_clipped_and_detached():
    """c = 0.9. Row 0: LP_θ - LP_ref = log 3 → ratio 3 clipped to 1.9; row 1: log 0.5 → 0.5 (inside [0.1, 1.9]).
    Loss = (2·1.9·3 + 1·0.5·0.5)/2 = (11.4 + 0.25)/2 = 5.825; clipfrac over kept rows = 1/2.
    w is detached, so dL/dlp = -A·w/2: row 0 → -1.9, row 1 → -0.25."""
    logp, mask, adv = rows()
    ref = logp.detach().clone()
    ref[0, 0] -= math.log(3)
    ref[1, 0] -= math.log(0.5)
    loss, m = alol_loss(logp, ref, mask, adv, variant="alol")
    assert loss.item() == pytest.approx(5.825)
    assert m["alol/clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    assert torch.allclose(logp.grad[:2], torch.tensor([[-1.9, -1.9], [-0.25, 0.0]], dtype=D))


def test_alol_seq_variant_clips_each_token():
    """Row 0 token ratios (e, 0.5) → clipped (1.9, 0.5): A·Σ_t w_t·(-lp_t) = 2·(1.9·1 + 0.5·2) = 5.8;
    row 1: ratio 1 → 1·0.5 = 0.5. Mean over kept rows (5.8 + 0.5)/2 = 3.15."""
    logp, mask, adv = rows()
    ref = logp.detach().clone()
    ref[0, 0] -= 1.0
    ref[0, 1] -= math.log(0.5)
    assert alol_loss(logp, ref, mask, adv, variant="seq")[0].item() == pytest.approx(3.15)


def test_alol_kl_variant_and_ref_free():
    """KL variant: A·NLL + 0.2·(LP_θ - LP_ref). Row 0 with LP_θ - LP_ref = 1: 6 + 0.2 = 6.2, row 1: 0.5 → mean 3.35.
    ref_free needs no reference and ignores the ratio: 3.25."""
    logp, mask, adv = rows()
    ref = logp.detach().clone()
    ref[0, 1] -= 1.0
    assert alol_loss(logp, ref, mask, adv, variant="kl")[0].item() == pytest.approx(3.35)
    assert alol_loss(logp, None, mask, adv, variant="ref_free")[0].item() == pytest.approx(3.25)


def test_alol_reductions_and_no_filter():
    """'none' is 0 on dropped rows and sums to mean·n_kept; without filtering row 2 (-1·4 = -4) counts:
    (6 + 0.5 - 4)/3 = 0.8333."""
    logp, mask, adv = rows()
    per = alol_loss(logp, None, mask, adv, variant="ref_free", reduction="none")[0]
    assert torch.allclose(per, torch.tensor([6.0, 0.5, 0.0], dtype=D))
    mean = alol_loss(logp, None, mask, adv, variant="ref_free")[0]
    assert per.sum().item() == pytest.approx(mean.item() * 2)
    nofilter = alol_loss(logp, None, mask, adv, variant="ref_free", filter_negative=False)[0]
    assert nofilter.item() == pytest.approx(2.5 / 3)
    none_kept = alol_loss(logp, None, mask, -adv.abs(), variant="ref_free")[0]
    assert none_kept.item() == 0.0


def test_alol_bad_inputs():
    logp, mask, adv = rows()
    with pytest.raises(ValueError, match="variant='ppo' is not one of alol, seq, ref_free, kl"):
        alol_loss(logp, None, mask, adv, variant="ppo")
    with pytest.raises(ValueError, match="needs ref_logp"):
        alol_loss(logp, None, mask, adv)
    with pytest.raises(ValueError, match="advantages has shape"):
        alol_loss(logp, None, mask, adv[:2], variant="ref_free")


def test_superhf_hand_value():
    """V = 2, one token, label 1. π_0 = (0.5, 0.5), π_θ = (0.25, 0.75).
    CE = -log 0.75 = 0.287682; KL(π_0‖π_θ) = 0.5·log(0.5/0.25) + 0.5·log(0.5/0.75) = 0.5·log(4/3) = 0.143841.
    β = 0.35: L = 0.287682 + 0.35·0.143841 = 0.338027."""
    pol = torch.log(torch.tensor([[[0.25, 0.75]]], dtype=D)).requires_grad_(True)
    ref = torch.zeros(1, 1, 2, dtype=D, requires_grad=True)
    loss, m = superhf_loss(pol, ref, torch.tensor([[1]]), torch.tensor([[1]]), beta=0.35)
    want = -math.log(0.75) + 0.35 * 0.5 * math.log(4 / 3)
    assert loss.item() == pytest.approx(want) and loss.item() == pytest.approx(0.338027, abs=1e-6)
    assert m["superhf/kl"].item() == pytest.approx(0.5 * math.log(4 / 3))
    loss.backward()
    assert ref.grad is None


def test_superhf_beta_zero_is_sft_and_aggregation_modes():
    """β = 0 is cross-entropy on the kept samples (token mean, masked labels ignored); with π_θ = π_0 the KL is 0.
    seq_mean_token_mean averages per-row means; token_mean with global_tokens over two micro-batches sums to the
    whole-batch value."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 7, generator=g, dtype=D)
    labels = torch.randint(0, 7, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ce = F.cross_entropy(logits.reshape(-1, 7), labels.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)
    loss, m = superhf_loss(logits, logits.clone(), labels, mask, beta=0.0)
    assert loss.item() == pytest.approx(ce.item()) and m["superhf/kl"].item() == pytest.approx(0.0, abs=1e-12)
    tok = -F.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]  # (3, 4)
    seq = torch.stack([tok[b][mask[b]].mean() for b in range(3)]).mean()
    assert superhf_loss(logits, logits, labels, mask, beta=0.0, agg="seq_mean_token_mean")[0].item() == pytest.approx(
        seq.item()
    )
    ref = torch.randn(3, 4, 7, generator=g, dtype=D)
    whole = superhf_loss(logits, ref, labels, mask)[0]
    parts = sum(
        superhf_loss(logits[i], ref[i], labels[i], mask[i], global_tokens=7)[0] for i in (slice(0, 1), slice(1, 3))
    )
    assert parts.item() == pytest.approx(whole.item())
    with pytest.raises(ValueError, match="shapes disagree"):
        superhf_loss(logits, ref[:, :3], labels, mask)


def test_superhf_select_top_k():
    """Top-1 per prompt of [[1, 3, 2], [0, -1, 5]] is completions 1 and 2; top-2 adds 2 and 0."""
    r = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert superhf_select(r).tolist() == [[1], [2]]
    assert superhf_select(r, k=2).tolist() == [[1, 2], [2, 0]]
    with pytest.raises(ValueError, match="1 <= k <= n"):
        superhf_select(r, k=4)


def test_mpo_split():
    """Gaps |r_w - r_l| = (2, 0.5, 1, 3): δ = 1 → easy (2, 3) only (strict >); δ = -inf → all easy, hard empty."""
    rw, rl = torch.tensor([2.0, 0.0, 1.0, -1.0]), torch.tensor([0.0, 0.5, 0.0, 2.0])
    easy, hard = mpo_split(rw, rl, 1.0)
    assert easy.tolist() == [True, False, False, True] and hard.tolist() == [False, True, True, False]
    easy, hard = mpo_split(rw, rl, -math.inf)
    assert easy.all() and not hard.any()


def test_offline_table():
    assert OFFLINE_LOSSES == {"alol": alol_loss, "superhf": superhf_loss}
