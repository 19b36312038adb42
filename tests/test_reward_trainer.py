"""Reward-model trainer: learns gold preferences, ensembles (heads and models), multi-objective + gating."""

import json
import random

import pytest
import torch

from alignflow.config import RMConfig, from_dict
from alignflow.trainers.rm import rated_pairs, train_rm


def _cfg(task, out, data_path=None, **reward):
    return from_dict(
        RMConfig,
        {
            "model": {"name_or_path": str(task.model_dir), "tokenizer": str(task.tokenizer_dir)},
            "data": {"path": str(data_path or task.pairs_path), "max_len": 96, "eval_fraction": 0.15, "format": "auto"},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"output_dir": str(out), "batch_size": 32, "max_steps": 40, "progress": False, "log_every": 5},
            "reward": reward,
        },
    )


def test_bt_reward_model_learns_gold_preferences(reviews_task, tmp_path):
    """On the task's gold-labelled pairs (BT noise 1.0, ~78% agreement with gold) the held-out accuracy is
    clearly above chance after 40 steps, and the training loss falls below log 2."""
    result = train_rm(_cfg(reviews_task, tmp_path))
    assert result.eval["eval/accuracy"] > 0.6
    assert sum(result.losses[-5:]) / 5 < 0.69
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_ensemble_of_heads_reports_every_aggregation(reviews_task, tmp_path):
    """k = 3 seeded heads on one backbone: heads start different, and each aggregation is evaluated."""
    cfg = _cfg(reviews_task, tmp_path, ensemble_size=3, ensemble_mode="heads", aggregation="uwo")
    cfg.train.max_steps = 10
    result = train_rm(cfg)
    for key in (
        "eval/accuracy",
        "eval/accuracy_mean",
        "eval/accuracy_min",
        "eval/accuracy_uwo",
        "eval/accuracy_member0",
        "eval/accuracy_member2",
    ):
        assert key in result.eval
    w = result.models[0].score.weight
    assert w.shape[0] == 3 and not torch.allclose(w[0], w[1])


def test_ensemble_of_models_trains_k_members(reviews_task, tmp_path):
    cfg = _cfg(reviews_task, tmp_path, ensemble_size=2, ensemble_mode="models", aggregation="min")
    cfg.train.max_steps = 5
    result = train_rm(cfg)
    assert len(result.models) == 2
    assert (tmp_path / "member-0" / "model").is_dir() and (tmp_path / "member-1" / "model").is_dir()
    a, b = (m.score.weight for m in result.models)
    assert not torch.allclose(a, b)


def _rated_file(task, path, n=160):
    """Rated rows: 'positivity' = 1 for the gold-better completion, 0 for the other; 'length' = word count / 10."""
    pairs = [json.loads(l) for l in open(task.pairs_path)][:n]
    rng = random.Random(0)
    with open(path, "w") as f:
        for p in pairs:
            comps = [p["chosen"], p["rejected"]]
            rng.shuffle(comps)
            ratings = [{"positivity": float(c == p["chosen"]), "length": len(c.split()) / 10} for c in comps]
            f.write(json.dumps({"prompt": p["prompt"], "completions": comps, "ratings": ratings}) + "\n")
    return path


def test_multi_objective_regression_and_gating(reviews_task, tmp_path):
    """Stage 1 regresses two attributes (the MSE falls); stage 2 trains the ArmoRM gate, whose weights sum to
    its learned scale beta, and the gated score is evaluated on pairs derived from the ratings."""
    path = _rated_file(reviews_task, tmp_path / "rated.jsonl")
    cfg = _cfg(reviews_task, tmp_path / "run", data_path=path, loss="regression", gating=True)
    result = train_rm(cfg)
    assert result.losses[-1] < result.losses[0]
    assert result.models[0].score.weight.shape[0] == 2
    emb = torch.randn(4, result.models[0].config.hidden_size)
    w = result.gate(emb)
    assert torch.allclose(w.sum(-1), result.gate.beta.detach().expand(4), atol=1e-5)
    assert "eval/accuracy" in result.eval
    assert (tmp_path / "run" / "model" / "gating.safetensors").exists()


def test_rated_pairs_best_vs_worst():
    row = {
        "completions_ids": [[1, 5, 6], [1, 7], [1, 8, 9]],
        "completions_mask": [[0, 1, 1], [0, 1], [0, 1, 1]],
        "ratings": [[3.0, 1.0], [1.0, 1.0], [5.0, 5.0]],
    }
    (pair,) = rated_pairs([row])
    assert pair["chosen_ids"] == [1, 8, 9] and pair["rejected_ids"] == [1, 7]
    assert pair["margin"] == pytest.approx(4.0) and pair["prompt_ids"] == [1]


def test_regression_on_pairs_is_a_clear_error(reviews_task, tmp_path):
    with pytest.raises(ValueError, match="rated"):
        train_rm(_cfg(reviews_task, tmp_path, loss="regression"))
