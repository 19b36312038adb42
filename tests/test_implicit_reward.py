"""From r to Q*: the DPO policy's implicit token rewards and beam search on them, against hand-derived values."""

import math
from types import SimpleNamespace

import pytest
import torch

from alignflow.algorithms.implicit_reward import credit_shares, implicit_prefix_scores, implicit_token_rewards
from alignflow.rollout.implicit_search import implicit_reward_beam_search


def test_token_rewards_prefix_scores_and_credit_by_hand():
    """β = 0.5; lp_θ = [-1, -2, -0.5], lp_ref = [-2, -2, -1.5], last token masked:
    r = 0.5·[1, 0, 1]·[1, 1, 0] = [0.5, 0, 0]; prefix sums [0.5, 0.5, 0.5]; shares [1, 0, 0]."""
    pol, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-2.0, -2.0, -1.5]])
    mask = torch.tensor([[1, 1, 0]])
    r = implicit_token_rewards(pol, ref, mask, beta=0.5)
    assert r.tolist() == [[0.5, 0.0, 0.0]]
    assert implicit_prefix_scores(r).tolist() == [[0.5, 0.5, 0.5]]
    assert credit_shares(r, mask).tolist() == [[1.0, 0.0, 0.0]]
    assert credit_shares(torch.zeros(1, 3), mask).tolist() == [[0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="shapes differ"):
        implicit_token_rewards(pol, ref[:, :2], mask)


class _Table(torch.nn.Module):
    """A 'language model' over 3 tokens whose next-token distribution depends only on the last token:
    probs[last] (rows: last token 0, 1, 2)."""

    def __init__(self, probs):
        super().__init__()
        self.logp = torch.log(torch.tensor(probs))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logp[input_ids])  # (B, T, V)


def test_beam_search_keeps_the_highest_implicit_reward_not_the_most_likely_answer():
    """Tokens: 0 = start, 1 = 'a', 2 = EOS. After the start the policy prefers EOS (0.6) to 'a' (0.4); the reference
    puts 0.8 on EOS and 0.2 on 'a'. With β = 1 the implicit rewards of the first token are
    EOS: log(0.6/0.8) = −0.288, 'a': log(0.4/0.2) = +0.693. After 'a' both models put 0.5 on EOS (reward 0).
    Greedy decoding of the policy stops at once; beam search on the implicit reward answers 'a EOS', score log 2."""
    policy = _Table([[0.0001, 0.4, 0.5999], [0.0001, 0.4999, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    ref = _Table([[0.0001, 0.2, 0.7999], [0.0001, 0.4999, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    best = implicit_reward_beam_search(policy, ref, [0], eos_id=2, beta=1.0, width=2, expand=2, max_new_tokens=3)
    assert best[0].tokens == [1, 2] and best[0].finished
    assert best[0].score == pytest.approx(math.log(0.4 / 0.2), abs=1e-6)
    greedy = implicit_reward_beam_search(policy, ref, [0], eos_id=2, beta=1.0, width=1, expand=1, max_new_tokens=3)
    assert greedy[0].tokens == [2] and greedy[0].score == pytest.approx(math.log(0.5999 / 0.7999), abs=1e-6)
    with pytest.raises(ValueError, match="must be >= 1"):
        implicit_reward_beam_search(policy, ref, [0], eos_id=2, width=0)


def test_implicit_search_recipe_step_scores_beam_and_greedy_answers(reviews_task, reviews_sft, tmp_path):
    """The step answers held-out prompts both ways and reports the gold and implicit rewards of each."""
    import json

    from alignflow.config import TaskConfig
    from alignflow.recipes.steps import ImplicitSearchConfig, implicit_search

    task = TaskConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, num_sft=400, num_pairs=300)
    summary = implicit_search(
        ImplicitSearchConfig(
            policy=str(reviews_sft),
            reference=str(reviews_task.model_dir),
            num_prompts=2,
            max_new_tokens=6,
            width=2,
            expand=2,
            task=task,
            output_dir=str(tmp_path),
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "beam", "greedy"}
    assert set(summary) == {"beam/implicit_reward", "beam/gold_reward", "greedy/implicit_reward", "greedy/gold_reward"}
    assert summary["beam/gold_reward"] == pytest.approx(sum(r["beam"]["gold_reward"] for r in rows) / 2)
