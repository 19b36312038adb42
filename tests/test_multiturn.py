"""Multi-turn rollouts: the token sequence, the loss mask on the model's own tokens, limits, storage, metrics."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignflow.batch import Batch
from alignflow.config import ConfigError
from alignflow.envs import StepResult, ToolEnv
from alignflow.envs.multiturn import (
    MultiTurnLimits,
    episode_metrics,
    rollout_episodes,
    trajectories_to_batch,
    write_trajectories,
)
from alignflow.rollout import HFEngine, SamplingParams

# the built-in template with a 'tool' role (rendered under the user marker)
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ 'user' if m['role'] == 'tool' else m['role'] }}|> "
    "{{ m['content'] }} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tok(reviews_task):
    t = AutoTokenizer.from_pretrained(reviews_task.tokenizer_dir)
    t.chat_template = TEMPLATE
    return t


class ScriptedEngine:
    """Answers every prompt with the same tokens (finish 'stop'), or cut at max_new_tokens ('length')."""

    def __init__(self, reply: list[int]):
        self.reply, self.prompts = reply, []

    def generate(self, prompt_ids, params):
        self.prompts.append([list(p) for p in prompt_ids])
        ids = self.reply[: params.max_new_tokens]
        reason = "stop" if len(ids) == len(self.reply) else "length"
        b = len(prompt_ids)
        return Batch(
            tensors={
                "response_ids": torch.tensor([ids] * b),
                "response_mask": torch.ones(b, len(ids)),
                "sampling_logprobs": torch.full((b, len(ids)), -0.5),
            },
            meta={"finish_reason": [reason] * b},
        )


class AskTwice:
    """Replies 'again' twice, then ends with reward 1 when the last answer was 'good'."""

    def reset(self, row):
        self.n = 0
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        self.n += 1
        if self.n < 3:
            return StepResult([{"role": "user", "content": "again"}], 0.1, False, {})
        return StepResult([], float(message["content"] == "good"), True, {})


def test_sequence_is_the_template_and_the_mask_covers_the_model_tokens(tok):
    """Hand-derived: prompt = [<bos>, <|user|>, the food, <|end|>, <|assistant|>]; each turn the model says
    [good, <|end|>] (mask 1); the observation is [<|user|>, again, <|end|>, <|assistant|>] (mask 0): the whole
    sequence equals the template over all messages, and the return is 0.1 + 0.1 + 1."""
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    end, user, asst = tok.convert_tokens_to_ids(["<|end|>", "<|user|>", "<|assistant|>"])
    reply = ids("good") + [end]
    engine = ScriptedEngine(reply)
    (traj,) = rollout_episodes(
        engine,
        tok,
        [AskTwice()],
        [{"prompt": "the food"}],
        SamplingParams(max_new_tokens=8),
        MultiTurnLimits(max_turns=5, max_total_tokens=200),
    )
    prompt = [tok.bos_token_id, user] + ids("the food") + [end, asst]
    obs = [user] + ids("again") + [end, asst]
    assert traj.token_ids == prompt + reply + obs + reply + obs + reply
    assert traj.loss_mask == [0] * len(prompt) + ([1] * len(reply) + [0] * len(obs)) * 2 + [1] * len(reply)
    assert traj.token_ids == tok.apply_chat_template(traj.messages, tokenize=True, return_dict=False)
    assert (traj.turns, traj.finish, traj.reward) == (3, "done", pytest.approx(1.2))
    assert engine.prompts[1][0] == prompt + reply + obs  # turn 2 is generated from the exact sequence so far
    assert [lp for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m] == [-0.5] * 3 * len(reply)


def test_turn_and_token_limits(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    reply = tok("good", add_special_tokens=False)["input_ids"] + [end]
    run = lambda limits, max_new=8: rollout_episodes(
        ScriptedEngine(reply),
        tok,
        [AskTwice()],  # noqa: E731
        [{"prompt": "the food"}],
        SamplingParams(max_new_tokens=max_new),
        limits,
    )[0]
    assert (run(MultiTurnLimits(max_turns=1)).finish, run(MultiTurnLimits(max_turns=1)).turns) == ("max_turns", 1)
    t = run(MultiTurnLimits(max_turns=5, max_total_tokens=12))  # prompt 6 + reply 2 + obs 4 = 12: no room
    assert (t.finish, t.turns, len(t.token_ids)) == ("max_tokens", 1, 8)
    t = run(MultiTurnLimits(), max_new=1)  # the turn is cut before <|end|>: scored, then the episode ends
    assert (t.finish, t.turns, t.loss_mask[-1]) == ("length", 1, 1)
    with pytest.raises(ConfigError, match="max_turns"):
        MultiTurnLimits(max_turns=0)


def test_real_engine_logprobs_match_a_training_forward(reviews_task, tok, tmp_path):
    """The batch built from 4 episodes, forwarded once, gives at the model's tokens the log-probs the engine
    sampled with (temperature 1): the sequence and positions are what the sampler saw, turn after turn."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(reviews_task.model_dir)
    engine = HFEngine(model, tok)
    params = SamplingParams(max_new_tokens=6, seed=3, stop_token_ids=[tok.convert_tokens_to_ids("<|end|>")])
    envs = [AskTwice() for _ in range(4)]
    trajs = rollout_episodes(
        engine,
        tok,
        envs,
        [{"prompt": p} for p in ["the food", "good", "the", "food"]],
        params,
        MultiTurnLimits(max_turns=3, max_total_tokens=64),
    )
    batch = trajectories_to_batch(trajs, tok.pad_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
    tp = batch["prompt_ids"].shape[1]
    lp = torch.log_softmax(logits[:, tp - 1 : -1].float(), -1).gather(-1, batch["response_ids"].unsqueeze(-1))[..., 0]
    mask = batch["response_mask"].bool()
    assert mask.sum() == sum(sum(t.loss_mask) for t in trajs) > 0
    assert torch.allclose(lp[mask], batch["sampling_logprobs"][mask], atol=1e-4)
    assert (batch["response_attention"] >= batch["response_mask"]).all()
    write_trajectories(tmp_path / "trajectories.jsonl", trajs, step=7)
    rows = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["step"] == 7 and rows[0]["messages"][0]["content"] == "the food"
    m = episode_metrics(trajs)
    assert m["episode/turns_mean"] == sum(t.turns for t in trajs) / 4
    assert sum(m[f"episode/finish_{f}"] for f in ("done", "max_turns", "length", "max_tokens")) == pytest.approx(1)


def test_tool_episode_metrics(tok):
    """A model that calls a tool that does not exist, then answers: 1 call, 0 successes."""

    def square(x: int) -> int:
        """Square a number.

        Args:
            x: the number
        """
        return x * x

    class Engine:
        turn = 0

        def generate(self, prompt_ids, params):
            text = ['<tool_call>{"name": "cube", "arguments": {"x": 2}}</tool_call>', "good"][self.turn]
            self.turn += 1
            ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|end|>")]
            return Batch(
                tensors={
                    "response_ids": torch.tensor([ids]),
                    "response_mask": torch.ones(1, len(ids)),
                    "sampling_logprobs": torch.zeros(1, len(ids)),
                },
                meta={"finish_reason": ["stop"]},
            )

    env = ToolEnv([square], reward_fn=lambda row, text: 1.0)
    # the word-level tokenizer cannot spell a tool call, so the model's text is decoded to <unk>s: patch decode
    trajs = rollout_episodes(
        Engine(), _Spelling(tok), [env], [{"prompt": "the food"}], SamplingParams(), MultiTurnLimits(max_turns=4)
    )
    m = episode_metrics(trajs)
    assert (m["tools/calls_per_episode"], m["tools/call_success"], m["episode/turns_mean"]) == (1.0, 0.0, 2.0)
    assert trajs[0].messages[2]["role"] == "tool" and trajs[0].messages[2]["content"].startswith("error: no tool")


class _Spelling:
    """The test tokenizer, with decode() returning the scripted texts."""

    texts = iter(['<tool_call>{"name": "cube", "arguments": {"x": 2}}</tool_call>', "good"])

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=True):
        return next(self.texts)

    def __getattr__(self, name):
        return getattr(self.tok, name)
