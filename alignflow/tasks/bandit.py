"""The ``bandit`` task: in-context RL from filtered learning histories (docs/icrl.md).

A context is one Bernoulli bandit task (``ARMS`` arms, one ``GOOD`` arm and the rest ``BAD``, in a random order)
played for ``EPISODES`` episodes of ``PULLS`` pulls. It is written as a conversation (the environment
:mod:`alignflow.envs.bandit`, whose chat template this task's tokenizer uses): the user opens with ``Bandit :``,
each assistant turn names an arm, the user answers ``win`` or ``lose`` and ``;`` ends an episode::

    <bos> Bandit : gamma <eos> lose alpha <eos> win ... ; alpha <eos> win ...

Training data (``sft.jsonl``, ``{"messages"}`` rows: the loss falls on the arms only) are LEARNING HISTORIES: runs
of a learning agent (epsilon-greedy, Thompson sampling, a softmax policy-gradient learner or UCB1, one drawn per
history) whose estimates carry over from episode to episode of the same task, so that their later episodes are
better than their first ones. Of ``2 * task.num_sft`` histories, ``task.num_sft`` are drawn with probabilities
increasing in their score U = improvement + stability (:func:`history_score`, learning-history filtering).

``prompts.jsonl`` / ``eval_prompts.jsonl`` hold ``{"prompt", "probs", "seed"}`` rows, one bandit task each, for
``alignflow rl`` with ``env.task: true`` (the environment reads ``probs`` and ``seed``). ``pairs.jsonl`` (two
histories of one task, the higher return chosen) and ``rated.jsonl`` (histories with their return) are written as
text. The gold reward of a history is its fraction of wins. ``in_context_rewards`` plays a model on new tasks and
returns its reward at each pull.
"""

from __future__ import annotations

import math
import random

import torch

from alignflow.config import TaskConfig
from alignflow.envs.bandit import (
    ARM_WORDS,
    ARMS,
    CHAT_TEMPLATE,
    LOSE,
    PROMPT,
    SEPARATOR,
    WIN,
    BanditEnv,
    new_bandit,
)
from alignflow.tasks.common import EOS, TaskSpec, task_rng

NAME = "bandit"
EPISODES, PULLS = 3, 6
VOCAB = ("Bandit", ":", *ARM_WORDS, WIN, LOSE, SEPARATOR)
NUM_PROMPTS, NUM_EVAL_PROMPTS = 512, 64
AGENTS = ("epsilon_greedy", "thompson", "gradient", "ucb")


# ------------------------------------------------------------------------------------------------ learning agents
def _mean(wins: list[int], counts: list[int], a: int) -> float:
    return (wins[a] + 0.5) / (counts[a] + 1)  # a half-win prior: an untried arm reads 0.5


def choose(agent: str, rng: random.Random, t: int, counts: list[int], wins: list[int], prefs: list[float]) -> int:
    """The arm ``agent`` pulls at step ``t`` (over the whole history) from its statistics so far."""
    if agent == "epsilon_greedy":  # epsilon = 1 / sqrt(t + 1): explores less as it learns
        if rng.random() < 1 / math.sqrt(t + 1):
            return rng.randrange(ARMS)
        return max(range(ARMS), key=lambda a: _mean(wins, counts, a))
    if agent == "thompson":  # a draw from each arm's Beta(wins + 1, losses + 1) posterior
        return max(range(ARMS), key=lambda a: rng.betavariate(wins[a] + 1, counts[a] - wins[a] + 1))
    if agent == "gradient":  # softmax over preferences
        z = [math.exp(h - max(prefs)) for h in prefs]
        return rng.choices(range(ARMS), weights=z)[0]
    if agent == "ucb":  # every arm once, then argmax mean + sqrt(2 ln t / n)
        if t < ARMS:
            return t
        return max(range(ARMS), key=lambda a: wins[a] / counts[a] + math.sqrt(2 * math.log(t) / counts[a]))
    raise ValueError(f"unknown bandit agent {agent!r}; valid: {', '.join(AGENTS)}")


