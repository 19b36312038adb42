"""In-context RL from filtered learning histories on the bandit task: the pieces by hand, and a model trained on the
histories improving within its context."""

import random

import pytest
import torch

from alignflow.config import ModelConfig, SFTConfig, TaskConfig, from_dict
from alignflow.models import load_causal_lm, load_tokenizer
from alignflow.tasks import bandit, build_task
from alignflow.trainers.sft import train_sft


def test_histories_by_hand():
    """UCB1 on arms that always (arm 0) or never win: every arm once, then arm 0 -> returns per episode of 3 pulls
    [1, 3]. The score of returns [1, 3, 5] (6 pulls) is (5 - 1) / 6 = 2/3 with no drops; of [5, 1, 3]:
    (3 - 5) / 6 - 4 / (6 * 2) = -2/3. Equal scores give equal sampling weights; weights rise with the score."""
    h = bandit.learning_history(random.Random(0), [1.0, 0.0, 0.0], "ucb", episodes=2, pulls=3)
    assert [a for a, _ in h] == [0, 1, 2, 0, 0, 0] and bandit.episode_returns(h, 3) == [1, 3]
    assert bandit.history_score([1, 3, 5]) == pytest.approx(2 / 3)
    assert bandit.history_score([5, 1, 3]) == pytest.approx(-2 / 3)
    assert bandit.filter_weights([0.3, 0.3]) == pytest.approx([0.5, 0.5])
    w = bandit.filter_weights([0.0, 0.5])  # softmax(U / 0.5): e^0 : e^1
    assert w[1] / w[0] == pytest.approx(torch.e)
    assert bandit.as_text([(0, 1), (2, 0)], pulls=1) == " alpha <eos> win ; gamma <eos> lose"
    assert bandit.history_return(" alpha <eos> win gamma <eos> lose beta <eos> win") == pytest.approx(2 / 3)
    assert bandit.in_context_gain(torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])) == 1.0


def test_learning_agents_improve_and_the_filter_keeps_improvers():
    """150 runs per agent on fresh tasks (3 episodes of 6 pulls): each agent's last episode beats its first
    (measured on 2000 runs: epsilon-greedy 0.49 -> 0.68, Thompson 0.50 -> 0.70, gradient 0.42 -> 0.54, UCB1 0.51 ->
    0.59 win rate); the filtered draw improves more than the runs it is drawn from (0.38 -> 0.73)."""
    rng = random.Random(0)
    for agent in bandit.AGENTS:
        runs = [bandit.episode_returns(bandit.learning_history(rng, bandit.new_bandit(rng), agent)) for _ in range(150)]
        assert sum(r[-1] - r[0] for r in runs) > 0, agent
    kept = [bandit.episode_returns(h) for h in bandit.filtered_histories(random.Random(1), 300, 600)]
    assert sum(r[-1] - r[0] for r in kept) / 300 > 1.5  # more than 1.5 wins of 6 gained


def test_a_model_trained_on_filtered_histories_improves_in_context(tmp_path):
    """The bandit task's model (2 layers, 64 wide), 600 SFT steps (32 rows, lr 3e-3, loss on the arms) on 1000
    learning histories drawn from 2000 runs of epsilon-greedy, Thompson, policy-gradient and UCB1 learners (3
    episodes of 6 pulls of one task per context); then 64 fresh 3-armed tasks (one arm wins with 0.8, the others
    0.2), 18 pulls each. Measured here: win rate by thirds of the pulls 0.445, 0.560, 0.542 (gain +0.10) after
    training; the untrained model 0.383, 0.443, 0.346 (gain -0.04). UCB1 itself: 0.51, 0.56, 0.59 (gain +0.08,
    2000 tasks). With the sharper filter softmax(U / 0.25) (about 570 distinct histories of 1000) the gain was +0.03."""
    cfg = TaskConfig(
        name="bandit", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, num_sft=1000, num_pairs=10
    )
    art = build_task("bandit", cfg, tmp_path / "task")
    tok = load_tokenizer(str(art.tokenizer_dir))
    before = bandit.in_context_rewards(load_causal_lm(ModelConfig(name_or_path=str(art.model_dir))), tok, 64)
    train_sft(
        from_dict(
            SFTConfig,
            {
                "model": {"name_or_path": str(art.model_dir), "tokenizer": str(art.tokenizer_dir)},
                "data": {"path": str(art.sft_path), "max_len": 80, "eval_fraction": 0.0},
                "optim": {"lr": 3e-3, "scheduler": "constant"},
                "train": {
                    "output_dir": str(tmp_path / "sft"),
                    "batch_size": 32,
                    "max_steps": 600,
                    "progress": False,
                    "num_threads": 1,
                },
            },
        )
    )
    after = bandit.in_context_rewards(
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "sft" / "model"))), tok, 64
    )
    gain_before, gain_after = bandit.in_context_gain(before), bandit.in_context_gain(after)
    assert gain_after > 0.05 and gain_after > gain_before + 0.05, (gain_before, gain_after)
