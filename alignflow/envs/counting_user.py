"""A small multi-turn task against a scripted (simulated) user, for multi-turn REFUEL.

    env = CountingUser(turns=3)
    env.reset({"prompt": "3"})        # [{"role": "user", "content": "3"}]
    env.step({"role": "assistant", "content": "4"})   # ([user "5"], 1.0, False, {...})

The user says a digit; the assistant should answer with the next digit (9 -> 0), scored 1 per turn when it
does, else 0. The user then says the digit after the assistant's answer when that answer is a single digit,
else it repeats its own digit: what the assistant says changes the next state, so the future return of a turn
depends on the turns before it. An episode has exactly ``turns`` assistant turns; its return is the number of
right answers. The messages use only digits, so any tokenizer with digit tokens (the calculator task's) can
play it.
"""

from __future__ import annotations

import random

from alignflow.envs.base import StepResult


def next_digit(text: str) -> str:
    return str((int(text) + 1) % 10)


class CountingUser:
    """The scripted user of the counting dialogue (see the module doc); ``turns`` assistant turns per episode."""

    def __init__(self, turns: int = 3):
        if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
            raise ValueError(f"CountingUser turns: must be an integer >= 1, got {turns!r}")
        self.turns, self.said, self.turn = turns, "0", 0

    def reset(self, row: dict) -> list:
        said = str(row.get("prompt", "")).strip()
        if len(said) != 1 or not said.isdigit():
            raise ValueError(f"CountingUser: the row's 'prompt' must be one digit, got {row.get('prompt')!r}")
        self.said, self.turn = said, 0
        return [{"role": "user", "content": said}]

    def step(self, message: dict) -> StepResult:
        reply = str(message.get("content", "")).strip()
        right = reply == next_digit(self.said)
        self.turn += 1
        done = self.turn >= self.turns
        self.said = next_digit(reply) if len(reply) == 1 and reply.isdigit() else self.said
        obs = [] if done else [{"role": "user", "content": self.said}]
        return StepResult(obs, float(right), done, {"right": float(right)})


def make_env(turns: int = 3) -> CountingUser:
    """A fresh counting dialogue (load it as ``alignflow.envs.counting_user:make_env``)."""
    return CountingUser(turns)


def make_rows(n: int = 10, seed: int = 0) -> list[dict]:
    """``n`` rows ``{"prompt": "<digit>"}`` (the digits 0..9 in a seeded order, repeated)."""
    digits = [str(d) for d in range(10)]
    random.Random(seed).shuffle(digits)
    return [{"prompt": digits[i % 10]} for i in range(n)]


def sft_conversations(n: int, turns: int = 3, right: float = 0.5, seed: int = 0) -> list[dict]:
    """``n`` ``{"messages"}`` conversations with the scripted user where each answer is right with probability
    ``right`` and otherwise a wrong digit: a warm start that has seen the format but answers half the time."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        env = CountingUser(turns)
        messages = env.reset({"prompt": str(rng.randrange(10))})
        for _ in range(turns):
            good = next_digit(env.said)
            reply = good if rng.random() < right else rng.choice([d for d in "0123456789" if d != good])
            message = {"role": "assistant", "content": reply}
            obs = env.step(message).observations
            messages += [message] + obs
        out.append({"messages": messages})
    return out