def learning_history(
    rng: random.Random, probs: list[float], agent: str, episodes: int = EPISODES, pulls: int = PULLS
) -> list[tuple[int, int]]:
    """(arm, reward) of each pull of one learning run of ``agent`` on the task ``probs``: ``episodes`` x
    ``pulls`` pulls, the agent's statistics carried across episodes. The gradient learner moves its preference of
    the pulled arm by 0.3 (r - baseline)(1 - pi_a) and the others by -0.3 (r - baseline) pi_b, baseline = the mean
    reward so far."""
    counts, wins, prefs, out = [0] * ARMS, [0] * ARMS, [0.0] * ARMS, []
    for t in range(episodes * pulls):
        arm = choose(agent, rng, t, counts, wins, prefs)
        reward = int(rng.random() < probs[arm])
        baseline = sum(wins) / max(1, sum(counts))
        z = [math.exp(h - max(prefs)) for h in prefs]
        pi = [v / sum(z) for v in z]
        for b in range(ARMS):
            prefs[b] += 0.3 * (reward - baseline) * ((1 - pi[b]) if b == arm else -pi[b])
        counts[arm] += 1
        wins[arm] += reward
        out.append((arm, reward))
    return out


def episode_returns(history: list[tuple[int, int]], pulls: int = PULLS) -> list[int]:
    """Wins of each episode of ``pulls`` pulls."""
    return [sum(r for _, r in history[i : i + pulls]) for i in range(0, len(history), pulls)]


def history_score(returns: list[int], pulls: int = PULLS, stability: float = 1.0) -> float:
    """U = improvement + stability * S, with improvement = (G_last - G_first) / pulls and S = -sum of the drops
    max(0, G_k - G_k+1) / (pulls (K - 1)): returns [1, 3, 5] of 6 pulls -> 4/6; [5, 1, 3] -> -2/6 - 4/12 = -2/3."""
    k = len(returns)
    if k < 2:
        return 0.0
    drops = sum(max(0, a - b) for a, b in zip(returns, returns[1:], strict=False))
    return (returns[-1] - returns[0]) / pulls - stability * drops / (pulls * (k - 1))


def filter_weights(scores: list[float], temperature: float = 0.5) -> list[float]:
    """Sampling probabilities of the histories, increasing in their score: softmax(U / temperature). Equal scores
    give equal weights (plain, unfiltered distillation)."""
    top = max(scores)
    z = [math.exp((u - top) / temperature) for u in scores]
    return [v / sum(z) for v in z]


def filtered_histories(rng: random.Random, n: int, candidates: int) -> list[list[tuple[int, int]]]:
    """``n`` histories drawn (with replacement) by :func:`filter_weights` from ``candidates`` learning runs on fresh
    tasks, each run's agent drawn from :data:`AGENTS`."""
    runs = [learning_history(rng, new_bandit(rng), rng.choice(AGENTS)) for _ in range(candidates)]
    weights = filter_weights([history_score(episode_returns(h)) for h in runs])
    return rng.choices(runs, weights=weights, k=n)


# ------------------------------------------------------------------------------------------------ rows
def as_messages(history: list[tuple[int, int]], pulls: int = PULLS) -> list[dict]:
    """A history as the environment's conversation (the last outcome is not shown: the context ends there)."""
    out = [{"role": "user", "content": PROMPT}]
    for t, (arm, reward) in enumerate(history):
        out.append({"role": "assistant", "content": ARM_WORDS[arm]})
        if t + 1 < len(history):
            sep = f" {SEPARATOR}" if (t + 1) % pulls == 0 else ""
            out.append({"role": "user", "content": (WIN if reward else LOSE) + sep})
    return out


def as_text(history: list[tuple[int, int]], pulls: int = PULLS) -> str:
    """The completion of a history as text: `` <arm> <eos> win|lose`` per pull, ``;`` between episodes."""
    parts = []
    for t, (arm, reward) in enumerate(history):
        parts.append(f" {ARM_WORDS[arm]} {EOS} {WIN if reward else LOSE}")
        if (t + 1) % pulls == 0 and t + 1 < len(history):
            parts.append(f" {SEPARATOR}")
    return "".join(parts)


def history_return(text: str) -> float:
    """Fraction of wins among the pulls written in ``text`` (0 when none)."""
    outcomes = [t for t in text.split() if t in (WIN, LOSE)]
    return sum(t == WIN for t in outcomes) / len(outcomes) if outcomes else 0.0


