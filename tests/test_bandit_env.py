"""The bandit environment of alignflow rl by hand: outcomes, turns, separators, the per-third info, and the task's
chat template rendering a history exactly as the environment's episodes are tokenised."""

import pytest

from alignflow.config import TaskConfig
from alignflow.envs.bandit import BanditEnv, outcome
from alignflow.models import load_tokenizer
from alignflow.tasks import bandit, build_task


def test_the_environment_by_hand():
    """probs [1, 0, 0]: alpha always wins, beta never; 2 episodes of 3 pulls. Pulls: alpha (win, reward 1), beta
    (lose), "foo" (no arm: lost, invalid 1) then the separator ends episode 1; alpha x 3 win, the last one ends the
    context with no observation. Thirds of 6 pulls are 2 pulls: first third wins 1, last third wins 2."""
    env = BanditEnv(episodes=2, pulls=3)
    assert env.reset({"prompt": "Bandit :", "probs": [1.0, 0.0, 0.0], "seed": 3}) == [
        {"role": "user", "content": "Bandit :"}
    ]
    steps = [env.step({"role": "assistant", "content": c}) for c in ("alpha", "beta", "foo", "alpha", "alpha", "alpha")]
    assert [s.reward for s in steps] == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert [s.observations[0]["content"] if s.observations else None for s in steps] == [
        "win",
        "lose",
        "lose ;",
        "win",
        "win",
        None,
    ]
    assert [s.done for s in steps] == [False] * 5 + [True]
    assert sum(s.info["first_third"] for s in steps) == 1 and sum(s.info["last_third"] for s in steps) == 2
    assert sum(s.info["invalid"] for s in steps) == 1


def test_common_random_numbers_and_bad_rows():
    """A draw depends on (seed, pull, arm) only: the same for every episode of a row; p = 0.5 wins about half."""
    assert outcome(7, 2, 1, 0.5) == outcome(7, 2, 1, 0.5)
    wins = sum(outcome(7, t, 0, 0.5) for t in range(2000)) / 2000
    assert wins == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="'probs' must be a list of 3 numbers"):
        BanditEnv().reset({"prompt": "Bandit :"})


def test_the_chat_template_renders_the_plain_history(tmp_path):
    """The history (beta win)(alpha lose) in 1-pull episodes renders as <bos> Bandit : beta <eos> win ; alpha <eos>
    (the last outcome is never shown); the model's turns are the arm and <eos>."""
    art = build_task("bandit", TaskConfig(name="bandit", num_sft=4, num_pairs=2), tmp_path / "task")
    tok = load_tokenizer(str(art.tokenizer_dir))
    ids = tok.apply_chat_template(bandit.as_messages([(1, 1), (0, 0)], pulls=1), tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "Bandit", ":", "beta", "<eos>", "win", ";", "alpha", "<eos>"]
