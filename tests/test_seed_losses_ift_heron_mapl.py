"""IFT, HERON and MAPL pure functions against values derived by hand (derivations in the docstrings)."""

import math

import pytest
import torch

from alignflow.algorithms.heron import heron_level_counts, heron_preference
from alignflow.algorithms.ift import ift_loss, ift_mix_embeddings, ift_propagation_weights, ift_shift_predictions
from alignflow.algorithms.mapl import mapl_loss, margins_from_logps


# ----------------------------------------------------------------------------------------------- IFT
def test_ift_weights_and_loss_by_hand():
    """lp = [-1, -2, -3] on 3 answer tokens, γ = 0.5, n = 3: c = [1/3, 2/3, 1];
    w_3 = 1, w_2 = 2/3 + 0.5·1 = 7/6, w_1 = 1/3 + 0.5·7/6 = 11/12; Σ = 37/12; rescaled by 3/(37/12) = 36/37:
    w = [33/37, 42/37, 36/37]. L = (1·33 + 2·42 + 3·36)/(37·3) = 225/111 = 75/37 (SFT: (1+2+3)/3 = 2)."""
    lp = torch.tensor([[-1.0, -2.0, -3.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = ift_propagation_weights(lp, mask, gamma=0.5)
    assert torch.allclose(w, torch.tensor([[33 / 37, 42 / 37, 36 / 37, 0.0]]))
    loss, m = ift_loss(lp, mask, gamma=0.5)
    assert loss.item() == pytest.approx(75 / 37) and m["ift/nll"].item() == pytest.approx(2.0)
    assert m["ift/weight_max"].item() == pytest.approx(42 / 37)


def test_ift_gamma_zero_is_sft_and_gamma_one_sums_the_rest():
    """γ = 0: every weight 1, L = mean NLL = 2. γ = 1 on lp = [-1, -2, -3]: w ∝ [6, 5, 3]/3 = [2, 5/3, 1],
    Σ = 14/3, rescaled by 9/14: [9/7, 15/14, 9/14]; L = (9/7 + 2·15/14 + 3·9/14)/3 = (18 + 30 + 27)/42 = 75/42."""
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    mask = torch.ones(1, 3)
    assert ift_loss(lp, mask, gamma=0.0)[0].item() == pytest.approx(2.0)
    assert ift_loss(lp, mask, gamma=1.0)[0].item() == pytest.approx(75 / 42)
    rows = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    per_row = ift_loss(rows, torch.ones(2, 3), gamma=1.0, reduction="none")[0]
    assert per_row[1].item() == pytest.approx(1.0)  # equal NLLs: the weights w ∝ [3, 2, 1] still average 1
    with pytest.raises(ValueError, match="gamma must be in"):
        ift_propagation_weights(lp, mask, gamma=1.5)


def test_ift_temporal_residual_mixes_only_answer_positions():
    """Guesses [g0, g1, g2] of tokens 1..3 shift to positions 1..3; with λ = 0.25 an answer position holds
    0.75·E[y_t] + 0.25·E[ŷ_t]; the prompt position keeps its own embedding."""
    ids = torch.tensor([[5, 6, 7, 8]])
    guess = torch.tensor([[16, 17, 18, 19]])  # argmax at position t guesses token t+1
    answer = torch.tensor([[0, 0, 1, 1]])
    assert ift_shift_predictions(ids, guess, answer).tolist() == [[5, 6, 17, 18]]
    target = torch.zeros(1, 4, 2)
    guess_e = torch.ones(1, 4, 2) * 4.0
    mixed = ift_mix_embeddings(target, guess_e, answer, 0.25)
    assert mixed[0, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lambda must be in"):
        ift_mix_embeddings(target, guess_e, answer, 1.5)


def test_ift_step_on_a_model_is_sft_at_lambda_zero(reviews_task):
    """λ = 0: the log-probs are the teacher-forced ones; λ = 1 with a model whose guesses differ from the targets
    changes them (the inputs are the guesses' embeddings)."""
    from alignflow.config import ModelConfig
    from alignflow.models import load_causal_lm
    from alignflow.trainers.ift_step import ift_token_logps

    model = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)), torch.device("cpu"))
    ids = torch.tensor([[1, 20, 21, 22, 23, 24]])
    att = torch.ones_like(ids)
    answer = torch.tensor([[0, 0, 1, 1, 1, 1]])
    lp0 = ift_token_logps(model, ids, att, answer, 0.0)
    ref = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(lp0[:, 1:], ref * answer[:, 1:], atol=1e-5) and lp0[0, :2].tolist() == [0.0, 0.0]
    lp1 = ift_token_logps(model, ids, att, answer, 1.0)
    assert not torch.allclose(lp1, lp0) and lp1.requires_grad


# ----------------------------------------------------------------------------------------------- HERON
def test_heron_compares_down_the_ranking():
    """Margins δ = [0.5, 0.1]. Row 0: |1.0 - 0.2| = 0.8 > 0.5 -> level 0 decides, a wins (+1).
    Row 1: |0.3 - 0.0| = 0.3 <= 0.5, next |0.0 - 0.9| = 0.9 > 0.1 -> level 1, b wins (-1) although a leads on
    the top signal. Row 2: 0.1 <= 0.5 and 0.05 <= 0.1 -> tie (0), level 2."""
    a = torch.tensor([[1.0, 0.0], [0.3, 0.0], [0.1, 0.05]])
    b = torch.tensor([[0.2, 5.0], [0.0, 0.9], [0.0, 0.0]])
    label, level = heron_preference(a, b, torch.tensor([0.5, 0.1]))
    assert label.tolist() == [1, -1, 0] and level.tolist() == [0, 1, 2]
    assert heron_level_counts(level, 2) == [1, 1, 1]
    with pytest.raises(ValueError, match="margins must be"):
        heron_preference(a, b, torch.tensor([0.5]))


# ----------------------------------------------------------------------------------------------- MAPL
def test_mapl_terms_by_hand():
    """β = 1. h_resp = [0] -> ℓ(0) = log 2. h_intra = [ln 3] -> ℓ(ln 3) = -log(3/4) = log(4/3).
    h_inter = [-ln 3] -> -log(1/4) = log 4. w_intra = 0.5, w_inter = 2:
    L = log 2 + 0.5·log(4/3) + 2·log 4."""
    h_intra = margins_from_logps(
        torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-4.0 + math.log(3)])
    )
    assert h_intra.item() == pytest.approx(math.log(3))  # (−1 + 2) − (−3 + 4 − ln 3)
    loss, m = mapl_loss(torch.tensor([0.0]), h_intra, torch.tensor([-math.log(3)]), beta=1.0, w_intra=0.5, w_inter=2.0)
    assert loss.item() == pytest.approx(math.log(2) + 0.5 * math.log(4 / 3) + 2 * math.log(4))
    assert m["mapl/intra_accuracy"].item() == 1.0 and m["mapl/inter_accuracy"].item() == 0.0
    only_resp, m2 = mapl_loss(torch.tensor([0.0]), torch.tensor([]), torch.tensor([]), beta=1.0)
    assert only_resp.item() == pytest.approx(math.log(2)) and "mapl/intra_loss" not in m2
    with pytest.raises(ValueError, match="every level is empty"):
        mapl_loss(torch.tensor([]), torch.tensor([]), torch.tensor([]))


