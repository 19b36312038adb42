"""The ``bandit`` task: in-context RL from filtered learning histories (docs/icrl.md).

Each episode is a Bernoulli bandit with ``ARMS`` arms whose hidden win probabilities are one ``GOOD`` arm and the
rest ``BAD``, in a random order. The whole episode is the context: ``Bandit :`` then, per pull, the arm and its
outcome::

    Bandit : gamma lose alpha win alpha win alpha lose alpha win ...

Training data (``sft.jsonl``) are learning histories of a bandit algorithm (UCB1) on fresh bandits, FILTERED by
return: of ``task.num_sft`` histories only the better half is kept. A model trained on them has to improve within
its context: early pulls explore, later pulls should favour the arm that has won. ``in_context_rewards`` plays a
model on new bandits and returns its reward at each pull; the measure is the mean of the last third of the pulls
minus that of the first third.

Other files: ``prompts.jsonl`` / ``eval_prompts.jsonl`` (``{"prompt": "Bandit :"}``), ``pairs.jsonl`` (two histories
of one bandit, the higher return chosen) and ``rated.jsonl`` (histories with their return). The gold reward of a
history is its fraction of wins.
"""

from __future__ import annotations

import math
import random

import torch

from alignflow.config import TaskConfig
from alignflow.tasks.common import TaskSpec, task_rng

NAME = "bandit"
ARMS, PULLS = 3, 18
GOOD, BAD = 0.8, 0.2
PROMPT = "Bandit :"
ARM_WORDS = ("alpha", "beta", "gamma")[:ARMS]
WIN, LOSE = "win", "lose"
VOCAB = ("Bandit", ":", *ARM_WORDS, WIN, LOSE)


def new_bandit(rng: random.Random) -> list[float]:
    """Win probabilities of a fresh bandit: one GOOD arm at a random place, the others BAD."""
    probs = [BAD] * ARMS
    probs[rng.randrange(ARMS)] = GOOD
    return probs


def ucb_history(rng: random.Random, probs: list[float], pulls: int = PULLS) -> list[tuple[int, int]]:
    """(arm, reward) of each pull of UCB1: every arm once, then argmax of mean + sqrt(2 ln t / n) (first on ties)."""
    counts, wins, out = [0] * ARMS, [0] * ARMS, []
    for t in range(pulls):
        if t < ARMS:
            arm = t
        else:
            arm = max(range(ARMS), key=lambda a: wins[a] / counts[a] + math.sqrt(2 * math.log(t) / counts[a]))
        reward = int(rng.random() < probs[arm])
        counts[arm] += 1
        wins[arm] += reward
        out.append((arm, reward))
    return out


def as_text(history: list[tuple[int, int]]) -> str:
    """The completion of a history: `` <arm> win|lose`` per pull (one leading space)."""
    return "".join(f" {ARM_WORDS[a]} {WIN if r else LOSE}" for a, r in history)


def history_return(text: str) -> float:
    """Fraction of wins among the pulls written in ``text`` (0 when none)."""
    toks = text.split()
    outcomes = [t for t in toks if t in (WIN, LOSE)]
    return sum(t == WIN for t in outcomes) / len(outcomes) if outcomes else 0.0


def filtered_histories(rng: random.Random, n: int, keep: float = 0.5) -> list[str]:
    """``n`` UCB1 histories on fresh bandits, the best ``keep`` fraction by return (stable on ties)."""
    texts = [as_text(ucb_history(rng, new_bandit(rng))) for _ in range(n)]
    ranked = sorted(range(n), key=lambda i: -history_return(texts[i]))
    return [texts[i] for i in sorted(ranked[: max(1, int(n * keep))])]


def make_rows(cfg: TaskConfig) -> dict:
    rng = task_rng(NAME, cfg.seed, "sft")
    sft = [{"prompt": PROMPT, "completion": t} for t in filtered_histories(rng, 2 * cfg.num_sft)[: cfg.num_sft]]
    rng = task_rng(NAME, cfg.seed, "pairs")
    pairs, rated = [], []
    for _ in range(cfg.num_pairs):
        probs = new_bandit(rng)
        a, b = as_text(ucb_history(rng, probs)), as_text(ucb_history(rng, probs))
        first = history_return(a) >= history_return(b)
        pairs.append({"prompt": PROMPT, "chosen": a if first else b, "rejected": b if first else a})
        rated.append(
            {"prompt": PROMPT, "completions": [a, b], "ratings": [{"return": history_return(t)} for t in (a, b)]}
        )
    prompts = [{"prompt": PROMPT}]
    return {
        "sft_path": sft,
        "prompts_path": prompts,
        "eval_prompts_path": prompts,
        "pairs_path": pairs,
        "rated_path": rated,
    }


def gold_reward(prompts: list, responses: list) -> list:
    """Fraction of wins in each history."""
    return [history_return(r) for r in responses]


@torch.no_grad()
def in_context_rewards(model, tokenizer, episodes: int, pulls: int = PULLS, seed: int = 0) -> torch.Tensor:
    """(episodes, pulls) rewards of ``model`` playing fresh bandits: at each pull it samples an arm from its
    next-token probabilities over the arm words (temperature 1), the bandit draws the outcome, and both are
    appended to the context."""
    rng, gen = random.Random(f"icrl/{seed}"), torch.Generator().manual_seed(seed)
    arm_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(ARM_WORDS)))
    win_id, lose_id = tokenizer.convert_tokens_to_ids([WIN, LOSE])
    probs = torch.tensor([new_bandit(rng) for _ in range(episodes)])  # (E, ARMS)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]] * episodes)  # (E, T)
    out = torch.zeros(episodes, pulls)
    for t in range(pulls):
        logits = model(input_ids=ids).logits[:, -1, arm_ids]  # (E, ARMS)
        arm = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen).squeeze(1)  # (E,)
        reward = (torch.rand(episodes, generator=gen) < probs[torch.arange(episodes), arm]).float()
        out[:, t] = reward
        outcome = torch.where(reward > 0, torch.tensor(win_id), torch.tensor(lose_id))
        ids = torch.cat([ids, arm_ids[arm].unsqueeze(1), outcome.unsqueeze(1)], 1)
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
)