def make_rows(cfg: TaskConfig) -> dict:
    rng = task_rng(NAME, cfg.seed, "sft")
    sft = [{"messages": as_messages(h)} for h in filtered_histories(rng, cfg.num_sft, 2 * cfg.num_sft)]
    rng = task_rng(NAME, cfg.seed, "pairs")
    pairs, rated = [], []
    for _ in range(cfg.num_pairs):
        probs = new_bandit(rng)
        a, b = (as_text(learning_history(rng, probs, rng.choice(AGENTS))) for _ in range(2))
        first = history_return(a) >= history_return(b)
        pairs.append({"prompt": PROMPT, "chosen": a if first else b, "rejected": b if first else a})
        rated.append(
            {"prompt": PROMPT, "completions": [a, b], "ratings": [{"return": history_return(t)} for t in (a, b)]}
        )
    prompts = {}
    for split, count in (("prompts", NUM_PROMPTS), ("eval", NUM_EVAL_PROMPTS)):
        r = task_rng(NAME, cfg.seed, split)
        prompts[split] = [{"prompt": PROMPT, "probs": new_bandit(r), "seed": r.randrange(2**31)} for _ in range(count)]
    return {
        "sft_path": sft,
        "prompts_path": prompts["prompts"],
        "eval_prompts_path": prompts["eval"],
        "pairs_path": pairs,
        "rated_path": rated,
    }


def gold_reward(prompts: list, responses: list) -> list:
    """Fraction of wins in each history."""
    return [history_return(r) for r in responses]


def task_env(**kwargs) -> BanditEnv:
    """``env.task: true`` on the bandit task: a context of EPISODES x PULLS pulls (``env.kwargs`` may change them)."""
    return BanditEnv(**({"episodes": EPISODES, "pulls": PULLS} | kwargs))


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def in_context_rewards(
    model, tokenizer, contexts: int, episodes: int = EPISODES, pulls: int = PULLS, seed: int = 0
) -> torch.Tensor:
    """(contexts, episodes * pulls) rewards of ``model`` playing fresh tasks: at each pull it samples an arm from its
    next-token probabilities over the arm words (temperature 1), the task draws the outcome, and the arm, the
    end-of-turn token and the outcome (and ``;`` after an episode) are appended to the context."""
    rng, gen = random.Random(f"icrl/{seed}"), torch.Generator().manual_seed(seed)
    arm_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(ARM_WORDS)))
    win_id, lose_id, sep_id, eos_id = tokenizer.convert_tokens_to_ids([WIN, LOSE, SEPARATOR, EOS])
    probs = torch.tensor([new_bandit(rng) for _ in range(contexts)])  # (C, ARMS)
    first = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=True, return_dict=False)
    ids = torch.tensor([list(first["input_ids"] if isinstance(first, dict) else first)] * contexts)  # (C, T)
    total = episodes * pulls
    out = torch.zeros(contexts, total)
    for t in range(total):
        logits = model(input_ids=ids).logits[:, -1, arm_ids]  # (C, ARMS)
        arm = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen).squeeze(1)  # (C,)
        reward = (torch.rand(contexts, generator=gen) < probs[torch.arange(contexts), arm]).float()
        out[:, t] = reward
        outcome = torch.where(reward > 0, torch.tensor(win_id), torch.tensor(lose_id))
        cols = [arm_ids[arm], torch.full_like(arm, eos_id), outcome]
        if (t + 1) % pulls == 0 and t + 1 < total:
            cols.append(torch.full_like(arm, sep_id))
        ids = torch.cat([ids, torch.stack(cols, 1)], 1)
    return out


def in_context_gain(rewards: torch.Tensor) -> float:
    """Mean reward of the last third of the pulls minus that of the first third."""
    k = rewards.shape[1] // 3
    return float(rewards[:, -k:].mean() - rewards[:, :k].mean())


TASK = TaskSpec(
    name=NAME,
    vocab=VOCAB,
    join=" ",
    make_rows=make_rows,
    gold_reward=gold_reward,
    rewards={"gold": gold_reward},
    sft_steps=200,
    chat_template=CHAT_TEMPLATE,
    make_env=task_env,
)