def test_ift_step_does_not_depend_on_the_micro_batch_split(reviews_task):
    """The step loss is Σ_rows l_i / B however the rows are split: one micro-batch of 3 rows and two of 2 + 1 give
    the same loss and the same gradients."""
    from alignflow.config import IFTConfig, ModelConfig, from_dict
    from alignflow.models import load_causal_lm
    from alignflow.trainers.ift import ift_train_step

    examples = [
        {"input_ids": [1, 20, 21, 22, 23], "loss_mask": [0, 0, 1, 1, 1]},
        {"input_ids": [1, 24, 25, 26, 27, 28, 29], "loss_mask": [0, 0, 0, 1, 1, 1, 1]},
        {"input_ids": [1, 30, 31, 32], "loss_mask": [0, 0, 1, 1]},
    ]
    grads, losses = [], []
    for budget in (64, 16):  # 16 tokens: the rows of 4 and 5 tokens together, the row of 7 alone
        model = load_causal_lm(ModelConfig(name_or_path=str(reviews_task.model_dir)), torch.device("cpu"))
        cfg = from_dict(IFTConfig, {"train": {"micro_batch_tokens": budget}, "data": {"max_len": 16}})
        metrics, _ = ift_train_step(model, examples, cfg, 0, torch.device("cpu"))
        losses.append(metrics["loss"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_alignflow_ift_runs_and_saves_a_model(reviews_task, tmp_path, capsys):
    from alignflow.cli import main

    out = tmp_path / "ift"
    assert (
        main(
            [
                "ift",
                f"model.name_or_path={reviews_task.model_dir}",
                f"model.tokenizer={reviews_task.tokenizer_dir}",
                f"data.path={reviews_task.sft_path}",
                "data.max_len=64",
                f"train.output_dir={out}",
                "train.max_steps=3",
                "train.batch_size=8",
                "train.progress=false",
                "train.log_every=1",
            ]
        )
        == 0
    )
    assert "alignflow ift: done" in capsys.readouterr().out and (out / "model").is_dir()
    rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if "ift/nll" in r]
    assert len(rows) == 3
