"""A Bernoulli bandit as a multi-turn environment, for in-context RL in ``alignflow rl`` (docs/icrl.md).

    env = BanditEnv(episodes=3, pulls=6)
    env.reset({"prompt": "Bandit :", "probs": [0.2, 0.8, 0.2], "seed": 5})   # [{"role": "user", ...}]
    env.step({"role": "assistant", "content": "beta"})   # StepResult([user "win"], 1.0, False, {...})

One context is one task (the row's arm probabilities) played for ``episodes`` episodes of ``pulls`` pulls each.
Each assistant turn names one arm (``alpha``, ``beta``, ``gamma``); the environment draws the outcome and answers
``win`` (reward 1) or ``lose`` (reward 0); after the last pull of an episode that is not the last one it adds the
episode separator ``;``. A turn that names no arm is a lost pull (reward 0, ``info["invalid"]`` 1). The return of
the context is its number of wins.

Outcomes use common random numbers: pull ``t`` of arm ``a`` wins when ``u(seed, t, a) < p_a`` with ``u`` a uniform
draw keyed by the row's ``seed``, the pull's index and the arm, so the ``rollout.n`` episodes of one row meet the
same luck and differ only by their choices (GRPO compares choices, not draws).

``info`` per turn: ``first_third`` / ``last_third`` (the reward when the pull is in the first / last third of the
context, else 0; summed per context they give the in-context gain, ``(last - first) / pulls_per_third``) and
``invalid``.

The chat template of the bandit task (:data:`CHAT_TEMPLATE`) renders a conversation as the plain history: the user
messages' text, each assistant message followed by the end-of-turn token ``<eos>``, separated by spaces::

    <bos> Bandit : beta <eos> win alpha <eos> lose ; beta <eos> win ...
"""

from __future__ import annotations

import random

from alignflow.envs.base import StepResult

ARMS = 3
GOOD, BAD = 0.8, 0.2
ARM_WORDS = ("alpha", "beta", "gamma")[:ARMS]
WIN, LOSE, SEPARATOR = "win", "lose", ";"
PROMPT = "Bandit :"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }} {{ eos_token }} {% else %}{{ m['content'] }} {% endif %}"
    "{% endfor %}"
)


def new_bandit(rng: random.Random) -> list[float]:
    """Win probabilities of a fresh bandit: one GOOD arm at a random place, the others BAD."""
    probs = [BAD] * ARMS
    probs[rng.randrange(ARMS)] = GOOD
    return probs


def outcome(seed: int, t: int, arm: int, p: float) -> int:
    """1 when pull ``t`` of ``arm`` wins under the row's common random numbers (module docstring), else 0."""
    return int(random.Random(f"bandit/{seed}/{t}/{arm}").random() < p)


class BanditEnv:
    """One bandit task for ``episodes`` x ``pulls`` pulls (module docstring)."""

    def __init__(self, episodes: int = 3, pulls: int = 6):
        for name, value in (("episodes", episodes), ("pulls", pulls)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BanditEnv {name}: must be an integer >= 1, got {value!r}")
        self.episodes, self.pulls = episodes, pulls
        self.probs: list[float] = []
        self.seed, self.t = 0, 0

    @property
    def total(self) -> int:
        return self.episodes * self.pulls

    def reset(self, row: dict) -> list:
        probs, seed = row.get("probs"), row.get("seed", 0)
        if not isinstance(probs, list) or len(probs) != ARMS or not all(isinstance(p, (int, float)) for p in probs):
            raise ValueError(f"BanditEnv: the row's 'probs' must be a list of {ARMS} numbers, got {probs!r:.80}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"BanditEnv: the row's 'seed' must be an integer, got {seed!r}")
        self.probs, self.seed, self.t = [float(p) for p in probs], seed, 0
        return [{"role": "user", "content": str(row.get("prompt", PROMPT))}]

    def step(self, message: dict) -> StepResult:
        words = str(message.get("content", "")).split()
        arm = ARM_WORDS.index(words[0]) if len(words) == 1 and words[0] in ARM_WORDS else None
        reward = 0 if arm is None else outcome(self.seed, self.t, arm, self.probs[arm])
        third = max(1, self.total // 3)
        info = {
            "first_third": float(reward if self.t < third else 0),
            "last_third": float(reward if self.t >= self.total - third else 0),
            "invalid": float(arm is None),
        }
        self.t += 1
        done = self.t >= self.total
        text = WIN if reward else LOSE
        if not done and self.t % self.pulls == 0:
            text += f" {SEPARATOR}"
        return StepResult([] if done else [{"role": "user", "content": text}], float(reward), done, info)


def make_env(episodes: int = 3, pulls: int = 6) -> BanditEnv:
    """A fresh bandit context (load it as ``alignflow.envs.bandit:make_env``, or ``env.task: true`` on the bandit
    task)."""
    return BanditEnv(episodes, pulls)
